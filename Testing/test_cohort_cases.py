"""Cohort cases: the CSV table and the folder of images, and every table problem refused before any work."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from SegHiResCAMLib.cohort.cases import Case, check_case_id, image_stem, read_cases
from SegHiResCAMLib.errors import InputError


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_table_paths_are_taken_from_the_tables_folder_and_ids_default_to_the_image_name(tmp_path):
    table = write(tmp_path / "study" / "cases.csv",
                  "Image,ROI,roi_label,class,case\n"
                  "scans/sub-01_T1w.nii.gz,masks/sub-01.seg.nrrd,tumor,2,\n"
                  f"{tmp_path / 'elsewhere' / 'b.nrrd'},,,,beta\n"
                  ",,,,\n"  # an empty row (a spreadsheet's trailing line) is no case
                  "dicom/series7,,3,grey matter,\n")
    first, second, third = read_cases(table)
    assert first == Case("sub-01_T1w", (str(tmp_path / "study" / "scans" / "sub-01_T1w.nii.gz"),),
                         roi=str(tmp_path / "study" / "masks" / "sub-01.seg.nrrd"), roi_label="tumor", target_class=2)
    assert second == Case("beta", (str(tmp_path / "elsewhere" / "b.nrrd"),))
    assert third.case_id == "series7" and third.roi_label == 3 and third.target_class == "grey matter"


def test_channel_columns_give_one_image_per_channel_in_their_number_order(tmp_path):
    # Columns in any order in the file; the channels follow image, image_2, image_3.
    table = write(tmp_path / "cases.csv", "image_3,case,image,image_2\nflair.nrrd,p1,t1.nrrd,t2.nrrd\n")
    (case,) = read_cases(table)
    assert case.images == tuple(str(tmp_path / name) for name in ("t1.nrrd", "t2.nrrd", "flair.nrrd"))


@pytest.mark.parametrize("text, words", [
    ("image,notes\na.nrrd,x\n", "unknown columns ['notes']"),
    ("case,roi\np1,r.nrrd\n", "no 'image' column"),
    ("image,image_3\na.nrrd,c.nrrd\n", "without gaps from image_2"),
    ("image,image_2\na.nrrd,\n", "cases.csv line 2: image_2 is empty"),
    ("image,case\na.nrrd,P1\nb.nrrd,p1\n", "occurs as 'P1' and 'p1'"),
    ("image\nsub/a.nrrd\nother/a.nrrd\n", "'a' occurs twice"),
    ("image,case\na.nrrd,../up\n", "cannot be a folder name"),
    ("image,case\na.nrrd,results.csv\n", "the name is reserved"),
    ("image,case\na.nrrd,con\n", "the name is reserved"),
    ("image\n", "has no rows"),
    ("image,image\na.nrrd,b.nrrd\n", "names the columns ['image'] twice"),
    ("image\na.nrrd,extra\n", "line 2 has 2 values"),
])
def test_table_problems_refuse_the_whole_cohort_naming_the_fix(tmp_path, text, words):
    table = write(tmp_path / "cases.csv", text)
    with pytest.raises(InputError) as caught:
        read_cases(table)
    assert words in str(caught.value)


def test_a_trailing_comma_and_a_spreadsheets_byte_order_mark_are_accepted(tmp_path):
    table = tmp_path / "cases.csv"
    table.write_bytes("\ufeffimage,case,\na.nrrd,p1,\n".encode("utf-8"))
    (case,) = read_cases(table)
    assert case.case_id == "p1"


def test_folder_gives_one_case_per_image_file_sorted_and_ignores_the_rest(tmp_path):
    for name in ("b.nii.gz", "a.nrrd", "notes.txt", ".hidden.nrrd", "c.mha"):
        write(tmp_path / name, "x")
    (tmp_path / "series").mkdir()
    cases = read_cases(tmp_path)
    assert [c.case_id for c in cases] == ["a", "b", "c"]
    assert cases[1].images == (str(tmp_path / "b.nii.gz"),)


def test_an_empty_folder_and_a_missing_table_are_refused(tmp_path):
    with pytest.raises(InputError, match="holds no image files"):
        read_cases(tmp_path)
    with pytest.raises(InputError, match="do not exist"):
        read_cases(tmp_path / "cases.csv")


def test_cases_may_be_given_as_rows_with_the_tables_columns(tmp_path):
    cases = read_cases([{"image": str(tmp_path / "x.nrrd"), "class": 1.0, "roi": float("nan")},
                        Case("y", (str(tmp_path / "y.nrrd"),))])
    assert cases[0] == Case("x", (str(tmp_path / "x.nrrd"),), target_class=1)
    with pytest.raises(InputError, match="no case"):
        read_cases([])


@pytest.mark.parametrize("name", ["sub-01", "Patient 7", "a.b_c+d", "Müller"])
def test_safe_case_ids(name):
    assert check_case_id(name) == name


@pytest.mark.parametrize("name", ["", "a/b", "a\\b", ".hidden", "trailing.", "trailing ", "x" * 129, "nul.txt",
                                  "a:b", "tab\there"])
def test_unsafe_case_ids(name):
    with pytest.raises(InputError):
        check_case_id(name)


def test_image_stem_drops_the_whole_image_extension():
    assert image_stem("/x/sub-01_T1w.nii.gz") == "sub-01_T1w"
    assert image_stem("scan.NRRD") == "scan"
    assert image_stem("dicom_folder") == "dicom_folder"


def test_the_cohort_modules_import_without_torch_or_dask():
    """``seghirescam --help`` and a notebook's import of the cohort API need neither (Dask is an extra)."""
    blocked = ["torch", "dask", "distributed"]
    code = (
        "import sys\n"
        f"for name in {blocked!r}:\n"
        "    sys.modules[name] = None  # 'import name' now raises ImportError\n"
        "import SegHiResCAMLib.cli, SegHiResCAMLib.cohort.runner, SegHiResCAMLib.cohort.command\n"
        "from SegHiResCAMLib.cohort import explain_cohort\n"
        "from SegHiResCAMLib.cohort.cluster import dask_available\n"
        "print(dask_available())\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(Path(__file__).resolve().parents[1] / "SegHiResCAM"),
                               "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
