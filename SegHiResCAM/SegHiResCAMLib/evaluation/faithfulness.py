"""Deletion and insertion curves (RISE, Petsiuk et al. 2018) for 3D segmentation maps.

Voxels are removed (deletion) or revealed (insertion) in the map's order, most relevant first,
in 3D blocks (:func:`perturbation.block_order`); after each step the model's score of the region
is recomputed through the explanation's path (:class:`scoring.RegionScorer`). With ``x`` the image,
``b`` the image with every voxel removed, ``x_t`` (deletion) the image with the most relevant
share ``t`` of voxels removed and ``x'_t`` (insertion) the baseline with that share revealed:

    D(t) = (y(x_t) - y(b)) / (y(x) - y(b)),        I(t) = (y(x'_t) - y(b)) / (y(x) - y(b))

so ``D(0) = I(1) = 1`` and ``D(1) = I(0) = 0`` whatever the score's units (sums of logits have no
natural zero); ``AUC = integral_0^1 D(t) dt`` by the trapezoid rule over the exact voxel shares.
Lower deletion AUC and higher insertion AUC are better: the score falls fastest when the voxels
the map ranks first are removed. When ``y(x) = y(b)`` (the model does not react to the removal)
both curves are undefined and reported as NaN.
"""

from __future__ import annotations

import warnings as _warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import InputError, SegHiResCAMWarning
from .perturbation import BASELINES, baseline_image, block_order, perturb
from .scoring import RegionScorer


@dataclass(frozen=True)
class DeletionInsertion:
    """Deletion and insertion curves of one map.

    Attributes:
        fractions: share of voxels removed (deletion) or revealed (insertion) at each step, 0..1.
        deletion: normalised deletion curve D(t) (see the module docstring).
        insertion: normalised insertion curve I(t).
        deletion_raw, insertion_raw: the scores y before normalisation.
        deletion_auc: area under D (lower is better); NaN when undefined.
        insertion_auc: area under I (higher is better); NaN when undefined.
    """

    fractions: np.ndarray
    deletion: np.ndarray
    insertion: np.ndarray
    deletion_raw: np.ndarray
    insertion_raw: np.ndarray
    deletion_auc: float
    insertion_auc: float


def area_under(fractions: np.ndarray, curve: np.ndarray) -> float:
    """Trapezoid area of ``curve`` over ``fractions`` (float64)."""
    x, y = np.asarray(fractions, np.float64), np.asarray(curve, np.float64)
    return float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2.0))


def removal_masks(heatmap: np.ndarray, steps: int, block: int | Sequence[int], seed: int = 0):
    """The removal masks in map order: ``(fractions, masks)`` with ``steps + 1`` entries, 0 to all voxels."""
    if int(steps) < 1:
        raise InputError(f"steps must be at least 1, got {steps}")
    labels, order = block_order(heatmap, block, seed=seed)
    sizes = np.bincount(labels.ravel(), minlength=len(order))
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order))
    voxel_rank = rank[labels]
    cuts = np.unique(np.round(np.linspace(0, len(order), int(steps) + 1)).astype(np.int64))
    removed_voxels = np.concatenate([[0], np.cumsum(sizes[order])])
    fractions = removed_voxels[cuts] / labels.size
    return fractions, [voxel_rank < cut for cut in cuts]


def end_scores(scorer: RegionScorer, baseline: str, *, sigma: float = 5.0, seed: int = 0) -> tuple[float, float]:
    """``(y(x), y(b))``: the region's score on the image and on the all-baseline image (the same for every map)."""
    image = np.asarray(scorer.volume.array, dtype=np.float32)
    everything = np.ones(scorer.volume.spatial_shape, bool)
    return scorer.score_one(image), scorer.score_one(perturb(image, everything, baseline, sigma=sigma, seed=seed))


def deletion_insertion(scorer: RegionScorer, heatmap: np.ndarray, *, steps: int = 20, baseline: str = "blur",
                       block: int | Sequence[int] = 4, sigma: float = 5.0, seed: int = 0,
                       ends: tuple[float, float] | None = None) -> DeletionInsertion:
    """Deletion and insertion curves and their AUCs for one map.

    Args:
        scorer: the model, class, region and score (see :class:`scoring.RegionScorer`).
        heatmap: ``(K, J, I)`` map on the scorer's volume grid.
        steps: number of removal steps (blocks are removed in ``steps`` nearly equal groups).
        baseline: one of ``perturbation.BASELINES``.
        block: block edge in voxels (one number or K, J, I).
        sigma: Gaussian sigma (voxels) of the "blur" baseline.
        seed: seed of the tie-breaking order and of the "noise" baseline.
        ends: :func:`end_scores` for these settings, when already computed (they do not depend on the map).

    Returns:
        DeletionInsertion.

    Raises:
        InputError: unknown baseline, map of the wrong shape or with NaN, steps < 1.
    """
    if baseline not in BASELINES:
        raise InputError(f"baseline {baseline!r} is unknown; choose one of {', '.join(BASELINES)}")
    heat = np.asarray(heatmap)
    image = np.asarray(scorer.volume.array, dtype=np.float32)
    if heat.shape != scorer.volume.spatial_shape:
        raise InputError(f"the map has shape {heat.shape} but the image has {scorer.volume.spatial_shape}")
    fractions, masks = removal_masks(heat, steps, block, seed)
    fill = None if baseline == "impute" else baseline_image(image, baseline, sigma=sigma, seed=seed)

    def removed(mask: np.ndarray) -> np.ndarray:
        return perturb(image, mask, baseline, fill=fill)

    full, empty = ends if ends is not None else end_scores(scorer, baseline, sigma=sigma, seed=seed)
    inner = masks[1:-1]
    deletion_raw = np.array([full, *scorer(removed(m) for m in inner), empty])
    insertion_raw = np.array([empty, *scorer(removed(~m) for m in inner), full])
    span = full - empty
    if not np.isfinite(span) or abs(span) <= 1e-12 * max(abs(full), abs(empty), 1e-300):
        _warnings.warn("the model's score does not change when the whole image is replaced by the baseline, so "
                       "deletion and insertion are undefined (NaN); try another baseline", SegHiResCAMWarning,
                       stacklevel=2)
        nan = np.full(len(fractions), np.nan)
        return DeletionInsertion(fractions, nan, nan.copy(), deletion_raw, insertion_raw, float("nan"), float("nan"))
    deletion = (deletion_raw - empty) / span
    insertion = (insertion_raw - empty) / span
    return DeletionInsertion(fractions, deletion, insertion, deletion_raw, insertion_raw,
                             area_under(fractions, deletion), area_under(fractions, insertion))
