"""Where the map's relevance lies relative to the region (all sums over the map's non-negative values h).

- Relevance mass inside (Arras et al. 2022): ``M = sum_{p in R} h(p) / sum_p h(p)``.
- Relevance mass within a band: the same with ``R`` dilated by ``band_mm`` millimetres
  (Euclidean distance on the voxel grid, in mm): evidence just around the region, e.g. its
  boundary, counts.
- Energy-based pointing game (Score-CAM, Wang et al. 2020): the share of the map inside the
  region's bounding box, ``E = sum_{p in box(R)} h(p) / sum_p h(p)``.
- Pointing game hit (Zhang et al. 2018): 1 if the hottest voxel (the first in array order when
  several tie) lies within ``band_mm`` of the region, else 0.
All are NaN for an all-zero map (no relevance to place).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import InputError


@dataclass(frozen=True)
class Localisation:
    """Relevance mass inside the region and within its band, energy pointing game, pointing hit."""

    mass_inside: float
    mass_band: float
    energy_pointing: float
    pointing_hit: float


def dilated(region: np.ndarray, band_mm: float, spacing_kji) -> np.ndarray:
    """The region grown by ``band_mm`` millimetres (voxels whose centre is that close to it)."""
    from scipy.ndimage import distance_transform_edt

    region = np.asarray(region, dtype=bool)
    if band_mm <= 0 or not region.any():
        return region.copy()
    distance = distance_transform_edt(~region, sampling=[float(s) for s in spacing_kji])
    return distance <= band_mm


def bounding_box(region: np.ndarray) -> np.ndarray:
    """The region's axis-aligned bounding box as a mask (empty for an empty region)."""
    region = np.asarray(region, dtype=bool)
    box = np.zeros_like(region)
    if region.any():
        spans = [np.flatnonzero(region.any(axis=tuple(a for a in range(3) if a != axis))) for axis in range(3)]
        box[tuple(slice(int(s[0]), int(s[-1]) + 1) for s in spans)] = True
    return box


def localisation(heatmap: np.ndarray, region: np.ndarray, *, spacing_kji=(1.0, 1.0, 1.0),
                 band_mm: float = 10.0) -> Localisation:
    """All localisation scores of one map (see the module docstring).

    Args:
        heatmap: ``(K, J, I)`` non-negative map.
        region: bool mask of the same shape.
        spacing_kji: voxel size in mm along K, J, I.
        band_mm: width of the band around the region (mm).

    Raises:
        InputError: shapes differ, negative or non-finite values, or an empty region.
    """
    heat = np.asarray(heatmap, dtype=np.float64)
    region = np.asarray(region, dtype=bool)
    if heat.shape != region.shape:
        raise InputError(f"the map has shape {heat.shape} but the region {region.shape}")
    if not np.isfinite(heat).all() or (heat < 0).any():
        raise InputError("the map must be finite and non-negative (a CAM after ReLU) to measure where its mass lies")
    if not region.any():
        raise InputError("the region is empty, so there is nothing to localise; choose a region that is present")
    total = float(heat.sum())
    if total <= 0:
        nan = float("nan")
        return Localisation(nan, nan, nan, nan)
    band = dilated(region, band_mm, spacing_kji)
    peak = np.unravel_index(int(np.argmax(heat)), heat.shape)
    return Localisation(float(heat[region].sum()) / total, float(heat[band].sum()) / total,
                        float(heat[bounding_box(region)].sum()) / total, float(band[peak]))
