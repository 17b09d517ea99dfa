"""Kernel-Weighted Contribution (KWC, SPIE 2022): weights for a layer's channels from ablations.

With ``P(p) = m(p) s_c(p)`` (class-c probability inside the ROI m) and ``S = sum_p P(p)``:
``D_k = sum_p [P(p) - min(P^(-k)(p), P(p))]`` (prediction lost when channel k is zeroed),
``I_k = sum_p min(P^(k only)(p), P(p))`` (prediction kept with every other channel zeroed),
``w_k = D_k I_k / S`` min-max normalised over k, and the map is ``ReLU(sum_k w_k ReLU(A_k))``.
This is the deterministic 2023 variant: a channel is removed by zeroing the layer's output
channel in a forward hook, not by drawing a random kernel. It costs 2K forward passes (K
channels), run in batches of (sample, channel mask) pairs under ``torch.inference_mode``.
"""

from __future__ import annotations

import time
import warnings as _warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..errors import LayerError
from .capture import check_layers, segmentation_output
from .device import fitting_count, in_chunks, prepared_model, resolve_device
from .explain import _arrange, _image_tensor
from .held_model import held_model
from .resize import normalize_by_max, upsample_to
from .validation import roi_prediction


@dataclass(frozen=True)
class KernelWeights:
    """A KWC run: the map and the per-channel quantities behind it (arrays of length K)."""

    heatmap: np.ndarray
    weights: np.ndarray
    dependent: np.ndarray
    independent: np.ndarray
    prediction_total: float
    roi_voxels: int
    device: str
    seconds: float
    warnings: tuple[str, ...] = ()


def kernel_weighted_contribution(model: nn.Module, image, *, layer: str | None = None, target_class: int, roi=None,
                                 spatial_dims: int | None = None, slice_axis: int | None = None,
                                 normalize: bool = True, device: str = "auto", batch_size: int | None = None,
                                 progress: Callable[[float, str], None] | None = None,
                                 multilabel: bool | None = None, probabilities: bool | None = None,
                                 output_key: int | str | None = None) -> np.ndarray:
    """KWC map of ``target_class`` over ``roi`` at ``layer``: float32 array of shape ``image.shape[1:]``.

    Channels are removed by zeroing them (the deterministic 2023 variant, no random kernels);
    the cost is 2K + 2 forward passes for a layer of K channels.

    Arguments as in :func:`engine.explain.explain`; ``batch_size`` fixes the (sample, channel)
    pairs per forward pass (default: sized to the free memory); ``progress(fraction, message)``
    is called per batch and may raise ``CancelledError`` to stop. A 2D model over a volume gets
    one weight set for the whole volume, summed over the slices where the ROI is non-empty;
    the other slices' maps are zero. An empty ROI gives zeros and a warning.
    """
    result = kernel_weighted_detailed(model, image, layer=layer, target_class=target_class, roi=roi,
                                      spatial_dims=spatial_dims, slice_axis=slice_axis, normalize=normalize,
                                      device=device, batch_size=batch_size, progress=progress, multilabel=multilabel,
                                      probabilities=probabilities, output_key=output_key)
    for message in result.warnings:
        _warnings.warn(message, RuntimeWarning, stacklevel=2)
    return result.heatmap


