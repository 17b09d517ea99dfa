"""Cohorts in one process (no Dask needed): outputs equal single explains, failures are recorded,
and every kind of interruption resumes with nothing lost and nothing done twice."""

from __future__ import annotations

import csv
import dataclasses
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from cohort_data import BAD_CASE, MODEL, SMALL, WHITE_MATTER, write_cohort

from SegHiResCAMLib.cli import main
from SegHiResCAMLib.cohort.cases import read_cases
from SegHiResCAMLib.cohort.meter import CohortMeter
from SegHiResCAMLib.cohort.runner import InProcess, Reports, prepare_job, run_cohort
from SegHiResCAMLib.cohort.store import (ATTEMPTS_FILE, COHORT_FILE, MANIFEST_FILE, RESULTS_FILE, CaseResult,
                                         CohortStore, read_attempts)
from SegHiResCAMLib.errors import InputError
from SegHiResCAMLib.models.loading import load_model
from SegHiResCAMLib.service import run_request
from SegHiResCAMLib.settings import ExplainSettings
from SegHiResCAMLib.worker.protocol import ExplainRequest

METHODS = ("seg-hires-grad-cam", "seg-grad-cam")
SETTINGS = ExplainSettings(target_class=WHITE_MATTER, methods=METHODS, device="cpu")


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """The small cohort's table, and a finished run of it in ``done/`` (copied by the tests that change it)."""
    folder = tmp_path_factory.mktemp("cohort")
    table = write_cohort(folder / "in", SMALL)
    results = run_cohort(read_cases(table), prepare_job(MODEL, SETTINGS, folder / "done"), InProcess())
    return table, folder / "done", results


def copy_run(cohort, tmp_path) -> Path:
    """A copy of the finished run, to change (manifests name inputs by absolute path: they stay valid)."""
    out = tmp_path / "out"
    shutil.copytree(cohort[1], out)
    return out


def rerun(table: Path, out: Path, settings: ExplainSettings = SETTINGS, reports: Reports | None = None):
    return run_cohort(read_cases(table), prepare_job(MODEL, settings, out), InProcess(), reports)


