"""Read a region (ROI) file onto an image's voxel grid: one label, one segment, or a weight map.

The rule (README "Regions"; :mod:`SegHiResCAMLib.region` for arrays):

- A file of whole numbers is a label map. A label value, or a segment name or ID of a Slicer
  ``.seg.nrrd``, picks one region; without a choice, the file's only non-zero label (or only
  segment) is the region. Label 0 is never picked implicitly.
- A file with non-integer values is a weight map m(p) in [0, 1] (a soft mask, a probability
  map), used as the region's weights; a label choice does not apply to it. NaN, infinite
  values and values outside [0, 1] are refused.
- A ``.seg.nrrd`` whose segments overlap (several layers) gives the chosen segment from its
  own layer and label value.
- On another grid, labels are resampled by nearest neighbour and weights linearly, with a
  warning; a region that covers no voxel of the image is refused like an empty file.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..errors import InputError, SegHiResCAMWarning
from ..region import check_weights, holds_whole_numbers
from ..volume import Volume
from .itk import check_scalar_3d, itk_from_volume, read_itk_image, same_grid, voxel_offset_on
from .seg_nrrd import SegmentEntry, describe_segments, find_segments, segment_mask, segments_of

ROLE = "region file"


def _listed(values, limit: int = 20) -> str:
    shown = ", ".join(str(v) for v in values[:limit])
    return shown + (" ..." if len(values) > limit else "")


def _as_label_value(label: int | str) -> int | None:
    """The label value a choice names (``3``, ``"3"``), or None for a segment name."""
    if isinstance(label, (int, np.integer)):
        return int(label)
    text = str(label).strip()
    return int(text) if text.lstrip("-").isdigit() else None


def _chosen_segment(segments: list[SegmentEntry], label: int | str | None, source: Path) -> SegmentEntry:
    """The segment a choice names in a ``.seg.nrrd``: by name, ID, or a label value only one segment has."""
    listed = describe_segments(segments)
    if label is None:
        if len(segments) == 1:
            return segments[0]
        raise InputError(
            f"the region file {source.name} holds {len(segments)} segments ({listed}); choose one by name with "
            "--roi-label"
        )
    value = _as_label_value(label)
    if value is None:
        found = find_segments(segments, str(label))
        if not found:
            raise InputError(f"{source.name} has no segment named {str(label)!r}; segments: {listed}")
    else:
        found = [entry for entry in segments if entry.label_value == value]
        if not found:
            raise InputError(f"no segment of {source.name} has label value {value}; segments: {listed}")
    if len(found) > 1:
        raise InputError(
            f"{len(found)} segments of {source.name} match {label!r} ({describe_segments(found)}); "
            "choose one by its name or ID"
        )
    return found[0]


def _label_value(array: np.ndarray, label: int | str | None, source: Path) -> int:
    """The label of a plain label map (no segment header) that the choice names."""
    present = [int(v) for v in np.unique(array)]
    labels = [v for v in present if v != 0]
    if label is None:
        if not labels:
            raise InputError(f"the region file {source.name} is empty (all voxels are 0); draw the region first")
        if len(labels) > 1:
            raise InputError(
                f"the region file {source.name} holds several labels ({_listed(labels)}); choose one with --roi-label"
            )
        return labels[0]
    value = _as_label_value(label)
    if value is None:
        raise InputError(
            f"{source.name} has no segment names (it is a plain label map), so {str(label)!r} names nothing; "
            f"choose a label value: {_listed(labels) or 'none, all voxels are 0'}"
        )
    if value not in present:
        present_text = _listed(labels) or "none (all voxels are 0)"
        raise InputError(f"label {value} does not occur in {source.name}; labels present: {present_text}")
    return value


def _region_on_file_grid(image: sitk.Image, label: int | str | None, source: Path) -> tuple[np.ndarray, str]:
    """The region on the file's own grid (bool mask or float32 weights) and how to name it in messages."""
    segments = segments_of(image, source)
    if image.GetNumberOfComponentsPerPixel() > 1 and image.GetDimension() == 3:
        if not segments:
            raise InputError(
                f"{source.name} has {image.GetNumberOfComponentsPerPixel()} values per voxel and no Slicer segment "
                "header; give a label map or a weight map with one value per voxel"
            )
        entry = _chosen_segment(segments, label, source)
        return segment_mask(image, entry), f"the segment {entry.describe()} of {source.name}"
    check_scalar_3d(image, source)
    array = sitk.GetArrayViewFromImage(image)
    if not holds_whole_numbers(array):
        if label is not None:
            raise InputError(
                f"the region file {source.name} is a weight map (values between whole numbers), so the label "
                f"choice {label!r} does not apply; leave --roi-label out to use its values as weights, "
                "or give a label map"
            )
        check_weights(array, f"the region file {source.name}")
        return array.astype(np.float32), f"the weight map {source.name}"
    if segments:
        entry = _chosen_segment(segments, label, source)
        return array == entry.label_value, f"the segment {entry.describe()} of {source.name}"
    value = _label_value(array, label, source)
    return array == value, f"label {value} of {source.name}"


