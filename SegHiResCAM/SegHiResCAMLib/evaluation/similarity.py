"""How alike two maps are: Spearman rank correlation and 3D SSIM (for the randomisation checks).

- Spearman: ``rho = Pearson(rank(a), rank(b))`` over all voxels, ties given their average rank;
  1 for maps with the same order, NaN when either map is constant (no order to compare).
- SSIM (Wang et al. 2004) in 3D: with Gaussian-weighted local means ``mu``, variances ``sigma^2``
  and covariance ``sigma_ab`` (sigma ``window`` voxels, truncated at 3.5 sigma, borders reflected),
  ``SSIM = mean_p ((2 mu_a mu_b + C1)(2 sigma_ab + C2)) / ((mu_a^2 + mu_b^2 + C1)(sigma_a^2 + sigma_b^2 + C2))``,
  ``C1 = (0.01 L)^2``, ``C2 = (0.03 L)^2``, ``L`` the data range (1 for normalised maps).
  1 for identical maps.
"""

from __future__ import annotations

import numpy as np

from ..errors import InputError


def _pair(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise InputError(f"the maps have different shapes {a.shape} and {b.shape}; compare maps of one image")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise InputError("a map contains NaN or infinite values; replace them by 0 before comparing")
    return a, b


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation of two maps over all voxels (NaN if either is constant)."""
    from scipy.stats import rankdata

    a, b = _pair(a, b)
    ra, rb = rankdata(a.ravel()), rankdata(b.ravel())
    ra -= ra.mean()
    rb -= rb.mean()
    norm = float(np.sqrt((ra * ra).sum() * (rb * rb).sum()))
    return float((ra * rb).sum() / norm) if norm > 0 else float("nan")


def ssim(a: np.ndarray, b: np.ndarray, *, data_range: float = 1.0, window: float = 1.5) -> float:
    """Mean structural similarity of two 3D maps (see the module docstring)."""
    from scipy.ndimage import gaussian_filter

    a, b = _pair(a, b)
    if data_range <= 0:
        raise InputError(f"the data range must be positive, got {data_range}")

    def local(x: np.ndarray) -> np.ndarray:
        return gaussian_filter(x, window, mode="reflect", truncate=3.5)

    mu_a, mu_b = local(a), local(b)
    var_a = local(a * a) - mu_a * mu_a
    var_b = local(b * b) - mu_b * mu_b
    cov = local(a * b) - mu_a * mu_b
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    index = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return float(index.mean())
