"""What replaces removed voxels, and in which order voxels are removed.

Baselines (RISE, Petsiuk et al. 2018; ROAD, Rong et al. 2022), all from the image's own intensities:

- ``"blur"``: the image smoothed by a Gaussian of ``sigma`` voxels (RISE's deletion baseline);
- ``"mean"``: the image's mean intensity;
- ``"zero"``: 0 (meaningful only where 0 means "nothing", e.g. MR background);
- ``"noise"``: Gaussian noise with the image's mean and standard deviation (seeded);
- ``"impute"``: ROAD's lesson in 3D: a constant, a blur or noise leaves the removed region's SHAPE
  visible (its edges differ from the surroundings), and a model can react to that shape instead
  of to the lost information. Removed voxels are instead filled with the harmonic interpolation of
  the kept ones: each removed voxel equals the mean of its 6 face neighbours (borders: of those
  that exist), ``deg(p) u(p) - sum_{q ~ p} u(q) = 0``, solved by conjugate gradients. Smooth
  structure continues through the hole; a linear intensity ramp is reproduced exactly, so the
  perturbed image carries no trace of the mask there.

Order: the map is averaged over ``block`` voxel blocks (3D), blocks are ranked by that mean, most
relevant first, ties broken by a seeded random permutation (so a map with ties, such as a mask,
is neither favoured nor penalised by the array's memory order).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..errors import InputError, InternalError

BASELINES = ("blur", "mean", "zero", "noise", "impute")


def _spatial(image: np.ndarray) -> tuple[int, int, int]:
    return tuple(image.shape[-3:])  # type: ignore[return-value]


def baseline_image(image: np.ndarray, baseline: str, *, sigma: float = 5.0, seed: int = 0) -> np.ndarray:
    """The fill image for a mask-independent baseline (float32, the image's shape).

    Raises:
        InputError: unknown baseline, or "impute" (which depends on the mask: use :func:`perturb`).
    """
    image = np.asarray(image, dtype=np.float32)
    if baseline == "zero":
        return np.zeros_like(image)
    if baseline == "mean":
        return np.full_like(image, float(image.mean(dtype=np.float64)))
    if baseline == "noise":
        rng = np.random.default_rng(seed)
        return rng.normal(float(image.mean(dtype=np.float64)), float(image.std(dtype=np.float64)),
                          image.shape).astype(np.float32)
    if baseline == "blur":
        from scipy.ndimage import gaussian_filter

        spatial_sigma = (0.0,) * (image.ndim - 3) + (float(sigma),) * 3
        return gaussian_filter(image, spatial_sigma, mode="nearest").astype(np.float32)
    if baseline == "impute":
        raise InputError("the 'impute' baseline depends on the removed voxels; call perturb(image, removed, 'impute')")
    raise InputError(f"baseline {baseline!r} is unknown; choose one of {', '.join(BASELINES)}")


def perturb(image: np.ndarray, removed: np.ndarray, baseline: str, *, fill: np.ndarray | None = None,
            sigma: float = 5.0, seed: int = 0) -> np.ndarray:
    """The image with the ``removed`` voxels replaced according to ``baseline``.

    Args:
        image: ``(K, J, I)`` or ``(C, K, J, I)``.
        removed: bool ``(K, J, I)``.
        baseline: one of ``BASELINES``.
        fill: a precomputed :func:`baseline_image` (saves recomputing it at every step).
    """
    image = np.asarray(image, dtype=np.float32)
    removed = np.asarray(removed, dtype=bool)
    if removed.shape != _spatial(image):
        raise InputError(f"the removal mask has shape {removed.shape}, not the image's {_spatial(image)}")
    if baseline == "impute":
        if image.ndim == 3:
            return harmonic_fill(image, removed)
        return np.stack([harmonic_fill(channel, removed) for channel in image])
    if fill is None:
        fill = baseline_image(image, baseline, sigma=sigma, seed=seed)
    return np.where(removed, fill, image).astype(np.float32)


def harmonic_fill(image: np.ndarray, removed: np.ndarray, *, rtol: float = 1e-8) -> np.ndarray:
    """Fill ``removed`` voxels of a 3D image with the harmonic interpolation of the kept ones.

    Solves ``deg(p) u(p) - sum_{q ~ p, q removed} u(q) = sum_{q ~ p, q kept} x(q)`` for every
    removed voxel p (6-neighbourhood) in float64 by conjugate gradients to relative residual
    ``rtol``. With nothing kept, every voxel becomes the image's mean.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.linalg import cg

    values = np.asarray(image, dtype=np.float64)
    removed = np.asarray(removed, dtype=bool)
    out = values.copy()
    count = int(removed.sum())
    if count == 0:
        return out.astype(np.float32)
    if count == removed.size:
        return np.full(values.shape, values.mean(), dtype=np.float32)
    index = np.full(removed.shape, -1, dtype=np.int64)
    index[removed] = np.arange(count)
    degree = np.zeros(count)
    rhs = np.zeros(count)
    rows, cols = [], []
    for axis in range(3):
        for step in (1, -1):
            # Pairs (p, q = p + step along axis) with p removed and q inside the volume.
            here = [slice(None)] * 3
            there = [slice(None)] * 3
            here[axis] = slice(0, -1) if step == 1 else slice(1, None)
            there[axis] = slice(1, None) if step == 1 else slice(0, -1)
            p_removed = removed[tuple(here)]
            q_removed = removed[tuple(there)][p_removed]
            p_index = index[tuple(here)][p_removed]
            np.add.at(degree, p_index, 1.0)
            q_values = values[tuple(there)][p_removed]
            np.add.at(rhs, p_index[~q_removed], q_values[~q_removed])
            rows.append(p_index[q_removed])
            cols.append(index[tuple(there)][p_removed][q_removed])
    rows_a, cols_a = np.concatenate(rows), np.concatenate(cols)
    matrix = coo_matrix((np.concatenate([degree, -np.ones(len(rows_a))]),
                         (np.concatenate([np.arange(count), rows_a]), np.concatenate([np.arange(count), cols_a]))),
                        shape=(count, count)).tocsr()
    start = np.full(count, values[~removed].mean())
    solution, info = cg(matrix, rhs, x0=start, rtol=rtol, atol=0.0, maxiter=20 * count)
    if info != 0:
        raise InternalError(f"the harmonic fill did not converge (conjugate gradients returned {info}); "
                            "use another --baseline and report this with the image's size")
    out[removed] = solution
    return out.astype(np.float32)


def block_order(heatmap: np.ndarray, block: int | Sequence[int] = 4, *, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Blocks of the map, most relevant first.

    Args:
        heatmap: ``(K, J, I)`` map (any real values; higher = more relevant).
        block: block edge in voxels, one number or one per axis (K, J, I).
        seed: seed of the random permutation that breaks ties.

    Returns:
        ``(labels, order)``: ``labels`` ``(K, J, I)`` gives each voxel's block number; ``order``
        lists block numbers from most to least relevant.
    """
    heat = np.asarray(heatmap, dtype=np.float64)
    if heat.ndim != 3:
        raise InputError(f"the map must be a 3D volume (K, J, I), got shape {heat.shape}")
    if not np.isfinite(heat).all():
        raise InputError("the map contains NaN or infinite values; replace them by 0 before evaluating it")
    edges = np.broadcast_to(np.asarray(block, dtype=int), (3,))
    if (edges < 1).any():
        raise InputError(f"the block size must be at least 1 voxel per axis, got {list(edges)}")
    grid = [np.arange(n) // e for n, e in zip(heat.shape, edges)]
    counts = [-(-n // e) for n, e in zip(heat.shape, edges)]
    labels = (grid[0][:, None, None] * counts[1] + grid[1][None, :, None]) * counts[2] + grid[2][None, None, :]
    total = int(np.prod(counts))
    sums = np.bincount(labels.ravel(), weights=heat.ravel(), minlength=total)
    sizes = np.bincount(labels.ravel(), minlength=total)
    means = sums / sizes
    ties = np.random.default_rng(seed).permutation(total)
    order = np.lexsort((ties, -means))  # last key first: mean descending, then the random rank
    return labels, order
