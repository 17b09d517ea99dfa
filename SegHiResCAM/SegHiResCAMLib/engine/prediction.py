"""The model's own prediction of one class over a whole image, without gradients.

This is the region the "prediction" kind explains (``targets.per_sample_scores`` with no region
given), computed ahead of the explanation when a region must be cut out of it first: the
"point" kind takes the predicted piece connected to a point.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..settings import ExplainSettings
from ..windows import SlidingWindow
from .arrange import arrange_samples, image_tensor
from .capture import segmentation_output
from .device import fitting_count, in_chunks, prepared_model, resolve_device
from .held_model import held_model
from .sliding_window import predict as fused_logits
from .targets import class_probabilities, predicted_roi


def predicted_mask(model: nn.Module, image, settings: ExplainSettings, *,
                   spatial_dims: int | None = None, window: SlidingWindow | None = None) -> np.ndarray:
    """Where the model predicts ``settings.target_class`` in ``image`` ``(C, *spatial)``: the library's
    one prediction of a region (the point region, the evaluation's region).

    The rule is the explanation's own default region: for the logits target, argmax == c (for one
    output channel, or ``multilabel``, logit > 0; probability > 0.5 when the model outputs
    probabilities); for the probability-threshold target, probability > ``target_threshold``. With
    ``window`` the rule reads the model's fused sliding-window logits (``sliding_window.predict``, the
    ones the windowed explanation's default region reads); without, one pass (a 2D model over a
    volume slice by slice along ``settings.slice_axis``). The model runs in its owner's inference
    mode and is left as found.

    Args:
        model: the network, output ``(N, classes, *spatial)``; a TorchScript module or a
            ``LoadedModel`` too, as for ``explain`` (the card fills what the settings leave open).
        image: ``(C, *spatial)`` on the model's grid.
        settings: a class index (or a name the card knows); None means 0 / False / False / the
            full-resolution output for slice axis, multilabel, probabilities and output_key.
        spatial_dims: the model's spatial dims (2 for slice by slice over a volume).

    Returns:
        bool array of ``image.shape[1:]``.
    """
    held = held_model(model)
    model, settings, spatial_dims = held.module, held.settings(settings), held.spatial_dims(spatial_dims, image)
    class_index = settings.target_class
    multilabel, probabilities = bool(settings.multilabel), bool(settings.probabilities)
    slice_axis = 0 if settings.slice_axis is None else settings.slice_axis
    if window is not None:
        fused = torch.from_numpy(fused_logits(model, image, sliding_window=window, device=settings.device,
                                              slice_axis=slice_axis, batch_size=settings.batch_size,
                                              output_key=settings.output_key))
        return _region_rule(fused[None], settings, class_index)[0].numpy()
    samples, _, layout = arrange_samples(image_tensor(image, model), None, spatial_dims, slice_axis)
    spatial = tuple(samples.shape[2:])
    device = resolve_device(settings.device)
    predicted = torch.zeros((samples.shape[0], *spatial), dtype=torch.bool)
    with prepared_model(model, device), torch.inference_mode():

        def predict(index: torch.Tensor) -> None:
            batch = samples[index].to(device)
            output = segmentation_output(model(batch), batch, class_index, settings.output_key)
            mask = _region_rule(output, settings, class_index)
            if tuple(mask.shape[1:]) != spatial:  # an output grid coarser or finer than the input's
                mask = F.interpolate(mask[:, None].float(), size=spatial, mode="nearest")[:, 0] > 0.5
            predicted[index] = mask.cpu()

        size = settings.batch_size or fitting_count(model, samples[:1].to(device), samples.shape[0])
        in_chunks(samples.shape[0], size, device, predict)
    return layout.restore(predicted).numpy()


def _region_rule(output: torch.Tensor, settings: ExplainSettings, class_index: int) -> torch.Tensor:
    """The default region of outputs ``(N, classes, *spatial)``: ``(N, *spatial)`` bool."""
    multilabel, probabilities = bool(settings.multilabel), bool(settings.probabilities)
    if settings.target == "probability-threshold":
        scores = class_probabilities(output, multilabel, probabilities)[:, class_index]
        return scores > settings.target_threshold
    return predicted_roi(output, class_index, multilabel, probabilities)
