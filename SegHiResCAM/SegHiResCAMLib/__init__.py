"""SegHiResCAMLib: class activation maps for segmentation networks.

The public names are imported lazily, so that ``import SegHiResCAMLib`` (and
Slicer's module scan) never pulls in torch:

>>> from SegHiResCAMLib import explain, list_layers, load_model
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "explain": "SegHiResCAMLib.engine.explain",
    "explain_detailed": "SegHiResCAMLib.engine.explain",
    "Explanation": "SegHiResCAMLib.engine.explain",
    "METHODS": "SegHiResCAMLib.engine.methods",
    "kernel_weighted_contribution": "SegHiResCAMLib.engine.kernel_weighted",
    "masking_scores": "SegHiResCAMLib.engine.validation",
    "MaskingScores": "SegHiResCAMLib.engine.validation",
    "list_layers": "SegHiResCAMLib.engine.layers",
    "LayerInfo": "SegHiResCAMLib.engine.layers",
    "load_model": "SegHiResCAMLib.models.loading",
    "LoadedModel": "SegHiResCAMLib.models.loading",
    "ModelCard": "SegHiResCAMLib.models.card",
    "Volume": "SegHiResCAMLib.volume",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'SegHiResCAMLib' has no attribute {name!r}")
