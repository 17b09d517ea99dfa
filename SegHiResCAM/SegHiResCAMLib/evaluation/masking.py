"""Prediction Preserved, Image Preserved and Excess Prediction of a map on the volume's grid.

The formulas live in :mod:`engine.validation` (one implementation): with ``a`` the map in [0, 1],
the model-grid image ``x`` is masked as ``x~ = a x`` (baseline 0 of the normalised intensities)
and ``P = m s_c``, ``P~`` the same on ``x~``:

    PP = sum min(P~, P) / sum P,    IP = mean a,    EP = sum max(P~ - P, 0) / sum P

Here the map and the region are first carried onto the model's grid by the card's own
preprocessing (the path of the explanation), so a map of the volume scores what the model saw.
"""

from __future__ import annotations

import numpy as np

from .scoring import RegionScorer


def masking_scores_on_volume(scorer: RegionScorer, heatmap: np.ndarray, *, threshold: float | None = None):
    """:func:`engine.validation.masking_scores` for a map on the scorer's volume grid.

    Returns:
        :class:`engine.validation.MaskingScores` (prediction_preserved, image_preserved, excess_prediction).
    """
    from ..engine.validation import masking_scores
    from ..models.preprocess import prepare_input

    card = scorer.loaded.card
    prepared = prepare_input(scorer.volume, card)
    # Linear resampling of a map in [0, 1] stays in [0, 1] up to rounding: clip that rounding away.
    heat = np.clip(np.asarray(prepared.roi_to_model(np.asarray(heatmap, dtype=np.float32)), np.float64), 0.0, 1.0)
    region = np.asarray(prepared.roi_to_model(scorer.region)).astype(bool)
    # The LoadedModel's card gives spatial dims, slice axis, multilabel, probabilities and output key.
    return masking_scores(scorer.loaded, prepared.image, heat, target_class=scorer.class_index, roi=region,
                          threshold=threshold, device=scorer.device)
