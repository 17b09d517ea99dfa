"""The engine's entry points: ``explain`` and ``explain_detailed``.

One forward pass records the graph downstream of the chosen layer(s); one
``torch.autograd.grad`` gives the gradient for every method asked for; the maps are
ReLU'd at layer resolution, upsampled to the input grid and normalised by the maximum
over the whole volume. A 2D model over a volume runs slice by slice in batches, and
slices whose ROI is empty are skipped (their map is zero by definition).
"""

from __future__ import annotations

import time
import warnings as _warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..errors import InputError, LayerError
from .capture import check_layers, forward_with_activations, segmentation_output
from .device import fitting_count, in_chunks, is_out_of_memory, prepared_model, resolve_device
from .held_model import held_model
from .methods import METHODS

KERNEL_WEIGHTED = "kernel-weighted-contribution"
METHOD_NAMES = (*METHODS, KERNEL_WEIGHTED)
from .resize import combine_layer_maps, upsample_to
from .targets import TARGETS, per_sample_scores, roi_on_output_grid

ProgressCallback = Callable[[float, str], None]


@dataclass(frozen=True)
class Explanation:
    """What one explanation produced.

    Attributes:
        maps: method name -> float32 map of the image's spatial shape.
        device: the device that ran ("cpu", "cuda:0").
        roi_voxels: voxels (output grid) in the region that defined the target.
        seconds: wall time of the whole call.
        warnings: messages for the user (empty ROI, CPU fallback, ...).
    """

    maps: dict[str, np.ndarray]
    device: str
    roi_voxels: int
    seconds: float
    warnings: tuple[str, ...] = ()

    @property
    def heatmap(self) -> np.ndarray:
        """The map of the first method asked for."""
        return next(iter(self.maps.values()))


def explain(
    model: nn.Module,
    image,
    *,
    layer: str | Sequence[str] | None = None,
    target_class: int,
    roi=None,
    method: str = "seg-hires-grad-cam",
    target: str = "logits",
    threshold: float = 0.5,
    spatial_dims: int | None = None,
    slice_axis: int | None = None,
    normalize: bool = True,
    relu: bool = True,
    multilabel: bool | None = None,
    probabilities: bool | None = None,
    output_key: int | str | None = None,
    device: str = "auto",
) -> np.ndarray:
    r"""Class activation map of ``target_class`` over ``roi`` for one image.

    With ``y = sum_p m(p) z_c(p)`` (``m`` the ROI, ``z_c`` the class-c logits) and
    ``G = dy/dA`` at the chosen layer, Seg-HiRes-Grad CAM is ``ReLU(sum_k G_k * A_k)``
    and Seg-Grad CAM ``ReLU(sum_k mean(G_k) A_k)``; see ``engine.methods`` for all.

    Args:
        model: ``torch.nn.Module`` whose output is ``(N, classes, *spatial)``, a TorchScript
            module (``torch.jit.load``), or a ``LoadedModel`` (``load_model``), whose card
            gives what is left as None here (layer, spatial_dims, slice_axis, multilabel,
            probabilities, output_key); the image is used as given, without the card's
            preprocessing (``pipeline.explain_volume`` applies it to volumes). A model in eval
            mode runs exactly as it is (submodules left in training mode stay so); a model
            wholly in training mode runs in eval mode, with a warning. Modes and buffers are
            restored afterwards.
        image: numpy array or tensor ``(channels, *spatial)``.
        layer: a name from ``model.named_modules()``; a list gives the mean of the
            layers' maps, each upsampled and normalised first; None = the model card's.
        target_class: the class c (output channel).
        roi: bool or float array of the image's spatial shape; None = the model's own
            prediction for c (argmax; for one output channel, logit > 0; with the
            probability-threshold target, probability > threshold).
        method: a key of ``METHODS``.
        target: "logits" or "probability-threshold" (``y = sum_p s_c(p) [s_c(p) > t]``).
        threshold: t for the probability-threshold target.
        spatial_dims: the model's spatial dims; 2 with a 3D image applies a 2D model
            slice by slice along ``slice_axis`` (normalised over the whole volume).
        slice_axis: axis of the image's spatial dims to slice along (0, 1 or 2; default 0).
        normalize: divide by the maximum over the whole map (an all-zero map stays zero).
        relu: keep only positive evidence (the methods' definition); False gives the
            signed map, for analysis.
        multilabel: the classes are independent (one sigmoid per channel, e.g. nnU-Net
            region-based models): the predicted region is sigmoid > 0.5 instead of argmax.
        probabilities: the model outputs probabilities (its last layer is a softmax or
            sigmoid), not logits: they are used as they are.
        output_key: for a model returning a tuple, list or dict (deep supervision, UNet++),
            the entry (index or key) that is the segmentation; None = the one entry at the
            input's full resolution (see ``engine.capture.select_output``).
        device: "auto" (CUDA if available), "cpu" or "cuda".

    Returns:
        float32 array of shape ``image.shape[1:]``; all zeros, with a warning, when the
        ROI is empty.

    Example:
        >>> heat = explain(net, ct[None], layer="bottleneck", target_class=1)  # doctest: +SKIP
    """
    result = explain_detailed(
        model, image, layer=layer, target_class=target_class, roi=roi, methods=(method,), target=target,
        threshold=threshold, spatial_dims=spatial_dims, slice_axis=slice_axis, normalize=normalize, relu=relu,
        multilabel=multilabel, probabilities=probabilities, output_key=output_key, device=device,
    )
    for message in result.warnings:
        _warnings.warn(message, RuntimeWarning, stacklevel=2)
    return result.heatmap


