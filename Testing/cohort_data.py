"""A small cohort for the cohort tests and the benchmark: crops of the bundled MNI152 T1, each with
its own geometry (the crop's origin), some with a white-matter region, and optionally a bad case."""

from __future__ import annotations

import csv
from pathlib import Path

import SimpleITK as sitk

DATA = Path(__file__).resolve().parents[1] / "SegHiResCAM" / "SegHiResCAMLib" / "data"
MODEL = DATA / "demo_unet3d.pt"
WHITE_MATTER = 2

# case -> (i, j, k) start, (i, j, k) size, with a region?, class (None = the command's)
CROPS = {
    "c01": ((28, 30, 30), (24, 24, 24), True, None),
    "c02": ((20, 40, 24), (24, 24, 24), False, None),
    "c03": ((30, 20, 40), (28, 24, 20), True, None),
    "c04": ((40, 44, 28), (24, 20, 24), False, "grey matter"),
    "c05": ((24, 36, 36), (20, 24, 24), True, None),
}
# Smaller crops for the tests that run in the test's own process.
SMALL = {
    "c01": ((30, 34, 34), (16, 16, 16), True, None),
    "c02": ((24, 40, 28), (16, 16, 20), False, 1),  # too small a crop for the model to see white matter
    "c04": ((40, 44, 28), (16, 12, 16), False, "grey matter"),
}
BAD_CASE = "bad"


def write_cohort(folder: Path, cases: dict | None = None, bad: bool = True, big: str | None = None) -> Path:
    """Write crop images (and regions) into ``folder`` and a cases.csv naming them; return the CSV.

    ``bad`` adds a case whose image does not exist; ``big`` names a case cropped to 48^3 (slower).
    """
    folder.mkdir(parents=True, exist_ok=True)
    image = sitk.ReadImage(str(DATA / "mni152_t1_2mm.nii.gz"))
    white = sitk.ReadImage(str(DATA / "mni152_wm_2mm.nrrd"))
    rows = []
    for case, (start, size, with_roi, target) in (cases or CROPS).items():
        if case == big:
            start, size = (16, 24, 16), (48, 48, 48)
        box = tuple(slice(s, s + n) for s, n in zip(start, size))
        sitk.WriteImage(image[box], str(folder / f"{case}_t1.nrrd"))
        roi = ""
        if with_roi:
            sitk.WriteImage(white[box], str(folder / f"{case}_wm.nrrd"))
            roi = f"{case}_wm.nrrd"
        rows.append({"case": case, "image": f"{case}_t1.nrrd", "roi": roi, "class": "" if target is None else target})
    if bad:
        rows.insert(2, {"case": BAD_CASE, "image": "missing_t1.nrrd", "roi": "", "class": ""})
    table = folder / "cases.csv"
    with table.open("w", newline="", encoding="utf-8") as stream:
        writer = csv.DictWriter(stream, fieldnames=["case", "image", "roi", "class"])
        writer.writeheader()
        writer.writerows(rows)
    return table
