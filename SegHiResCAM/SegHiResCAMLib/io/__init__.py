"""Files in and out: image volumes, region files and output checks, through SimpleITK (NRRD, NIfTI, DICOM series)."""

from __future__ import annotations

from .images import read_image, write_image
from .outputs import check_output_file, staged_folder
from .regions import read_mask

__all__ = ["check_output_file", "read_image", "read_mask", "staged_folder", "write_image"]