def explain_detailed(
    model: nn.Module,
    image,
    *,
    layer: str | Sequence[str] | None = None,
    target_class: int,
    roi=None,
    methods: Sequence[str] = ("seg-hires-grad-cam",),
    target: str = "logits",
    threshold: float = 0.5,
    spatial_dims: int | None = None,
    slice_axis: int | None = None,
    normalize: bool = True,
    relu: bool = True,
    multilabel: bool | None = None,
    probabilities: bool | None = None,
    output_key: int | str | None = None,
    device: str = "auto",
    progress: ProgressCallback | None = None,
    batch_size: int | None = None,
) -> Explanation:
    """Like :func:`explain`, for several methods from one backward pass, with facts about the run.

    ``progress(fraction, message)`` is called after each batch; an exception raised in it
    (``CancelledError``) stops the run with the model and hooks left as they were.
    ``batch_size`` fixes the slices per batch (default: sized to the free memory).
    """
    started = time.perf_counter()
    held = held_model(model)
    model, given = held.module, held.choices(
        layer=layer, spatial_dims=spatial_dims, slice_axis=slice_axis, multilabel=multilabel,
        probabilities=probabilities, output_key=output_key, image_dims=np.ndim(image) - 1)
    layer, spatial_dims, slice_axis, output_key = given.layer, given.spatial_dims, given.slice_axis, given.output_key
    multilabel, probabilities = given.multilabel, given.probabilities
    layers = [layer] if isinstance(layer, str) else list(layer)
    methods = list(methods)
    unknown = [m for m in methods if m not in METHOD_NAMES]
    if unknown or not methods:
        raise InputError(
            f"method {unknown[0] if unknown else None!r} is unknown; choose one of {', '.join(METHOD_NAMES)}"
        )
    if target not in TARGETS:
        raise InputError(f"target {target!r} is unknown; choose one of {', '.join(TARGETS)}")
    check_layers(model, layers)

    gradient_methods = [m for m in methods if m in METHODS]
    ablation = KERNEL_WEIGHTED in methods
    if ablation and (target != "logits" or not relu):
        raise InputError(
            "Kernel-Weighted Contribution weighs channels by the class probability inside the region and "
            "keeps positive evidence only; use it with the logits target and relu=True"
        )
    # KWC costs about 2K forward passes against the gradient methods' one: most of the bar is its.
    gradient_share = 0.1 if ablation else 1.0
    result: dict[str, np.ndarray] = {}
    notes: list[str] = list(held.notes)
    resolved, roi_voxels = resolve_device(device), 0
    if gradient_methods:
        job = _Job(model, layers, int(target_class), gradient_methods, target, float(threshold), relu, multilabel,
                   probabilities, scaled_progress(progress, 0.0, gradient_share), output_key)
        result, resolved, roi_voxels, job_notes = job.maps(image, roi, spatial_dims, slice_axis, normalize,
                                                           resolved, batch_size)
        notes += job_notes
    if ablation:
        from .kernel_weighted import kernel_weighted_detailed

        runs = [
            kernel_weighted_detailed(
                model, image, layer=name, target_class=target_class, roi=roi, spatial_dims=spatial_dims,
                slice_axis=slice_axis, normalize=False, device=device,
                progress=scaled_progress(progress, gradient_share + (1 - gradient_share) * i / len(layers),
                                         (1 - gradient_share) / len(layers)),
                multilabel=multilabel, probabilities=probabilities, output_key=output_key,
            )
            for i, name in enumerate(layers)
        ]
        heat = combine_layer_maps([torch.from_numpy(run.heatmap) for run in runs], normalize)
        result[KERNEL_WEIGHTED] = heat.to(torch.float32).numpy()
        notes += [message for run in runs for message in run.warnings]
        if not gradient_methods:
            resolved, roi_voxels = torch.device(runs[0].device), runs[0].roi_voxels
    return Explanation({m: result[m] for m in methods}, str(resolved), roi_voxels, time.perf_counter() - started,
                       tuple(dict.fromkeys(notes)))


