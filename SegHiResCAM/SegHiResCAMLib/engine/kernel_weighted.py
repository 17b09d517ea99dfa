"""Kernel-Weighted Contribution (KWC, SPIE 2022): weights for a layer's channels from ablations.

With ``P(p) = m(p) s_c(p)`` (class-c probability inside the ROI m) and ``S = sum_p P(p)``:
``D_k = sum_p [P(p) - min(P^(-k)(p), P(p))]`` (prediction lost when channel k is zeroed),
``I_k = sum_p min(P^(k only)(p), P(p))`` (prediction kept with every other channel zeroed),
``w_k = D_k I_k / S`` min-max normalised over k, and the map is ``ReLU(sum_k w_k ReLU(A_k))``.
This is the deterministic 2023 variant: a channel is removed by zeroing the layer's output
channel (``engine.capture.channel_gates``), not by drawing a random kernel. It costs 2K forward
passes (K channels), run in batches of (sample, channel mask) pairs under ``torch.inference_mode``.

:class:`KernelWeightedContribution` is one more :class:`~.methods.HeatmapMethod`: its ablations are
its preparation, and the engine's batch loop draws its maps beside the gradient methods'.
"""

from __future__ import annotations

import warnings as _warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..errors import LayerError, SegHiResCAMWarning
from ..settings import ExplainSettings
from .capture import channel_gates, segmentation_output
from .device import fitting_count, in_chunks
from .job import explain_samples
from .methods import HeatmapMethod, Preparation
from .targets import roi_prediction

NAME = "kernel-weighted-contribution"


@dataclass(frozen=True)
class KernelWeights:
    """A KWC run: the map and the per-channel quantities behind it (arrays of length K; empty when
    the region is empty, since nothing was ablated)."""

    heatmap: np.ndarray
    weights: np.ndarray
    dependent: np.ndarray
    independent: np.ndarray
    prediction_total: float
    roi_voxels: int
    device: str
    seconds: float
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class _LayerWeights:
    weights: torch.Tensor  # float64 (K,)
    dependent: torch.Tensor
    independent: torch.Tensor
    total: float


class KernelWeightedContribution(HeatmapMethod):
    """KWC as a heatmap method: ablations in :meth:`prepare`, maps ``ReLU(sum_k w_k ReLU(A_k))``.

    Args:
        pairs_per_pass: (sample, channel) pairs per ablation forward pass; None = sized to the free memory.
    """

    name = NAME
    uses_gradient = False
    # About 2K forward passes for K channels against the gradient pass's one forward and backward.
    preparation_weight = 9.0

    def __init__(self, pairs_per_pass: int | None = None) -> None:
        self.pairs_per_pass = pairs_per_pass
        self.found: dict[str, _LayerWeights] = {}

    def check(self, model: nn.Module) -> None:
        if hasattr(model, "forward_capturing"):
            raise LayerError("Kernel-Weighted Contribution zeroes channels with forward hooks, which this model "
                             "(TorchScript, or an nnU-Net ensemble of folds) does not accept; use a Python model (for "
                             "nnU-Net, one fold's fold_N folder) or another method")

    def prepare(self, run: Preparation) -> None:
        self.found = {}
        with channel_gates(run.model, run.layers) as gates, torch.inference_mode():
            # Chunks of forward passes under inference mode: one forward's outputs each, no factor.
            size = self.pairs_per_pass or fitting_count(run.model, run.samples[run.todo[:1]].to(run.device),
                                                        limit=2**31)
            prediction, masks = _reference(run, size)
            kept = torch.nonzero(masks.flatten(1).ne(0).any(1)).flatten().cpu()  # sample indices
            total = float(prediction.sum())
            for position, layer in enumerate(run.layers):
                gate = gates[layer]
                if gate.channels == 0:
                    raise LayerError(f"layer '{layer}' is not used when the model runs; choose a layer on the path "
                                     "to the output")
                share = 1.0 / len(run.layers)
                progress = None if run.progress is None else _scaled(run.progress, position * share, share)
                self.found[layer] = _ablate(run, gate, masks, kept, total, size, progress)

    def layer_map(self, layer: str, activation: torch.Tensor, gradient: torch.Tensor | None) -> torch.Tensor:
        weights = self.found[layer].weights.to(activation.device)
        layer_map = torch.einsum("bk...,k->b...", torch.relu(activation.to(torch.float64)), weights)
        return torch.relu(layer_map).to(activation.dtype)


def _scaled(progress: Callable[[float, str], None], start: float, share: float) -> Callable[[float, str], None]:
    return lambda fraction, message: progress(start + share * fraction, message)


