"""What a region (ROI) array means: a mask of labels, or a weight map m(p) in [0, 1].

The rule, shared by region files (``io.regions``) and arrays given to the pipeline:

- integer values (any dtype, including floats that hold whole numbers) are labels: the
  region is where the values are non-zero (a file's label values are chosen in ``io.regions``);
- non-integer values are weights m(p) in [0, 1] (a soft mask, a probability map), used as
  they are in the target ``y = sum_p m(p) z_c(p)``; never rounded, so a 0.5 never becomes 0;
- NaN, infinite values and weights outside [0, 1] are refused, with what to do.

numpy only: the Slicer panel may import this without torch.
"""

from __future__ import annotations

import numpy as np

from .errors import InputError


def holds_whole_numbers(values: np.ndarray) -> bool:
    """Whether every value is a whole number (always true for integer and bool arrays)."""
    values = np.asarray(values)
    if values.dtype.kind in "biu":
        return True
    if values.dtype.kind != "f":
        return False
    # NaN and infinities are not whole numbers; np.isfinite catches them before the comparison.
    return bool(np.isfinite(values).all() and np.array_equal(values, np.round(values)))


def check_weights(values: np.ndarray, source: str) -> None:
    """Refuse a weight map that is not finite or leaves [0, 1], saying what to do.

    Args:
        values: the non-integer region values.
        source: how to name the region in the message ("the region file roi.nii.gz").

    Raises:
        InputError: NaN, infinite values, or values outside [0, 1].
    """
    finite = np.isfinite(values)
    if not finite.all():
        bad = int(values.size - np.count_nonzero(finite))
        raise InputError(
            f"{source} holds {bad} NaN or infinite value(s); a region is a label map or weights between 0 and 1, "
            "so replace them (for example with 0) and try again"
        )
    low, high = float(values.min()), float(values.max())
    if low < 0.0 or high > 1.0:
        raise InputError(
            f"{source} holds non-integer values from {low:g} to {high:g}; a soft region must hold weights "
            "between 0 and 1 (a probability map), so rescale it to [0, 1], or give a label map of whole numbers"
        )


def region_weights(roi: np.ndarray, source: str = "the region") -> np.ndarray:
    """The region an array stands for: bool where it holds labels, float32 weights where it does not.

    Args:
        roi: the region on the image's grid: bool, integer labels, or weights in [0, 1].
        source: how to name the region in messages.

    Returns:
        A bool mask (values != 0) when every value is a whole number, else the float32 weights.

    Raises:
        InputError: NaN, infinite values, or non-integer values outside [0, 1].
    """
    roi = np.asarray(roi)
    if roi.dtype == np.bool_:
        return roi
    if holds_whole_numbers(roi):
        return roi != 0
    if roi.dtype.kind != "f":
        raise InputError(f"{source} has data type {roi.dtype}; give a label map or weights between 0 and 1")
    check_weights(roi, source)
    return roi.astype(np.float32, copy=False)