def scaled_progress(progress: ProgressCallback | None, start: float, share: float) -> ProgressCallback | None:
    """A progress callback that maps a stage's 0..1 onto ``start .. start + share`` of the whole."""
    if progress is None:
        return None

    def report(fraction: float, message: str) -> None:
        progress(start + share * min(max(float(fraction), 0.0), 1.0), message)

    return report


class _GpuExhausted(Exception):
    """Raised inside a run when even a batch of one does not fit on the GPU."""


@dataclass(frozen=True)
class _Layout:
    """How samples (batch of model inputs) map back to the image's spatial shape."""

    slice_axis: int | None

    def restore(self, maps: torch.Tensor) -> torch.Tensor:
        if self.slice_axis is None:
            return maps[0]
        return maps.movedim(0, self.slice_axis)


def _image_tensor(image, model: nn.Module) -> torch.Tensor:
    tensor = image if isinstance(image, torch.Tensor) else torch.as_tensor(np.asarray(image))
    if not (tensor.dtype.is_floating_point or tensor.dtype in (torch.uint8, torch.int8, torch.int16, torch.int32,
                                                              torch.int64, torch.bool)):
        raise InputError(f"the image has data type {tensor.dtype}; give real-valued intensities")
    floating = [p.dtype for p in list(model.parameters()) + list(model.buffers()) if p.dtype.is_floating_point]
    tensor = tensor.detach().to(floating[0] if floating else torch.float32)
    if tensor.ndim < 3:
        raise InputError(
            f"the image has shape {tuple(tensor.shape)}; give (channels, *spatial), e.g. (1, 64, 64) or (1, 96, 96, 96)"
        )
    if not torch.isfinite(tensor).all():
        raise InputError("the image contains NaN or infinite values; fix or mask them before explaining")
    return tensor


def _arrange(image: torch.Tensor, roi, spatial_dims: int | None, slice_axis: int):
    """Samples ``(S, C, *model_spatial)`` and ROI ``(S, *model_spatial)`` (or None)."""
    spatial = tuple(image.shape[1:])
    dims = len(spatial) if spatial_dims is None else int(spatial_dims)
    if dims not in (2, 3) or dims > len(spatial) or len(spatial) - dims > 1:
        raise InputError(
            f"spatial_dims={spatial_dims} does not fit an image of spatial shape {spatial}; "
            "use 3 for a 3D model, 2 for a 2D model (on 2D images or slice by slice on volumes)"
        )
    roi_t = None
    if roi is not None:
        roi_t = roi.detach() if isinstance(roi, torch.Tensor) else torch.as_tensor(np.asarray(roi))
        if tuple(roi_t.shape) != spatial:
            raise InputError(
                f"the region has shape {tuple(roi_t.shape)} but the image's spatial shape is {spatial}; "
                "give a mask on the same grid as the image"
            )
        if not roi_t.dtype.is_floating_point:
            roi_t = roi_t != 0
    if dims == len(spatial):
        return image[None], (None if roi_t is None else roi_t[None]), _Layout(None)
    if slice_axis not in (0, 1, 2):
        raise InputError(f"slice_axis must be 0, 1 or 2 for a volume, got {slice_axis}")
    samples = image.movedim(1 + slice_axis, 0)
    return samples, (None if roi_t is None else roi_t.movedim(slice_axis, 0)), _Layout(slice_axis)