def _placed(region: np.ndarray, offset_ijk: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """The region copied onto a grid that holds its own at a whole-voxel offset (exact, no interpolation)."""
    out = np.zeros(shape, dtype=region.dtype)
    start = [int(v) for v in offset_ijk[::-1]]  # (i, j, k) -> array order (k, j, i)
    target, source = [], []
    for axis in range(3):
        low, high = max(start[axis], 0), min(start[axis] + region.shape[axis], shape[axis])
        if low >= high:
            return out
        target.append(slice(low, high))
        source.append(slice(low - start[axis], high - start[axis]))
    out[tuple(target)] = region[tuple(source)]
    return out


def _resampled(region: np.ndarray, image: sitk.Image, reference: Volume) -> np.ndarray:
    """The region on the reference's grid: labels by nearest neighbour, weights linearly."""
    weights = region.dtype != np.bool_
    stored = sitk.GetImageFromArray(region.astype(np.float32 if weights else np.uint8))
    stored.SetOrigin(image.GetOrigin())
    stored.SetSpacing(image.GetSpacing())
    stored.SetDirection(image.GetDirection())
    grid = itk_from_volume(reference, np.zeros(reference.spatial_shape, np.uint8))
    interpolator, pixel = (sitk.sitkLinear, sitk.sitkFloat32) if weights else (sitk.sitkNearestNeighbor, sitk.sitkUInt8)
    moved = sitk.GetArrayFromImage(sitk.Resample(stored, grid, sitk.Transform(), interpolator, 0, pixel))
    # Linear interpolation of weights in [0, 1] stays in [0, 1] up to float32 rounding; clip that away.
    return np.clip(moved, 0.0, 1.0) if weights else moved.astype(bool)


def read_mask(path: str | Path, reference: Volume, *, label: int | str | None = None) -> np.ndarray:
    """Read a region file onto the reference volume's grid (see the module docstring for the rule).

    Args:
        path: a label map, a Slicer ``.seg.nrrd`` (one layer or several), or a weight map in
            [0, 1]; NRRD, NIfTI, or anything SimpleITK reads.
        reference: the image the region belongs to; the region comes back in its ``(K, J, I)`` grid.
        label: a label value, or a segment name or ID of a ``.seg.nrrd``; None takes the file's
            only label or segment. Must be None for a weight map.

    Returns:
        A bool mask (labels, segments), or float32 weights in [0, 1] (weight maps), of
        ``reference.spatial_shape``.

    Raises:
        InputError: missing or unreadable file, no or several labels without a choice, a choice
            that is absent or does not apply, weights outside [0, 1] or NaN, or a region that
            covers no voxel of the image.
    """
    source = Path(path)
    image = read_itk_image(source, role=ROLE)
    region, what = _region_on_file_grid(image, label, source)
    if not region.any():
        raise InputError(f"{what} is empty (no voxel is in the region); draw the region first")
    resampled = False
    if same_grid(image, reference):
        on_grid = np.ascontiguousarray(region)
    else:
        offset = voxel_offset_on(image, reference)
        resampled = offset is None
        if resampled:
            on_grid = _resampled(region, image, reference)
        else:
            on_grid = _placed(region, offset, reference.spatial_shape)
    if not on_grid.any():
        raise InputError(
            f"{what} covers no voxel of the image once placed on the image's grid (it lies outside the image); "
            "check that the region belongs to this image"
        )
    if resampled:
        warnings.warn(
            f"{what} lies on another voxel grid than the image; it was resampled onto the image's grid "
            f"({'nearest neighbour' if on_grid.dtype == np.bool_ else 'linearly'})",
            SegHiResCAMWarning,
            stacklevel=2,
        )
    return on_grid