def read_table(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as stream:
        return list(csv.DictReader(stream))


def events(out: Path, case: str, kind: str) -> list[dict]:
    return [line for line in read_attempts(out, case) if line["event"] == kind]


def region_voxels_inside(region_file: Path, image_file: Path) -> int:
    """How many voxels of a region file fall inside an image's box, mapped through physical space."""
    region, image = sitk.ReadImage(str(region_file)), sitk.ReadImage(str(image_file))
    count = 0
    for k, j, i in np.argwhere(sitk.GetArrayFromImage(region) > 0):
        index = image.TransformPhysicalPointToContinuousIndex(region.TransformIndexToPhysicalPoint((int(i), int(j), int(k))))
        rounded = np.rint(index)
        assert np.abs(np.asarray(index) - rounded).max() < 1e-6  # the same lattice, up to float64 geometry
        count += bool(np.all(rounded >= 0) and np.all(rounded < np.asarray(image.GetSize())))
    return count


def heatmap(path: Path) -> sitk.Image:
    return sitk.ReadImage(str(path))


def test_each_case_equals_a_single_explain_of_it_and_the_bad_case_is_recorded(cohort, tmp_path):
    table, out, results = cohort
    loaded = load_model(MODEL)
    assert [row.case for row in results] == ["c01", "c02", BAD_CASE, "c04"]
    for case in read_cases(table):
        row = next(r for r in results if r.case == case.case_id)
        if case.case_id == BAD_CASE:
            assert row.status == "failed" and row.outputs == {}
            assert "missing_t1.nrrd does not exist" in row.error
            continue
        # The reference: the service that `seghirescam explain` runs, in this same process (same code,
        # same thread count, same CPU, so the same float32 operations in the same order: bit-identical).
        settings = SETTINGS if case.target_class is None else dataclasses.replace(SETTINGS, target_class=case.target_class)
        outputs = tuple(str(tmp_path / f"{case.case_id}_{m}.nrrd") for m in METHODS)
        alone = run_request(ExplainRequest(images=case.images, model=str(MODEL), outputs=outputs, settings=settings,
                                           roi=case.roi), model=loaded)
        assert row.status == "ok" and row.roi_voxels == alone.roi_voxels > 0 and row.device == "cpu"
        image = heatmap(Path(case.images[0]))
        for method, reference in zip(METHODS, outputs):
            written = heatmap(out / row.outputs[method])
            assert row.outputs[method] == f"{case.case_id}/{method}_bottleneck.nrrd"
            np.testing.assert_array_equal(sitk.GetArrayFromImage(written), sitk.GetArrayFromImage(heatmap(Path(reference))))
            # In the case image's own geometry (each crop has its own origin).
            assert written.GetSize() == image.GetSize() and written.GetOrigin() == image.GetOrigin()
            assert written.GetSpacing() == image.GetSpacing() and written.GetDirection() == image.GetDirection()
    table_rows = read_table(out / RESULTS_FILE)
    assert [r["status"] for r in table_rows] == ["ok", "ok", "failed", "ok"]
    assert table_rows[0]["output_seg-grad-cam"] == "c01/seg-grad-cam_bottleneck.nrrd"
    # The model card's class for c04 ("grey matter") explains another class than the others.
    assert json.loads((out / "c04" / MANIFEST_FILE).read_text())["inputs"]["class"] == "grey matter"


def test_a_second_run_redoes_only_the_failed_case(cohort, tmp_path):
    table, _, first = cohort
    out = copy_run(cohort, tmp_path)
    manifests = {c: (out / c / MANIFEST_FILE).read_bytes() for c in ("c01", "c02", "c04")}
    before = (out / RESULTS_FILE).read_text()
    second = rerun(table, out)
    assert second.rows == first.rows
    assert (out / RESULTS_FILE).read_text() == before
    for case, manifest in manifests.items():
        assert (out / case / MANIFEST_FILE).read_bytes() == manifest
        assert len(events(out, case, "started")) == 1 and len(events(out, case, "finished")) == 1
    assert len(events(out, BAD_CASE, "started")) == 2 and len(events(out, BAD_CASE, "failed")) == 2


def test_a_half_written_or_changed_case_is_redone_and_nothing_else(cohort, tmp_path):
    table, _, first = cohort
    out = copy_run(cohort, tmp_path)
    (out / "c01" / MANIFEST_FILE).unlink()  # stopped after the heatmaps, before the manifest
    (out / "c02" / "seg-grad-cam_bottleneck.nrrd").unlink()  # a heatmap lost since
    (out / "c04" / MANIFEST_FILE).write_text("{not json")  # a damaged manifest
    second = rerun(table, out)
    assert [(r.case, r.status, r.roi_voxels) for r in second] == [(r.case, r.status, r.roi_voxels) for r in first]
    for case in ("c01", "c02", "c04"):
        assert len(events(out, case, "finished")) == 2
    # A changed row (c02 given a region, c01's, on another grid) is redone; the untouched rows are not.
    rows = read_table(table)
    rows[1]["roi"] = "c01_wm.nrrd"
    changed = tmp_path / "changed.csv"
    with changed.open("w", newline="", encoding="utf-8") as stream:
        writer = csv.DictWriter(stream, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({**row, "image": str(table.parent / row["image"]),
                          "roi": str(table.parent / row["roi"]) if row["roi"] else ""} for row in rows)
    third = {row.case: row for row in rerun(changed, out)}
    # c01's region lies on the same voxel lattice as c02's crop, shifted: it is placed voxel for voxel
    # (no resampling, no warning), so its size in c02 is the count of c01's region voxels inside c02's box.
    assert third["c02"].status == "ok" and "resampled" not in " ".join(third["c02"].warnings)
    assert third["c02"].roi_voxels == region_voxels_inside(table.parent / "c01_wm.nrrd", table.parent / rows[1]["image"])
    assert json.loads((out / "c02" / MANIFEST_FILE).read_text())["inputs"]["roi"] == str(table.parent / "c01_wm.nrrd")
    assert [len(events(out, case, "started")) for case in ("c01", "c02", "c04")] == [2, 3, 2]


def test_an_interrupted_run_keeps_what_is_done_and_the_rerun_finishes_it(cohort, tmp_path):
    table, _, first = cohort
    out = tmp_path / "out"

    def stop_after_the_first_case(result: CaseResult) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        rerun(table, out, reports=Reports(on_result=stop_after_the_first_case))
    stopped = read_table(out / RESULTS_FILE)
    assert [r["status"] for r in stopped] == ["ok", "skipped", "skipped", "skipped"]
    assert "run the same command again" in stopped[1]["error"]
    second = rerun(table, out)
    assert [(r.case, r.status, r.roi_voxels, r.outputs) for r in second] == [
        (r.case, r.status, r.roi_voxels, r.outputs) for r in first]
    for case in ("c01", "c02", "c04"):
        assert len(events(out, case, "finished")) == 1, case  # no case done twice
    assert not list(out.rglob("*.partial*"))


def test_other_settings_for_the_same_folder_are_refused_but_another_device_resumes(cohort, tmp_path):
    table, _, _ = cohort
    out = copy_run(cohort, tmp_path)
    with pytest.raises(InputError, match=r"other settings \(methods \['seg-hires-grad-cam', 'seg-grad-cam'\] before, "
                                         r"\['seg-grad-cam'\] now\); choose another output folder"):
        rerun(table, out, dataclasses.replace(SETTINGS, methods=("seg-grad-cam",)))
    with pytest.raises(InputError, match="layers"):
        rerun(table, out, dataclasses.replace(SETTINGS, layers=("decoder.0",)))
    rerun(table, out, dataclasses.replace(SETTINGS, device="auto", batch_size=4))
    assert len(events(out, "c01", "started")) == 1


def test_a_folder_holding_something_else_or_in_use_is_refused(cohort, tmp_path):
    table, _, _ = cohort
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(InputError, match="is not empty and holds no cohort"):
        rerun(table, tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["mine.txt"]
    out = tmp_path / "out"
    job = prepare_job(MODEL, SETTINGS, out)
    with CohortStore.open(job):
        with pytest.raises(InputError, match="another seghirescam batch is writing to"):
            CohortStore.open(job)
    CohortStore.open(job).close()  # free again once the first run has let go
    assert sorted(p.name for p in out.iterdir()) == [".cohort.lock", COHORT_FILE]


def test_a_missing_model_or_one_that_is_code_is_refused_before_anything_runs(cohort, tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        prepare_job(tmp_path / "nope.pt", SETTINGS, tmp_path / "out")
    (tmp_path / "net.py").write_text("def build_model():\n    pass\n")
    with pytest.raises(InputError, match="--trust-code"):
        prepare_job(tmp_path / "net.py", SETTINGS, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_the_service_uses_a_model_already_loaded(cohort, tmp_path):
    table, out, _ = cohort
    case = read_cases(table)[0]
    # No file at the request's model path: only the given model can have run.
    result = run_request(ExplainRequest(images=case.images, model=str(tmp_path / "absent.pt"), settings=SETTINGS,
                                        outputs=(str(tmp_path / "a.nrrd"), str(tmp_path / "b.nrrd")), roi=case.roi),
                         model=load_model(MODEL))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(heatmap(tmp_path / "a.nrrd")),
                                  sitk.GetArrayFromImage(heatmap(out / "c01" / "seg-hires-grad-cam_bottleneck.nrrd")))
    assert result.roi_voxels > 0


def test_batch_without_dask_runs_in_this_process_and_says_how_to_get_workers(cohort, tmp_path, capsys, monkeypatch):
    table, done, _ = cohort
    monkeypatch.setitem(sys.modules, "distributed", None)  # what Python does when a package is not installed
    argv = ["batch", "--cases", str(table), "--out", str(tmp_path / "out"), "--model", str(MODEL), "--class",
            str(WHITE_MATTER), "--methods", *METHODS, "--device", "cpu"]
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 1
    assert "Dask is not installed" in captured.out and "pip install 'seghirescam[cohort]'" in captured.out
    assert f"case {BAD_CASE} failed: the image" in captured.err
    assert captured.err.strip().splitlines()[-1].startswith("seghirescam: error: 1 of 4 cases failed")
    assert "3 of 4 cases explained, 1 failed" in captured.out
    for case in ("c01", "c02", "c04"):
        for method in METHODS:
            name = f"{case}/{method}_bottleneck.nrrd"
            np.testing.assert_array_equal(sitk.GetArrayFromImage(heatmap(tmp_path / "out" / name)),
                                          sitk.GetArrayFromImage(heatmap(done / name)))
    assert main(argv + ["--workers", "2"]) == 1  # workers are a wish: still one process, same outputs
    assert len(events(tmp_path / "out", "c01", "started")) == 1
    assert main(argv + ["--scheduler", "tcp://127.0.0.1:1"]) == 1
    assert "--scheduler needs Dask, which is not installed; pip install 'seghirescam[cohort]'" in capsys.readouterr().err


def test_meter_counts_cases_done_before_without_counting_them_in_the_rate(monkeypatch):
    clock = iter([100.0, 160.0, 220.0])
    monkeypatch.setattr("SegHiResCAMLib.cohort.meter.time.monotonic", lambda: next(clock))
    meter = CohortMeter(total=10, done_before=4)
    meter.add(CaseResult("a", "ok"))
    meter.add(CaseResult("b", "failed"))
    assert meter.fraction == 0.6
    # 2 cases in 60 s (monotonic 100 -> 160): 2 per minute, 4 left: 2 minutes.
    assert meter.message() == "6/10 cases (1 failed), 2.0 cases/min, about 2 min left"


def test_a_model_retrained_under_the_same_path_is_loaded_again_not_served_from_the_cache(cohort, tmp_path):
    table, _, _ = cohort
    model = tmp_path / "model" / "demo_unet3d.pt"
    model.parent.mkdir()
    shutil.copy(MODEL, model)
    shutil.copy(MODEL.with_suffix(".json"), model.with_suffix(".json"))
    cases = read_cases(table)[:1]
    run_cohort(cases, prepare_job(model, SETTINGS, tmp_path / "before"), InProcess())
    weights = torch.load(model, weights_only=True)
    name = next(key for key, value in weights.items() if key.endswith("weight") and value.ndim == 5)
    weights[name] = weights[name] * 1.5
    torch.save(weights, model)  # "retrained": same path, new contents
    run_cohort(cases, prepare_job(model, SETTINGS, tmp_path / "after"), InProcess())
    assert events(tmp_path / "after", "c01", "finished")[0]["model"] == "loaded"
    after = heatmap(tmp_path / "after" / "c01" / "seg-hires-grad-cam_bottleneck.nrrd")
    before = heatmap(tmp_path / "before" / "c01" / "seg-hires-grad-cam_bottleneck.nrrd")
    assert not np.array_equal(sitk.GetArrayFromImage(after), sitk.GetArrayFromImage(before))
    case = cases[0]
    reference = run_request(ExplainRequest(images=case.images, model=str(model), settings=SETTINGS, roi=case.roi,
                                           outputs=(str(tmp_path / "a.nrrd"), str(tmp_path / "b.nrrd"))))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(after), reference.maps["seg-hires-grad-cam"].array)


def test_the_attempt_log_leaves_out_a_line_still_being_written(tmp_path):
    (tmp_path / "c01").mkdir()
    (tmp_path / "c01" / ATTEMPTS_FILE).write_text('{"event": "started", "pid": 1}\n{"event": "fini', encoding="utf-8")
    assert read_attempts(tmp_path, "c01") == [{"event": "started", "pid": 1}]
    assert read_attempts(tmp_path, "c02") == []


def test_the_local_plan_shares_the_cores_and_refuses_a_gpu_that_is_not_there(monkeypatch):
    from SegHiResCAMLib.cohort import cluster

    monkeypatch.setattr(cluster, "cpu_count", lambda: 16)
    assert cluster.plan_local(None, "cpu") == cluster.LocalPlan(workers=2, threads=8, gpus=0)
    assert cluster.plan_local(3, "cpu") == cluster.LocalPlan(workers=3, threads=5, gpus=0)
    monkeypatch.setattr(cluster, "cpu_count", lambda: 1)
    assert cluster.plan_local(None, "cpu") == cluster.LocalPlan(workers=1, threads=1, gpus=0)
    with pytest.raises(InputError, match="positive number"):
        cluster.plan_local(0, "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="cannot use one here"):
            cluster.plan_local(None, "cuda")
