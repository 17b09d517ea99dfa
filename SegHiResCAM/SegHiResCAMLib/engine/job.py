"""The engine's one batch loop: every method, every layer, sample batch by sample batch.

:func:`explain_samples` runs any list of :class:`~.methods.HeatmapMethod` with one settings object:
first the methods' preparations (Kernel-Weighted Contribution's ablations), then one pass over the
samples that captures the layers' activations, takes one ``torch.autograd.grad`` when a method needs
the gradient, and draws every method's map. Maps are ReLU'd at layer resolution (``settings.relu``),
upsampled to the input grid, and combined over layers; a sample whose region is empty has a zero map
(its target is zero by definition), and slices with an empty given region are skipped. A 2D model
over a volume runs slice by slice in batches sized to the free memory.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..errors import InputError, LayerError
from ..progress import ProgressCallback, split_progress
from ..settings import ExplainSettings
from .arrange import arrange_samples, image_tensor
from .capture import check_layers, forward_with_activations, segmentation_output
from .device import fitting_count, in_chunks, prepared_model, resolve_device
from .held_model import held_model
from .methods import HeatmapMethod, Preparation
from .notes import empty_region_note, no_positive_evidence_notes
from .resize import combine_layer_maps, upsample_to
from .targets import per_sample_scores, roi_on_output_grid
from .torch_errors import is_out_of_memory


@dataclass(frozen=True)
class Explanation:
    """What one explanation produced.

    Attributes:
        maps: method name -> float32 heatmap of the image's spatial shape.
        device: the device that ran ("cpu", "cuda:0").
        roi_voxels: voxels (output grid) in the region that defined the target.
        seconds: wall time of the whole call.
        warnings: messages for the user (empty region, CPU fallback, ...).
    """

    maps: dict[str, np.ndarray]
    device: str
    roi_voxels: int
    seconds: float
    warnings: tuple[str, ...] = ()

    @property
    def heatmap(self) -> np.ndarray:
        """The heatmap of the first method asked for."""
        return next(iter(self.maps.values()))


def explain_samples(
    model: nn.Module,
    image,
    settings: ExplainSettings,
    methods: Sequence[HeatmapMethod],
    *,
    roi=None,
    spatial_dims: int | None = None,
    progress: ProgressCallback | None = None,
) -> Explanation:
    """Run ``methods`` as ``settings`` say, on ``image`` ``(C, *spatial)`` with the region ``roi``
    (None = the model's prediction; the settings' region kind is already applied).

    ``model`` may be a module, a TorchScript module or a ``LoadedModel``, whose card fills what the
    settings and ``spatial_dims`` leave open (``engine.held_model``). The settings must then name at
    least one layer and a class index. The model runs in its owner's inference mode
    (``engine.device.prepared_model``). ``progress`` may raise (``CancelledError``) to stop the run;
    the model and hooks are left as found.
    """
    started = time.perf_counter()
    held = held_model(model)
    model, settings, spatial_dims = held.module, held.settings(settings), held.spatial_dims(spatial_dims, image)
    if not settings.layers:
        raise InputError("no layer was given; pick at least one layer to explain (list them with list_layers, or "
                         "name a default in the model card's \"layers\")")
    for method in methods:
        method.check(model)
    check_layers(model, settings.layers)
    device = resolve_device(settings.device)
    job = _Job(model, settings, methods, progress)
    maps, device, roi_voxels, notes = job.maps(image, roi, spatial_dims, device)
    return Explanation(maps, str(device), roi_voxels, time.perf_counter() - started,
                       tuple(dict.fromkeys([*held.notes, *notes])))


class _GpuExhausted(Exception):
    """Raised inside a run when even a batch of one does not fit on the GPU."""


class _Job:
    """One explanation over a stack of samples, batch by batch."""

    def __init__(self, model: nn.Module, settings: ExplainSettings, methods: Sequence[HeatmapMethod],
                 progress: ProgressCallback | None) -> None:
        self.model, self.settings, self.methods = model, settings, list(methods)
        self.layers, self.class_index = list(settings.layers), int(settings.target_class)
        self.needs_gradient = any(method.uses_gradient for method in self.methods)
        # Preparations first, then the pass that draws the maps. Drawing without a gradient is one
        # forward pass per sample against the preparations' many: it gets no share of the bar.
        weights = [method.preparation_weight for method in self.methods] + [1.0 if self.needs_gradient else 0.0]
        *self.preparation_progress, self.progress = split_progress(progress, weights)

    def maps(self, image, roi, spatial_dims: int | None, device: torch.device):
        """Every method's map on the image grid, the device that ran, region voxels and notes."""
        slice_axis = 0 if self.settings.slice_axis is None else self.settings.slice_axis
        samples, roi_t, layout = arrange_samples(image_tensor(image, self.model), roi, spatial_dims, slice_axis)
        notes: list[str] = []
        try:
            maps, roi_voxels = self.run(samples, roi_t, device)
        except _GpuExhausted:
            notes.append("the GPU ran out of memory even one slice at a time, so the CPU computed this heatmap instead")
            device = torch.device("cpu")
            maps, roi_voxels = self.run(samples, roi_t, device)
        if roi_voxels == 0:
            notes.append(empty_region_note(self.settings.target, roi is not None, self.class_index,
                                           self.settings.target_threshold))
        elif self.settings.relu:
            notes.extend(no_positive_evidence_notes(maps, [method.name for method in self.methods], self.layers))
        result = {}
        for method in self.methods:
            combined = combine_layer_maps([maps[(method.name, name)] for name in self.layers], self.settings.normalize)
            result[method.name] = layout.restore(combined).to(torch.float32).cpu().numpy()
        return result, device, roi_voxels, notes

    def run(self, samples: torch.Tensor, roi: torch.Tensor | None, device: torch.device):
        count, spatial = samples.shape[0], tuple(samples.shape[2:])
        if roi is None:
            todo = torch.arange(count)
        else:
            todo = torch.nonzero(roi.flatten(1).ne(0).any(dim=1)).flatten()
        maps = {
            (method.name, name): torch.zeros((count, *spatial), device=device, dtype=samples.dtype)
            for method in self.methods
            for name in self.layers
        }
        if len(todo) == 0:
            return maps, 0
        roi_voxels = 0
        with prepared_model(self.model, device):
            try:
                self._prepare(samples, roi, todo, device)
                # Saved activations for backward plus gradients: about twice the forward's outputs.
                size = self.settings.batch_size or fitting_count(self.model, samples[todo[:1]].to(device), len(todo),
                                                                 factor=2)
                done = 0
                self._report(0.0, len(todo))

                def step(chunk: torch.Tensor) -> None:
                    nonlocal roi_voxels, done
                    index = todo[chunk]
                    batch_maps, voxels = self._explain_batch(
                        samples[index].to(device), None if roi is None else roi[index].to(device), spatial
                    )
                    for key, value in batch_maps.items():
                        maps[key][index.to(device)] = value
                    roi_voxels += voxels
                    done += len(index)
                    self._report(done / len(todo), len(todo), done)

                in_chunks(len(todo), size, device, step)
            except RuntimeError as error:
                if device.type == "cuda" and is_out_of_memory(error):
                    raise _GpuExhausted() from error
                raise
        return maps, roi_voxels

    def _prepare(self, samples: torch.Tensor, roi: torch.Tensor | None, todo: torch.Tensor,
                 device: torch.device) -> None:
        for method, progress in zip(self.methods, self.preparation_progress):
            if method.preparation_weight > 0:
                method.prepare(Preparation(
                    self.model, samples, roi, todo, device, self.layers, self.class_index,
                    bool(self.settings.multilabel), bool(self.settings.probabilities), self.settings.output_key,
                    progress,
                ))

    def _report(self, fraction: float, total: int, done: int = 0) -> None:
        if self.progress is not None:
            unit = "slice" if total > 1 else "volume"
            self.progress(fraction, f"explained {done} of {total} {unit}{'s' if total > 1 else ''}")

    def _explain_batch(self, batch: torch.Tensor, roi: torch.Tensor | None, spatial: tuple[int, ...]):
        output, activations = forward_with_activations(self.model, batch, self.layers, self.settings.output_key)
        output = segmentation_output(output, batch, self.class_index)
        roi_out = None if roi is None else roi_on_output_grid(roi, tuple(output.shape[2:]))
        scores, used = per_sample_scores(output, self.class_index, roi_out, target=self.settings.target,
                                         threshold=self.settings.target_threshold,
                                         multilabel=bool(self.settings.multilabel),
                                         probabilities=bool(self.settings.probabilities))
        voxels = int(used.ne(0).sum())
        present = used.flatten(1).ne(0).any(dim=1)
        if self.needs_gradient:
            gradients = torch.autograd.grad(scores.sum(), activations, allow_unused=True)
        else:
            gradients = (None,) * len(activations)
        del output, scores
        maps = {}
        with torch.no_grad():
            for name, activation, gradient in zip(self.layers, activations, gradients):
                if self.needs_gradient and gradient is None:
                    raise LayerError(
                        f"the output does not depend on layer '{name}', so it has nothing to explain; "
                        "choose a layer on the path to the output"
                    )
                activation = activation.detach()
                for method in self.methods:
                    layer_map = method.layer_map(name, activation, gradient)
                    if self.settings.relu:
                        layer_map = torch.relu(layer_map)
                    # A sample whose region is empty has a zero target, so a zero map by definition.
                    layer_map = torch.where(present.view(-1, *(1,) * (layer_map.ndim - 1)), layer_map,
                                            torch.zeros_like(layer_map))
                    maps[(method.name, name)] = upsample_to(layer_map, spatial)
        return maps, voxels
