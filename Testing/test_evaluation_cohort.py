"""``seghirescam evaluate --cases``: a cohort of crops, one bad case recorded, one table and report, resumable."""

from __future__ import annotations

import csv

import pytest
import SimpleITK as sitk
from cohort_data import BAD_CASE, DATA, MODEL, write_cohort

from SegHiResCAMLib.cli import main
from SegHiResCAMLib.evaluation.report import read_metrics_csv

pytest.importorskip("scipy")
pytest.importorskip("matplotlib")

# case -> (i, j, k) start, (i, j, k) size, with a region?, class: small crops of the MNI152 T1 with white matter
CASES = {
    "c01": ((30, 34, 34), (16, 16, 16), True, None),
    "c03": ((32, 22, 40), (16, 16, 16), True, None),
}
OPTIONS = ["--model", str(MODEL), "--class", "2", "--layer", "bottleneck", "--methods", "seg-hires-grad-cam",
           "seg-grad-cam", "--steps", "3", "--randomisation-points", "1", "--no-viewer", "--device", "cpu"]
COST = {"seconds", "peak_mib"}  # measured, so they differ between runs


def status(out):
    with (out / "cases.csv").open(newline="", encoding="utf-8") as stream:
        return {row["case"]: row for row in csv.DictReader(stream)}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    folder = tmp_path_factory.mktemp("evaluate_cohort")
    table = write_cohort(folder / "data", CASES, bad=True)
    out = folder / "out"
    return table, out


@pytest.fixture(scope="module")
def first_run(cohort):
    table, out = cohort
    code = main(["evaluate", "--cases", str(table), *OPTIONS, "--out", str(out)])
    return code


def test_the_bad_case_is_recorded_and_the_others_are_evaluated(cohort, first_run, capsys):
    table, out = cohort
    assert first_run == 1  # a case failed: the exit status says so
    rows = status(out)
    assert list(rows) == ["c01", "c03", BAD_CASE]  # the table's order
    assert rows[BAD_CASE]["status"] == "failed" and "missing_t1.nrrd" in rows[BAD_CASE]["error"]
    assert all(rows[case]["status"] == "ok" and rows[case]["error"] == "" for case in CASES)
    for case in CASES:  # each case's own report, with its pictures
        assert (out / "cases" / case / "report.html").is_file()
        assert list((out / "cases" / case / "pictures").glob("*.png"))
    assert not (out / "cases" / BAD_CASE).exists()


def test_one_long_table_holds_every_case_as_its_own_report_has_it(cohort, first_run):
    _, out = cohort
    rows = read_metrics_csv(out / "metrics.csv")
    assert sorted({row[0] for row in rows}) == sorted(CASES)
    # exact: the cohort's table is the cases' tables, each value written once with repr and read back
    assert rows == [row for case in CASES for row in read_metrics_csv(out / "cases" / case / "metrics.csv")]
    methods = {row[1] for row in rows}
    assert {"seg-hires-grad-cam", "seg-grad-cam", "random", "region", "blob"} <= methods


def test_a_cohort_case_has_the_values_of_the_same_case_evaluated_alone(cohort, first_run, tmp_path):
    table, out = cohort
    case = "c03"
    alone = tmp_path / "alone"
    code = main(["evaluate", "--image", str(table.parent / f"{case}_t1.nrrd"), "--roi",
                 str(table.parent / f"{case}_wm.nrrd"), *OPTIONS, "--out", str(alone)])
    assert code == 0
    single = {(m, l, k): v for _, m, l, k, v in read_metrics_csv(alone / "metrics.csv") if k not in COST}
    cohort_rows = {(m, l, k): v for c, m, l, k, v in read_metrics_csv(out / "metrics.csv") if c == case and k not in COST}
    # exact: the same code on the same files in one process, values written with repr
    assert cohort_rows.keys() == single.keys()
    for key, value in single.items():
        assert cohort_rows[key] == value or (value != value and cohort_rows[key] != cohort_rows[key]), key


def test_the_report_compares_the_methods_across_the_cases_and_names_the_failure(cohort, first_run):
    _, out = cohort
    page = (out / "report.html").read_text(encoding="utf-8")
    assert f"Paired comparison with seg-hires-grad-cam across {len(CASES)} cases" in page
    assert "Wilcoxon" in page and "bootstrap 95% interval" in page
    for case in CASES:
        assert f'href="cases/{case}/report.html"' in page
    assert "1 case failed" in page and BAD_CASE in page and "missing_t1.nrrd" in page


def test_a_rerun_skips_complete_cases_and_redoes_the_fixed_one(cohort, first_run, capsys):
    table, out = cohort
    before = {case: (out / "cases" / case / "case.json").stat().st_mtime_ns for case in CASES}
    old_rows = read_metrics_csv(out / "metrics.csv")
    # the bad case's image appears (a crop like the others); its row stays as it is: no region, so
    # the model's own prediction of white matter is the region
    image = sitk.ReadImage(str(DATA / "mni152_t1_2mm.nii.gz"))
    sitk.WriteImage(image[28:44, 30:46, 34:50], str(table.parent / "missing_t1.nrrd"))
    capsys.readouterr()
    code = main(["evaluate", "--cases", str(table), *OPTIONS, "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    rows = status(out)
    assert all(row["status"] == "ok" for row in rows.values())
    # complete cases were not redone: their records are the same files, their values the same
    assert before == {case: (out / "cases" / case / "case.json").stat().st_mtime_ns for case in CASES}
    new_rows = read_metrics_csv(out / "metrics.csv")
    assert [row for row in new_rows if row[0] != BAD_CASE] == old_rows
    assert {row[0] for row in new_rows} == {*CASES, BAD_CASE}


def test_other_settings_for_the_same_folder_are_refused_before_any_case(cohort, first_run, capsys):
    table, out = cohort
    listing = sorted(p.relative_to(out) for p in out.rglob("*"))
    capsys.readouterr()
    assert main(["evaluate", "--cases", str(table), *OPTIONS, "--steps", "5", "--out", str(out)]) == 1
    line = capsys.readouterr().err.strip()
    assert line.startswith("seghirescam: error: ") and "other settings" in line and "\n" not in line
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == listing


def test_a_folder_of_other_files_and_a_roi_option_are_refused(cohort, tmp_path, capsys):
    table, _ = cohort
    (tmp_path / "notes.txt").write_text("mine", encoding="utf-8")
    assert main(["evaluate", "--cases", str(table), *OPTIONS, "--out", str(tmp_path)]) == 1
    assert "not an evaluation's" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    assert main(["evaluate", "--cases", str(table), *OPTIONS, "--roi", str(table), "--out", str(tmp_path / "x")]) == 1
    assert "roi and roi_label columns" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