class _Job:
    """One explanation over a stack of samples, batch by batch."""

    def __init__(self, model, layers, class_index, methods, target, threshold, relu, multilabel, probabilities,
                 progress, output_key=None) -> None:
        self.model, self.layers, self.class_index = model, layers, class_index
        self.methods, self.target, self.threshold = methods, target, threshold
        self.relu, self.multilabel, self.probabilities, self.progress = relu, multilabel, probabilities, progress
        self.output_key = output_key

    def maps(self, image, roi, spatial_dims, slice_axis, normalize, device, batch_size):
        """Every method's map on the image grid, the device that ran, ROI voxels and notes."""
        samples, roi_t, layout = _arrange(_image_tensor(image, self.model), roi, spatial_dims, slice_axis)
        notes: list[str] = []
        try:
            maps, roi_voxels = self.run(samples, roi_t, device, batch_size)
        except _GpuExhausted:
            notes.append("the GPU ran out of memory even one slice at a time, so the CPU computed this map instead")
            device = torch.device("cpu")
            maps, roi_voxels = self.run(samples, roi_t, device, batch_size)
        if roi_voxels == 0:
            if self.target == "probability-threshold":
                where = "inside the region" if roi is not None else "in this image"
                notes.append(f"no voxel {where} has a class-{self.class_index} probability above {self.threshold}")
            elif roi is not None:
                notes.append("the region to explain is empty inside the image")
            else:
                notes.append(f"the model predicts no voxel of class {self.class_index} in this image")
            notes[-1] += ", so the heatmap is all zeros; choose a region or class that is present"
        result = {}
        for method in self.methods:
            combined = combine_layer_maps([maps[(method, name)] for name in self.layers], normalize)
            result[method] = layout.restore(combined).to(torch.float32).cpu().numpy()
        return result, device, roi_voxels, notes

    def run(self, samples: torch.Tensor, roi: torch.Tensor | None, device: torch.device, batch_size: int | None):
        count, spatial = samples.shape[0], tuple(samples.shape[2:])
        if roi is None:
            todo = torch.arange(count)
        else:
            todo = torch.nonzero(roi.flatten(1).ne(0).any(dim=1)).flatten()
        maps = {
            (method, name): torch.zeros((count, *spatial), device=device, dtype=samples.dtype)
            for method in self.methods
            for name in self.layers
        }
        roi_voxels = 0
        if len(todo) == 0:
            return maps, 0
        with prepared_model(self.model, device):
            # Saved activations for backward plus gradients: about twice the forward's outputs.
            size = batch_size or fitting_count(self.model, samples[todo[:1]].to(device), len(todo), factor=2)
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

            try:
                in_chunks(len(todo), size, device, step)
            except RuntimeError as error:
                if device.type == "cuda" and is_out_of_memory(error):
                    raise _GpuExhausted() from error
                raise
        return maps, roi_voxels

    def _report(self, fraction: float, total: int, done: int = 0) -> None:
        if self.progress is not None:
            unit = "slice" if total > 1 else "volume"
            self.progress(fraction, f"explained {done} of {total} {unit}{'s' if total > 1 else ''}")

    def _explain_batch(self, batch: torch.Tensor, roi: torch.Tensor | None, spatial: tuple[int, ...]):
        output, activations = forward_with_activations(self.model, batch, self.layers, self.output_key)
        output = segmentation_output(output, batch, self.class_index)
        roi_out = None if roi is None else roi_on_output_grid(roi, tuple(output.shape[2:]))
        scores, used = per_sample_scores(output, self.class_index, roi_out, target=self.target,
                                         threshold=self.threshold, multilabel=self.multilabel,
                                         probabilities=self.probabilities)
        voxels = int(used.ne(0).sum())
        gradients = torch.autograd.grad(scores.sum(), activations, allow_unused=True)
        del output, scores
        maps = {}
        with torch.no_grad():
            for name, activation, gradient in zip(self.layers, activations, gradients):
                if gradient is None:
                    raise LayerError(
                        f"the output does not depend on layer '{name}', so it has nothing to explain; "
                        "choose a layer on the path to the output"
                    )
                activation = activation.detach()
                for method in self.methods:
                    layer_map = METHODS[method](activation, gradient)
                    if self.relu:
                        layer_map = torch.relu(layer_map)
                    maps[(method, name)] = upsample_to(layer_map, spatial)
        return maps, voxels
