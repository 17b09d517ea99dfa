"""Maps that know nothing about the model, shown in every table beside the methods.

- ``random``: uniform noise in [0, 1) (seeded): what a metric gives for no information;
- ``region``: the region itself (1 inside, 0 outside): a metric that ranks it above every
  method measures agreement with the region, not faithfulness to the model;
- ``blob``: a Gaussian at the region's centre of mass, with the region's own spread along each
  axis (the standard deviation of its voxel coordinates, in voxels), peak 1.
"""

from __future__ import annotations

import numpy as np

from ..errors import InputError

BASELINE_MAPS = ("random", "region", "blob")


def random_map(shape, seed: int = 0) -> np.ndarray:
    """Uniform noise in [0, 1), float32."""
    return np.random.default_rng(seed).random(tuple(shape), dtype=np.float32)


def region_map(region: np.ndarray) -> np.ndarray:
    """The region as a float32 map."""
    return np.asarray(region, dtype=bool).astype(np.float32)


def blob_map(region: np.ndarray) -> np.ndarray:
    """A Gaussian (peak 1) at the region's centre of mass with the region's spread per axis."""
    region = np.asarray(region, dtype=bool)
    if not region.any():
        raise InputError("the region is empty, so it has no centre of mass for the blob baseline")
    coordinates = np.argwhere(region).astype(np.float64)
    centre, spread = coordinates.mean(axis=0), np.maximum(coordinates.std(axis=0), 0.5)
    axes = [((np.arange(n) - c) / s) ** 2 for n, c, s in zip(region.shape, centre, spread)]
    exponent = axes[0][:, None, None] + axes[1][None, :, None] + axes[2][None, None, :]
    return np.exp(-0.5 * exponent).astype(np.float32)


def baseline_map(name: str, region: np.ndarray, seed: int = 0) -> np.ndarray:
    """One baseline map ("random", "region" or "blob") for a region.

    Raises:
        InputError: an unknown name, or an empty region for the blob.
    """
    if name == "random":
        return random_map(np.shape(region), seed)
    if name == "region":
        return region_map(region)
    if name == "blob":
        return blob_map(region)
    raise InputError(f"baseline map {name!r} is unknown; choose from {', '.join(BASELINE_MAPS)}")


def baseline_maps(region: np.ndarray, seed: int = 0) -> dict[str, np.ndarray]:
    """Every baseline map for one region."""
    return {name: baseline_map(name, region, seed) for name in BASELINE_MAPS}
