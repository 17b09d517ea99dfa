"""Sparseness of a map: the Gini index (Hurley & Rickard 2009; Chalasani et al. 2020).

With the map's absolute values sorted ascending, ``c_(1) <= ... <= c_(N)``:

    G = 1 - 2 sum_{k=1..N} (c_(k) / ||c||_1) (N - k + 1/2) / N

0 for a constant map, ``1 - 1/N`` for a map with one non-zero voxel; NaN for an all-zero map.
"""

from __future__ import annotations

import numpy as np

from ..errors import InputError


def gini(heatmap: np.ndarray) -> float:
    """The Gini index of a map (see the module docstring), in float64."""
    values = np.abs(np.asarray(heatmap, dtype=np.float64).ravel())
    if values.size == 0 or not np.isfinite(values).all():
        raise InputError("the map must be non-empty and finite to measure its sparseness")
    total = values.sum()
    if total <= 0:
        return float("nan")
    values.sort()
    n = values.size
    k = np.arange(1, n + 1, dtype=np.float64)
    return float(1.0 - 2.0 * np.sum((values / total) * (n - k + 0.5) / n))
