"""Files in and out: image volumes and ROI masks through SimpleITK (NRRD, NIfTI, DICOM series)."""

from __future__ import annotations

from .images import read_image, read_mask, write_image

__all__ = ["read_image", "read_mask", "write_image"]
