"""SegHiResCAMLib: class activation maps for segmentation networks.

The public names are imported lazily, so that ``import SegHiResCAMLib`` (and
Slicer's module scan) never pulls in torch:

>>> from SegHiResCAMLib import ExplainSettings, explain, list_layers, load_model
"""

from __future__ import annotations

from .lazy import lazy_getattr

__version__ = "0.1.0"

_LAZY = {
    "explain": "engine.explain",
    "explain_detailed": "engine.explain",
    "explain_cohort": "cohort.runner",
    "explain_with_settings": "engine.explain",
    "ExplainSettings": "settings",
    "DisplaySettings": "settings",
    "Explanation": "engine.explain",
    "METHODS": "engine.methods",
    "kernel_weighted_contribution": "engine.kernel_weighted",
    "masking_scores": "engine.validation",
    "MaskingScores": "engine.validation",
    "list_layers": "engine.layers",
    "LayerInfo": "engine.layers",
    "load_model": "models.loading",
    "LoadedModel": "models.loading",
    "ModelCard": "models.card",
    "Volume": "volume",
    "SlidingWindow": "windows",
    "predict": "engine.sliding_window",
    "show": "evaluation.viewer",
}

__all__ = sorted(_LAZY)


__getattr__ = lazy_getattr(__name__, _LAZY)
