"""``seghirescam evaluate``: the long table, the report's files, and refusal before any long work."""

from __future__ import annotations

import csv
import math
import re

import numpy as np
import pytest
from tiny_models import save_tiny_unet, write_oblique_image, write_tiny_case

from SegHiResCAMLib.cli import main
from SegHiResCAMLib.evaluation.report import read_metrics_csv
from SegHiResCAMLib.evaluation.suite import METRICS
from SegHiResCAMLib.evaluation.sparseness import gini
from SegHiResCAMLib.io.images import read_image, read_mask
from SegHiResCAMLib.models.loading import load_model
from SegHiResCAMLib.pipeline import explain_volume

METHODS = ("seg-hires-grad-cam", "seg-grad-cam")
LAYERS = ("bottleneck", "decoder.0")


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    folder = tmp_path_factory.mktemp("evaluate")
    return folder, write_tiny_case(folder, "t1.nrrd")


@pytest.fixture(scope="module")
def report(case):
    folder, model = case
    out = folder / "report"
    code = main(["evaluate", "--image", str(folder / "t1.nrrd"), "--model", str(model), "--class", "2",
                 "--roi", str(folder / "roi.nrrd"), "--layer", LAYERS[0], "--layer", LAYERS[1],
                 "--methods", *METHODS, "--steps", "3", "--randomisation-points", "2", "--device", "cpu",
                 "--out", str(out)])
    assert code == 0
    return out


def test_metrics_csv_is_long_format_with_every_map_layer_and_metric(report):
    with open(report / "metrics.csv", newline="") as handle:
        header = next(csv.reader(handle))
    assert header == ["case", "method", "layer", "metric", "value"]
    rows = read_metrics_csv(report / "metrics.csv")
    maps = (*METHODS, "random", "region", "blob")
    expected = {m for m in METRICS if not m.startswith("data_")}
    for layer in LAYERS:
        for name in maps:
            metrics = [r[3] for r in rows if r[1] == name and r[2] == layer]
            assert sorted(metrics) == sorted(expected), (name, layer)
    assert {r[0] for r in rows} == {"t1.nrrd"}


def test_values_match_the_library_computed_directly(case, report):
    folder, model = case
    rows = {(r[1], r[2], r[3]): r[4] for r in read_metrics_csv(report / "metrics.csv")}
    image = read_image(folder / "t1.nrrd")
    roi = read_mask(folder / "roi.nrrd", image)
    maps, _ = explain_volume(load_model(model), image, target_class=2, roi=roi, layers=("bottleneck",),
                             methods=METHODS, device="cpu")
    for method in METHODS:
        # exact: the same maps (the same code on the same data, at the session's one thread count), the same
        # function, and the CSV holds repr(float), which reads back exactly
        assert rows[(method, "bottleneck", "gini")] == gini(maps[method].array)
        share = float(maps[method].array[roi].sum(dtype=np.float64) / maps[method].array.sum(dtype=np.float64))
        # the same share summed in another order: float64 sums of n voxels, within 2 n eps64
        n = maps[method].array.size
        assert rows[(method, "bottleneck", "mass_inside")] == pytest.approx(share, rel=2 * n * np.finfo(float).eps)
    # Baselines: the region map holds all its mass in the region; a uniform map's Gini is 1/3.
    assert rows[("region", "bottleneck", "mass_inside")] == 1.0
    # statistical, not rounding: the Gini of n uniform values has standard deviation below 1 / (4 sqrt(n))
    # (0.004 for these 4096 voxels); five of them (the noise is seeded: the same numbers everywhere)
    assert rows[("random", "bottleneck", "gini")] == pytest.approx(1 / 3, abs=5 / (4 * np.sqrt(16**3)))
    assert rows[("region", "bottleneck", "randomisation_spearman")] == 1.0


def test_report_html_links_every_picture_and_holds_the_viewer(report):
    page = (report / "report.html").read_text(encoding="utf-8")
    sources = re.findall(r'<img src="([^"]+)"', page)
    pictures = [s for s in sources if s.startswith("pictures/")]
    assert len(pictures) == len(LAYERS) * (len(METHODS) + 3)
    assert sum(s.startswith("curves/") for s in sources) == len(LAYERS)
    assert sum(s.startswith("randomisation/") for s in sources) == len(LAYERS)
    assert all((report / s).is_file() for s in sources)
    assert '<script src="niivue.umd.js">' in page and (report / "niivue.umd.js").is_file()
    assert (report / "NIIVUE-LICENSE.txt").read_text().count("BSD 2-Clause") == 1
    for method in METHODS:
        assert f"<td>{method}</td>" in page


def test_a_folder_with_files_is_refused_before_any_work_and_left_untouched(case, capsys):
    folder, model = case
    out = folder / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code = main(["evaluate", "--image", str(folder / "t1.nrrd"), "--model", str(model), "--class", "2",
                 "--out", str(out)])
    assert code == 1
    assert "already holds files" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_a_failed_run_leaves_no_report_folder_and_no_temp_folder(case, capsys):
    folder, model = case
    out = folder / "failed"
    code = main(["evaluate", "--image", str(folder / "t1.nrrd"), "--model", str(model), "--class", "2",
                 "--layer", "no.such.layer", "--steps", "2", "--out", str(out)])
    assert code == 1
    assert "no.such.layer" in capsys.readouterr().err
    assert not out.exists()
    assert not [p for p in folder.iterdir() if p.name.startswith(".failed")]