def _reference(run: Preparation, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """P and m on the output grid (float64) for every sample; zero where there is nothing to do."""
    found: dict[str, torch.Tensor] = {}  # allocated once the output size is known

    def reference(chunk: torch.Tensor) -> None:
        index = run.todo[chunk]
        output = segmentation_output(run.model(run.samples[index].to(run.device)), run.samples, run.class_index,
                                     run.output_key)
        given = None if run.roi is None else run.roi[index].to(run.device)
        kept_prediction, roi_weights = roi_prediction(output, run.class_index, given, run.multilabel,
                                                      run.probabilities)
        if not found:
            found["P"] = torch.zeros((run.samples.shape[0], *output.shape[2:]), dtype=torch.float64,
                                     device=run.device)
            found["m"] = torch.zeros_like(found["P"])
        found["P"][index], found["m"][index] = kept_prediction, roi_weights

    in_chunks(len(run.todo), size, run.device, reference)
    return found["P"], found["m"]


def _ablate(run: Preparation, gate, masks: torch.Tensor, kept: torch.Tensor, total: float, size: int,
            progress: Callable[[float, str], None] | None) -> _LayerWeights:
    """D_k, I_k and the weights of one layer's K channels, from 2K ablated passes per kept sample."""
    channels = gate.channels
    if total <= 0:
        empty = torch.zeros(channels, dtype=torch.float64)
        return _LayerWeights(empty, empty, empty, 0.0)
    # Rows 0..K-1 zero one channel, rows K..2K-1 keep one, the last row keeps all: each chunk carries
    # its own unablated copies, so P and P~ come from the same batch and share its rounding.
    table = torch.cat([1 - torch.eye(channels), torch.eye(channels), torch.ones(1, channels)]).to(run.device)
    sums = torch.zeros(2 * channels, dtype=torch.float64, device=run.device)
    pairs = 2 * channels * len(kept)

    def ablate(index: torch.Tensor) -> None:
        rows, which = index % (2 * channels), kept[index // (2 * channels)]
        distinct, position = torch.unique(which, return_inverse=True)
        gate.masks = table[torch.cat([rows, torch.full((len(distinct),), 2 * channels)])]
        try:
            batch = run.samples[torch.cat([which, distinct])].to(run.device)
            output = segmentation_output(run.model(batch), run.samples, run.class_index, run.output_key)
        finally:
            gate.masks = None
        regions = masks[torch.cat([which, distinct])]
        predicted, _ = roi_prediction(output, run.class_index, regions, run.multilabel, run.probabilities)
        original = predicted[len(index):][position.to(run.device)]
        kept_voxels = torch.minimum(predicted[: len(index)], original)
        kept_part, lost_part = kept_voxels.flatten(1).sum(1), (original - kept_voxels).flatten(1).sum(1)
        rows = rows.to(run.device)
        sums.index_add_(0, rows, torch.where(rows < channels, lost_part, kept_part))
        if progress is not None:
            progress(float(index[-1] + 1) / pairs, f"ablated {int(index[-1]) + 1} of {pairs} channel passes")

    in_chunks(pairs, size, run.device, ablate)
    dependent, independent = sums[:channels], sums[channels:]
    raw = dependent * independent / total
    spread = raw.max() - raw.min()
    weights = (raw - raw.min()) / spread if spread > 0 else torch.ones_like(raw)
    return _LayerWeights(weights, dependent, independent, total)


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
        _warnings.warn(message, SegHiResCAMWarning, stacklevel=2)
    return result.heatmap


def kernel_weighted_detailed(model: nn.Module, image, *, layer: str | None = None, target_class: int, roi=None,
                             spatial_dims: int | None = None, slice_axis: int | None = None, normalize: bool = True,
                             device: str = "auto", batch_size: int | None = None,
                             progress: Callable[[float, str], None] | None = None,
                             multilabel: bool | None = None, probabilities: bool | None = None,
                             output_key: int | str | None = None) -> KernelWeights:
    """Like :func:`kernel_weighted_contribution`, returning the weights, D_k, I_k and S too."""
    settings = ExplainSettings(target_class=target_class, layers=() if layer is None else (layer,), methods=(NAME,),
                               device=device, slice_axis=slice_axis, multilabel=multilabel,
                               probabilities=probabilities, output_key=output_key, normalize=normalize,
                               batch_size=batch_size)
    method = KernelWeightedContribution(pairs_per_pass=batch_size)
    result = explain_samples(model, image, settings, [method], roi=roi, spatial_dims=spatial_dims, progress=progress)
    found = next(iter(method.found.values()), None)  # one layer: the given one, or the model card's
    if found is None:  # the region is empty: nothing was ablated
        none = np.zeros(0, np.float64)
        return KernelWeights(result.heatmap, none, none, none, 0.0, result.roi_voxels, result.device, result.seconds,
                             result.warnings)
    return KernelWeights(result.heatmap, found.weights.cpu().numpy(), found.dependent.cpu().numpy(),
                         found.independent.cpu().numpy(), found.total, result.roi_voxels, result.device,
                         result.seconds, result.warnings)
