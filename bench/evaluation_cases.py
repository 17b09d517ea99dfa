"""Real 3D volumes that installed Python packages ship (offline), as cases for bench_evaluation.py.

Each distinct scan is one case; resampled or cropped variants of a scan would be augmentations,
not cases, and are not made. Cases whose package is not installed are skipped with a note.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from SegHiResCAMLib.io.images import read_image
from SegHiResCAMLib.volume import Volume, ijk_to_ras_from_itk

DATA = Path(__file__).resolve().parents[1] / "SegHiResCAM" / "SegHiResCAMLib" / "data"


@dataclass(frozen=True)
class Case:
    """One scan: its name in the table, where it comes from, what it is, and how to read it."""

    name: str
    package: str
    relative: str
    description: str
    frame: int | None = None  # the volume to take from a 4D file

    def path(self) -> Path | None:
        if self.package == "seghirescam":
            return DATA / self.relative
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            return None
        return Path(list(spec.submodule_search_locations)[0]) / self.relative

    def read(self) -> Volume:
        path = self.path()
        if self.frame is None:
            return read_image(path)
        image = sitk.ReadImage(str(path))
        size = list(image.GetSize())
        size[3] = 0
        volume = sitk.Extract(image, size, [0, 0, 0, self.frame], sitk.ExtractImageFilter.DIRECTIONCOLLAPSETOSUBMATRIX)
        array = sitk.GetArrayFromImage(volume).astype(np.float32)
        return Volume(array, ijk_to_ras_from_itk(volume.GetOrigin(), volume.GetSpacing(), volume.GetDirection()))


CASES = (
    Case("mni152-t1 (training image)", "seghirescam", "mni152_t1_2mm.nii.gz",
         "MNI ICBM152 2009a T1 template at 2 mm (the demo models were trained on it)"),
    Case("nibabel-anatomical", "nibabel", "tests/data/anatomical.nii", "a subject's T1, 2 mm, 33x41x25 (nibabel tests)"),
    Case("dipy-aniso-vox", "dipy", "data/files/aniso_vox.nii.gz", "a head scan at 4x4x5 mm, 58x58x24 (dipy tests)"),
    Case("nibabel-example4d-epi", "nibabel", "tests/data/example4d.nii.gz",
         "an EPI (T2*) volume, 2x2x2.2 mm, first of 2 frames (nibabel tests)", frame=0),
)
# Not a case: dipy's S0_10slices.nii.gz (its affine is not orthonormal: ITK refuses to read it).


def available_cases(names: list[str] | None = None, warn: Callable[[str], None] = print) -> list[Case]:
    """The cases whose files are installed (optionally only the named ones, in the order given)."""
    by_name = {c.name: c for c in CASES}
    unknown = [n for n in names or [] if n not in by_name]
    if unknown:
        raise SystemExit(f"unknown case {unknown[0]!r}; cases: {', '.join(by_name)}")
    chosen = list(CASES) if names is None else [by_name[n] for n in names]
    found = []
    for case in chosen:
        path = case.path()
        if path is None or not path.is_file():
            warn(f"skipping {case.name}: {case.package} is not installed (pip install {case.package})")
            continue
        found.append(case)
    return found
