"""Tolerances derived from the arithmetic: the dtype's epsilon and the size of each reduction.

Never a number one machine happened to print: float32 sums change with the thread count and the
CPU (vector width and blocking change the order of summation), so every comparison of computed
floats in the suite either is exact by construction (and says why), or compares against an
oracle computed in float64, or takes its tolerance from the helpers below, with a comment.

The bound used throughout (Higham, Accuracy and Stability of Numerical Algorithms, 2nd ed.,
eq. 4.4): a sum of n terms computed in any order differs from the exact sum by at most
gamma_(n-1) * sum_i |x_i|, with gamma_n = n u / (1 - n u) and u = eps / 2; n * eps * sum_i |x_i|
covers it whenever n * eps < 1.
"""

from __future__ import annotations

import numpy as np

EPS32 = float(np.finfo(np.float32).eps)  # 2^-23: the spacing of float32 numbers in [1, 2)
EPS64 = float(np.finfo(np.float64).eps)  # 2^-52


def sum_error(terms: int, magnitude, dtype=np.float32):
    """Largest rounding error of a sum of ``terms`` numbers, in any order, whose absolute values add up to
    ``magnitude``."""
    return terms * float(np.finfo(dtype).eps) * np.asarray(magnitude, dtype=np.float64)


def float32_of_float64(desired) -> dict:
    """``assert_allclose`` tolerances for float32 values that are the float64 ``desired`` rounded once.

    The engine computes in the model's dtype and returns float32 maps: with a float64 model each value
    is its float64 value rounded to float32, within eps32 / 2 of itself (rtol = eps32 leaves a factor 2).
    The float64 arithmetic before it is 2^29 times finer; where it cancels to near zero, its error is
    far below one float32 step at the map's scale (atol = eps32 * max |desired|).
    """
    scale = float(np.max(np.abs(desired))) if np.size(desired) else 0.0
    return dict(rtol=EPS32, atol=EPS32 * scale)


def geometry_atol(magnitude, stored=np.float64) -> float:
    """Absolute tolerance for geometry (an IJK-to-RAS matrix, origin, spacing, direction, or a voxel's
    RAS position) that went through a file, a node or a matrix product.

    Writing splits the matrix into origin, spacing (a column norm: 3 products, 2 additions and a square
    root) and unit direction (a division), the reader rebuilds it (a product), and a position adds
    4 products: about 10 roundings in the stored precision, float64 for NRRD text (17 digits) and
    MRML/VTK matrices, float32 for NIfTI (which also goes through a quaternion for the direction, a
    few roundings more). 16 roundings of the largest absolute value involved cover all of them.
    """
    return 16 * float(np.finfo(stored).eps) * max(1.0, float(np.max(np.abs(magnitude))))


def reordered_float64(scale) -> float:
    """Absolute tolerance for two float64 runs of one of the suite's small networks that differ only in
    the order of their sums (batch size, chunks, threads, the kernel picked for a batch).

    Each of at most 16 layers (backward included) sums at most 2^10 terms (fan-in: channels x kernel taps,
    864 for the widest 3D convolution here), so a value moves by at most 2^14 * eps64 times the magnitudes
    summed on its path; allowing those magnitudes to be 2^10 times the compared values' ``scale``
    (cancellation) gives 2^24 * eps64 = 2^-28 of the scale: still 32 times finer than one float32 rounding,
    so a test at this tolerance sees any real change.
    """
    return 2.0**24 * EPS64 * float(scale)


def assert_within(actual, desired, bound, err_msg: str = "") -> None:
    """Assert ``|actual - desired| <= bound`` elementwise (``bound`` may be an array, unlike assert_allclose's atol)."""
    actual, desired = np.asarray(actual, dtype=np.float64), np.asarray(desired, dtype=np.float64)
    excess = np.abs(actual - desired) - np.asarray(bound, dtype=np.float64)
    assert actual.shape == desired.shape, f"{err_msg} shapes {actual.shape} and {desired.shape} differ"
    assert np.all(excess <= 0), f"{err_msg} exceeds its bound by up to {float(excess.max()):.3g}"


def float32_of_reordered_float64(desired) -> dict:
    """``assert_allclose`` tolerances for float32 maps of two float64 runs that may sum in other orders:
    :func:`float32_of_float64` plus :func:`reordered_float64` at the map's scale."""
    scale = float(np.max(np.abs(desired))) if np.size(desired) else 0.0
    return dict(rtol=EPS32, atol=EPS32 * scale + reordered_float64(scale))


def linear_function_resampled(values_scale, slope, index_scale) -> float:
    """Absolute tolerance for a linear function of position sampled on one grid and resampled linearly
    (float32 ``F.interpolate``, ``align_corners=False``) onto another.

    Linear interpolation reproduces a linear function exactly in exact arithmetic. In float32 each stored
    value is rounded (eps32 / 2 of ``values_scale``), an interpolated value sums 8 weighted values
    (8 eps32 of ``values_scale``), and its source position, computed in float32, is off by up to
    eps32 times ``index_scale`` (the largest index), which moves the value by ``slope`` (its change per
    voxel) times that; twice that allows the scale factor's own rounding.
    """
    return 9 * EPS32 * float(values_scale) + 2 * EPS32 * float(index_scale) * float(slope)
