"""The segmentation target y: a scalar summed over a region of the output.

The region (ROI) is always a constant: no gradient flows through the argmax or the
threshold that built it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

TARGETS = ("logits", "probability-threshold")


def class_probabilities(output: torch.Tensor, multilabel: bool = False, probabilities: bool = False) -> torch.Tensor:
    """Softmax over classes; the sigmoid per channel for one channel or independent classes;
    the output itself when the model already outputs probabilities."""
    if probabilities:
        return output
    return torch.sigmoid(output) if multilabel or output.shape[1] == 1 else torch.softmax(output, dim=1)


def predicted_roi(output: torch.Tensor, class_index: int, multilabel: bool = False,
                  probabilities: bool = False) -> torch.Tensor:
    """The model's own prediction for a class: argmax == c; for one channel or independent
    classes, logit > 0 (probability > 0.5 when the model outputs probabilities)."""
    with torch.no_grad():
        if multilabel or output.shape[1] == 1:
            return output[:, class_index] > (0.5 if probabilities else 0.0)
        return output.argmax(dim=1) == class_index


def per_sample_scores(
    output: torch.Tensor,
    class_index: int,
    roi: torch.Tensor | None,
    *,
    target: str = "logits",
    threshold: float = 0.5,
    multilabel: bool = False,
    probabilities: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Target scores per sample and the ROI actually used.

    Args:
        output: model output ``(B, classes, *spatial)``.
        class_index: the class c.
        roi: ``(B, *spatial)`` bool or float weights on the output grid, or None for the
            model's own prediction (logits: argmax; probability-threshold: s_c > threshold).
        target: "logits": ``y = sum_p m(p) z_c(p)``; "probability-threshold" (EIECS 2021):
            ``y = sum_p m(p) s_c(p) [s_c(p) > t]``.
        multilabel: classes are independent (sigmoid per channel), see ``predicted_roi``.
        probabilities: the model outputs probabilities, not logits: "logits" then sums the
            class probabilities, and nothing is squashed again.

    Returns:
        ``(scores (B,), roi (B, *spatial) float)``.
    """
    if target == "logits":
        weights = predicted_roi(output, class_index, multilabel, probabilities) if roi is None else roi
        weights = weights.to(output.dtype).detach()
        return (output[:, class_index] * weights).flatten(1).sum(1), weights
    scores = class_probabilities(output, multilabel, probabilities)[:, class_index]
    above = (scores > threshold).detach()
    weights = above.to(output.dtype) if roi is None else roi.to(output.dtype).detach() * above
    return (scores * weights).flatten(1).sum(1), weights


def roi_on_output_grid(roi: torch.Tensor, spatial: tuple[int, ...]) -> torch.Tensor:
    """Bring a ``(B, *spatial)`` ROI to the output's spatial size (nearest), if it differs."""
    if tuple(roi.shape[1:]) == tuple(spatial):
        return roi
    resized = F.interpolate(roi[:, None].float(), size=spatial, mode="nearest")[:, 0]
    return resized if roi.dtype.is_floating_point else resized > 0.5


def roi_prediction(output: torch.Tensor, class_index: int, roi: torch.Tensor | None,
                   multilabel: bool = False, probabilities: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(P, m)`` in float64: ``P = m * s_c`` (the class probability inside the region) with ``m`` the
    region on the output grid, or the model's prediction when ``roi`` is None.

    The quantity behind Kernel-Weighted Contribution's ablations and the masking scores.
    """
    if roi is None:
        roi = predicted_roi(output, class_index, multilabel, probabilities)
    else:
        roi = roi_on_output_grid(roi, tuple(output.shape[2:]))
    weights = roi.to(torch.float64)
    scores = class_probabilities(output, multilabel, probabilities)[:, class_index].to(torch.float64)
    return scores * weights, weights