def kernel_weighted_detailed(model: nn.Module, image, *, layer: str | None = None, target_class: int, roi=None,
                             spatial_dims: int | None = None, slice_axis: int | None = None, normalize: bool = True,
                             device: str = "auto", batch_size: int | None = None,
                             progress: Callable[[float, str], None] | None = None,
                             multilabel: bool | None = None, probabilities: bool | None = None,
                             output_key: int | str | None = None) -> KernelWeights:
    """Like :func:`kernel_weighted_contribution`, returning the weights, D_k, I_k and S too."""
    started = time.perf_counter()
    held = held_model(model)
    model, given = held.module, held.choices(
        layer=layer, spatial_dims=spatial_dims, slice_axis=slice_axis, multilabel=multilabel,
        probabilities=probabilities, output_key=output_key, image_dims=np.ndim(image) - 1)
    layer, spatial_dims, slice_axis, output_key = given.layer, given.spatial_dims, given.slice_axis, given.output_key
    multilabel, probabilities = given.multilabel, given.probabilities
    if hasattr(model, "forward_capturing"):
        raise LayerError("Kernel-Weighted Contribution zeroes channels with forward hooks, which this model "
                         "(TorchScript) does not accept; use a Python model or another method")
    check_layers(model, [layer])
    samples, roi_t, layout = _arrange(_image_tensor(image, model), roi, spatial_dims, slice_axis)
    run_device = resolve_device(device)
    spatial, count = tuple(samples.shape[2:]), samples.shape[0]
    with prepared_model(model, run_device), _ChannelGate(model, layer) as gate, torch.inference_mode():
        # Chunks of forward passes under inference mode: one forward's outputs each, no factor.
        size = batch_size or fitting_count(model, samples[:1].to(run_device), limit=2**31)
        found: dict[str, torch.Tensor] = {}  # P and m on the output grid, allocated once its size is known

        def reference(index: torch.Tensor) -> None:
            output = segmentation_output(model(samples[index].to(run_device)), samples, target_class, output_key)
            given = None if roi_t is None else roi_t[index].to(run_device)
            kept_prediction, roi_weights = roi_prediction(output, target_class, given, multilabel, probabilities)
            if not found:
                found["P"] = torch.zeros((count, *output.shape[2:]), dtype=torch.float64, device=run_device)
                found["m"] = torch.zeros_like(found["P"])
            found["P"][index], found["m"][index] = kept_prediction, roi_weights

        in_chunks(count, size, run_device, reference)
        prediction, masks = found["P"], found["m"]
        kept = torch.nonzero(masks.flatten(1).ne(0).any(1)).flatten().cpu()
        total = float(prediction.sum())
        channels = gate.channels
        if channels == 0:
            raise LayerError(f"layer '{layer}' is not used when the model runs; choose a layer on the path to the output")
        if total <= 0:
            note = ("the region to explain is empty inside the image" if roi is not None else
                    f"the model predicts no voxel of class {target_class} in this image")
            zeros = np.zeros(layout.restore(torch.zeros((count, *spatial))).shape, np.float32)
            empty = np.zeros(channels, np.float64)
            return KernelWeights(zeros, empty, empty, empty, 0.0, 0, str(run_device), time.perf_counter() - started,
                                 held.notes + (note + ", so the heatmap is all zeros; choose a region or class that "
                                               "is present",))
        # Rows 0..K-1 zero one channel, rows K..2K-1 keep one, the last row keeps all: each chunk carries
        # its own unablated copies, so P and P~ come from the same batch and share its rounding.
        table = torch.cat([1 - torch.eye(channels), torch.eye(channels), torch.ones(1, channels)]).to(run_device)
        sums = torch.zeros(2 * channels, dtype=torch.float64, device=run_device)
        pairs = 2 * channels * len(kept)

        def ablate(index: torch.Tensor) -> None:
            rows, which = index % (2 * channels), kept[index // (2 * channels)]
            distinct, position = torch.unique(which, return_inverse=True)
            gate.masks = table[torch.cat([rows, torch.full((len(distinct),), 2 * channels)])]
            output = segmentation_output(model(samples[torch.cat([which, distinct])].to(run_device)), samples,
                                         target_class, output_key)
            gate.masks = None
            regions = masks[torch.cat([which, distinct])]
            predicted, _ = roi_prediction(output, target_class, regions, multilabel, probabilities)
            original = predicted[len(index):][position.to(run_device)]
            kept_voxels = torch.minimum(predicted[: len(index)], original)
            kept_part, lost_part = kept_voxels.flatten(1).sum(1), (original - kept_voxels).flatten(1).sum(1)
            rows = rows.to(run_device)
            sums.index_add_(0, rows, torch.where(rows < channels, lost_part, kept_part))
            if progress is not None:
                progress(float(index[-1] + 1) / pairs, f"ablated {int(index[-1]) + 1} of {pairs} channel passes")

        in_chunks(pairs, size, run_device, ablate)
        dependent, independent = sums[:channels], sums[channels:]
        raw = dependent * independent / total
        spread = raw.max() - raw.min()
        weights = (raw - raw.min()) / spread if spread > 0 else torch.ones_like(raw)
        heat = torch.zeros((count, *spatial), dtype=samples.dtype, device=run_device)

        def draw(index: torch.Tensor) -> None:
            which = kept[index]
            gate.capture = True
            model(samples[which].to(run_device))
            activation = torch.relu(gate.captured.to(torch.float64))
            gate.capture, gate.captured = False, None
            layer_map = torch.relu(torch.einsum("bk...,k->b...", activation, weights))
            heat[which] = upsample_to(layer_map.to(samples.dtype), spatial)

        in_chunks(len(kept), size, run_device, draw)
        if normalize:
            heat = normalize_by_max(heat)
        heatmap = layout.restore(heat).to(torch.float32).cpu().numpy()
    return KernelWeights(heatmap, weights.cpu().numpy(), dependent.cpu().numpy(), independent.cpu().numpy(), total,
                         int(masks.ne(0).sum()), str(run_device), time.perf_counter() - started, held.notes)


class _ChannelGate:
    """Forward hook on one layer: multiplies its output by per-sample channel masks, or keeps it."""

    def __init__(self, model: nn.Module, layer: str) -> None:
        self.module, self.layer = dict(model.named_modules())[layer], layer
        self.masks: torch.Tensor | None = None
        self.capture, self.captured, self.channels = False, None, 0
        self.handle = None

    def _hook(self, module, inputs, output):
        if not isinstance(output, torch.Tensor) or output.ndim < 3:
            raise LayerError(f"layer '{self.layer}' does not return a (N, channels, *spatial) tensor; "
                             "choose a convolution or block output")
        self.channels = output.shape[1]
        if self.capture:
            self.captured = output.detach().clone()
        if self.masks is not None:
            return output * self.masks.view(*self.masks.shape, *(1,) * (output.ndim - 2)).to(output.dtype)
        return None

    def __enter__(self) -> _ChannelGate:
        self.handle = self.module.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()
