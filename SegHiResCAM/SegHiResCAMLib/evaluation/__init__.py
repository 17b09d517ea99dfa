"""Faithfulness and sanity checks for 3D segmentation explanations, and the report people read.

Modules, one job each: :mod:`scoring` (the model's score of a region on a perturbed image, through
the explanation's path), :mod:`perturbation` (baselines, the 3D imputer, block order),
:mod:`faithfulness` (deletion/insertion), :mod:`masking` (Prediction/Image Preserved, Excess
Prediction), :mod:`randomisation` (model- and data-randomisation checks), :mod:`similarity`
(Spearman, 3D SSIM), :mod:`localisation`, :mod:`sparseness` (Gini), :mod:`cost`,
:mod:`baselines` (random, region and blob maps), :mod:`statistics` (paired tests, bootstrap),
:mod:`suite` (every metric on one case), :mod:`report` and :mod:`viewer` (HTML), :mod:`command`
(``seghirescam evaluate``). Names are imported lazily (torch, scipy and matplotlib on first use).
"""

from __future__ import annotations

from ..lazy import lazy_getattr

_LAZY = {
    "RegionScorer": "scoring",
    "resolve_region": "scoring",
    "deletion_insertion": "faithfulness",
    "DeletionInsertion": "faithfulness",
    "masking_scores_on_volume": "masking",
    "parameter_randomisation": "randomisation",
    "data_randomisation": "randomisation",
    "spearman": "similarity",
    "ssim": "similarity",
    "localisation": "localisation",
    "gini": "sparseness",
    "measure": "cost",
    "baseline_maps": "baselines",
    "paired_comparison": "statistics",
    "bootstrap_mean": "statistics",
    "evaluate_case": "suite",
    "EvaluationSettings": "suite",
    "METRICS": "suite",
    "write_report": "report",
    "show": "viewer",
}

__all__ = sorted(_LAZY)

__getattr__ = lazy_getattr(__name__, _LAZY)