@pytest.mark.parametrize("option, value, words", [("--methods", "seg-magic", "method 'seg-magic' is unknown"),
                                                  ("--baseline", "black", "baseline 'black' is unknown"),
                                                  ("--score", "dice", "score 'dice' is unknown"),
                                                  ("--steps", "0", "--steps must be at least 1")])
def test_bad_options_are_one_line_errors(case, capsys, option, value, words):
    folder, model = case
    code = main(["evaluate", "--image", str(folder / "t1.nrrd"), "--model", str(model), "--class", "2",
                 option, value, "--out", str(folder / "never")])
    assert code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0]
    assert not (folder / "never").exists()


def test_no_value_is_nan_where_the_region_and_maps_are_present(report):
    # At the bottleneck every map of this model has mass (an all-zero map, as the untrained net gives at
    # decoder.0, has NaN localisation and sparseness by definition); a randomised map may be all zero.
    rows = read_metrics_csv(report / "metrics.csv")
    nan = [r for r in rows if r[2] == "bottleneck" and math.isnan(r[4]) and r[3] != "randomisation_spearman"]
    assert not nan, nan[:5]


def test_data_randomisation_compares_with_the_other_models_map(tmp_path):
    from SegHiResCAMLib.evaluation.similarity import spearman, ssim
    from SegHiResCAMLib.evaluation.suite import EvaluationSettings, evaluate_case

    trained = load_model(save_tiny_unet(tmp_path / "a", seed=0))
    permuted = load_model(save_tiny_unet(tmp_path / "b", seed=1))  # stands in for a permuted-label model
    write_oblique_image(tmp_path / "t1.nrrd")
    image = read_image(tmp_path / "t1.nrrd")
    roi = np.zeros(image.spatial_shape, bool)
    roi[5:11, 4:12, 6:10] = True
    settings = EvaluationSettings(methods=("seg-hires-grad-cam",), baselines=("region",), steps=1,
                                  randomisation_points=0, device="cpu")
    result = evaluate_case(trained, image, case="t1", target_class=2, layers=["bottleneck"], roi=roi,
                           settings=settings, random_labels_model=permuted)
    rows = {(r[1], r[3]): r[4] for r in result.rows}
    maps = [explain_volume(model, image, target_class=2, roi=roi, layers=("bottleneck",), device="cpu")[0]
            ["seg-hires-grad-cam"].array for model in (trained, permuted)]
    # exact: the same maps (same code, same data, one thread count) through the same functions
    assert rows[("seg-hires-grad-cam", "data_randomisation_spearman")] == spearman(*maps)
    assert rows[("seg-hires-grad-cam", "data_randomisation_ssim")] == ssim(*maps)
    assert rows[("seg-hires-grad-cam", "data_randomisation_ssim")] < 0.99
    assert rows[("region", "data_randomisation_spearman")] == 1.0  # a baseline does not depend on the model
    assert not any(metric.startswith("randomisation_") for _, metric in rows)  # 0 points: the cascade is skipped


def test_evaluate_help_builds_without_torch_scipy_or_matplotlib():
    import subprocess
    import sys

    code = ("import sys\n"
            "from SegHiResCAMLib.cli import build_parser\n"
            "help_text = build_parser()._subparsers._group_actions[0].choices['evaluate'].format_help()\n"
            "assert '--methods' in help_text and '--baseline' in help_text\n"
            "heavy = sorted(m for m in ('torch', 'scipy', 'matplotlib') if m in sys.modules)\n"
            "assert not heavy, heavy\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_report_over_several_cases_gives_intervals_and_paired_wilcoxon(tmp_path):
    from SegHiResCAMLib.evaluation.report import ReportInfo, write_report
    from SegHiResCAMLib.evaluation.suite import CaseResult, EvaluationSettings
    from SegHiResCAMLib.volume import Volume

    results = []
    for n in range(6):
        rows = [(f"case{n}", "seg-hires-grad-cam", "bottleneck", "deletion_auc", 0.2),
                (f"case{n}", "seg-grad-cam", "bottleneck", "deletion_auc", 0.2 + 0.1 * (n + 1))]
        results.append(CaseResult(f"case{n}", Volume(np.zeros((2, 2, 2))), np.zeros((2, 2, 2), bool), rows=rows))
    info = ReportInfo(model="m", class_name="2 (white matter)", region="r",
                      settings=EvaluationSettings(methods=("seg-hires-grad-cam", "seg-grad-cam")))
    page = write_report(tmp_path / "many", results, info, picture_cases=0, viewer=False).read_text(encoding="utf-8")
    assert "Paired comparison with seg-hires-grad-cam across 6 cases" in page
    assert "p=0.0312" in page  # six positive differences: the exact two-sided p is 2 / 2^6
    assert "smallest possible p is 0.0312" in page
    assert len(read_metrics_csv(tmp_path / "many" / "metrics.csv")) == 12
