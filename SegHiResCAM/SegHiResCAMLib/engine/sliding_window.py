r"""Sliding-window prediction and explanations exact to the model's own fused prediction.

A patch-trained model runs over overlapping windows w whose outputs are fused with the
importance weights g_w (``engine.tiling``): ``Z(p) = sum_w g_w(p) z_w(p) / D(p)`` with
``D(p) = sum_w g_w(p)``. The target is the fused one, ``y = sum_p m(p) Z_c(p)``, where the
region m is the fused prediction's (or the user's). It splits exactly into the windows' shares

    y = sum_w y_w,   y_w = sum_p [m(p) g_w(p) / D(p)] z_{w,c}(p),

so each window's backward (to the chosen layer, inside that window) is exact for its share,
and a window whose share is zero contributes nothing and is skipped. Each window's signed
map (the method at layer resolution, upsampled to the window's input grid) is added at the
window's place: the maps are contributions to one y, so they are summed, not averaged. ReLU
comes after stitching and the one normalisation by the maximum of the whole map at the very
end, never per window. With one window covering the image (weights cancel: g/D = 1), the
signed map equals the whole-volume engine's.

Methods whose channel weights pool the gradient over space (Seg-Grad CAM, Grad-CAM++,
XGrad-CAM) pool it over each window: their weights are per window, like the slices of a 2D
model. Seg-HiRes-Grad CAM and LayerCAM are element-wise, so nothing is pooled.

The probability-threshold target ``y = sum_p m(p) s_c(p) [s_c(p) > t]`` is taken on the fused
probabilities ``s = softmax(Z)`` (sigmoid for one channel or independent classes), the ones
nnU-Net thresholds: the region is where the fused probability exceeds t. It is not a sum of
the windows' own probabilities; each window's backward starts from the exact gradient
``dy/dZ_k(p) * g_w(p) / D(p)`` of the fused target, so the stitched gradients are exact.

Mirroring (nnU-Net's test-time flips): a window's output is the mean over the flips of the
flipped-back outputs; each flip is a separate sample whose share of y carries the flipped
weights over the number of flips, and its map is flipped back before it is added.
"""

from __future__ import annotations

import contextlib
import warnings as _warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..errors import InputError, LayerError, ModelError, SegHiResCAMWarning
from ..windows import SlidingWindow
from .arrange import image_tensor, region_tensor
from .capture import check_layers, forward_with_activations, segmentation_output
from .device import fitting_count, in_chunks, is_out_of_memory, prepared_model, resolve_device
from .held_model import held_model
from .methods import METHODS
from .notes import empty_region_note, no_positive_evidence_notes
from .resize import combine_layer_maps, upsample_to
from .targets import TARGETS, per_sample_scores
from .tiling import importance_map, mirror_combinations, padding_to_patch, window_corners

ProgressCallback = Callable[[float, str], None]

# Accumulators stay on the GPU only while they take at most this share of its free memory
# (otherwise on the CPU, like nnU-Net's perform_everything_on_device=False).
_ACCUMULATOR_SHARE_OF_GPU = 0.25
# The target's gradient on the fused logits is computed this many voxels at a time.
_TARGET_CHUNK_VOXELS = 2**22


@dataclass(frozen=True)
class WindowedExplanation:
    """What a windowed explanation produced (the same facts as the whole-volume path).

    Attributes:
        maps: method name -> float32 map of the image's spatial shape.
        device: the device that ran the model ("cpu", "cuda:0").
        roi_voxels: voxels of the image in the region that defined the target.
        warnings: messages for the user (empty region, CPU fallback, ...).
        windows: windows in the tiling (per slice for a 2D model on a volume).
        explained: windows whose share of the target was not zero (the others were skipped).
    """

    maps: dict[str, np.ndarray]
    device: str
    roi_voxels: int
    warnings: tuple[str, ...]
    windows: int
    explained: int

    @property
    def heatmap(self) -> np.ndarray:
        """The map of the first method asked for."""
        return next(iter(self.maps.values()))


class _GpuExhausted(Exception):
    """Even one window at a time does not fit on the GPU."""


# ----------------------------------------------------------------------------- the grid of windows


@dataclass(frozen=True)
class _Grid:
    """The image arranged for windows: a 2D model's slice axis first, padded to at least the patch."""

    image: torch.Tensor  # (C, *padded)
    window: SlidingWindow
    slice_axis: int | None  # for a 2D model on a volume
    pads: tuple[tuple[int, int], ...]  # per arranged spatial axis
    corners: tuple[tuple[int, ...], ...]  # each window's first voxel, in the padded grid

    @property
    def padded(self) -> tuple[int, ...]:
        return tuple(self.image.shape[1:])

    @property
    def inside(self) -> tuple[slice, ...]:
        """The image's own voxels in the padded grid."""
        return tuple(slice(before, size - after) for (before, after), size in zip(self.pads, self.padded))

    def place(self, corner: tuple[int, ...]) -> tuple:
        """Index of a window in the padded spatial grid (an integer on a 2D model's slice axis)."""
        patch = self.window.patch_size
        if self.slice_axis is None:
            return tuple(slice(s, s + p) for s, p in zip(corner, patch))
        return (corner[0], *(slice(s, s + p) for s, p in zip(corner[1:], patch)))

    def pad(self, spatial: torch.Tensor) -> torch.Tensor:
        """A ``(*arranged)`` tensor zero-padded like the image."""
        out = spatial.new_zeros(self.padded)
        out[self.inside] = spatial
        return out

    def restore(self, spatial: torch.Tensor) -> torch.Tensor:
        """``(..., *padded)`` -> ``(..., *image spatial)``: padding removed, the slice axis put back."""
        lead = spatial.ndim - len(self.padded)
        out = spatial[(slice(None),) * lead + self.inside]
        if self.slice_axis is not None:
            out = out.movedim(lead, lead + self.slice_axis)
        return out


def _arrange(image: torch.Tensor, roi, window: SlidingWindow, slice_axis: int):
    """The grid of windows and the region (arranged like the grid, unpadded) or None."""
    spatial = tuple(image.shape[1:])
    dims = window.spatial_dims
    if len(spatial) == dims:
        axis = None
    elif len(spatial) == 3 and dims == 2:
        if slice_axis not in (0, 1, 2):
            raise InputError(f"slice_axis must be 0, 1 or 2 for a volume, got {slice_axis}")
        axis = slice_axis
    else:
        raise InputError(
            f"a {dims}D patch {window.patch_size} does not fit an image of spatial shape {spatial}; give a patch with "
            "one size per axis of the model (2 for a 2D model, also on volumes; 3 for a 3D model)"
        )
    roi_t = region_tensor(roi, spatial)
    roi_t = None if roi_t is None else roi_t.to(image.dtype)
    if axis is not None:
        image = image.movedim(1 + axis, 1)
        roi_t = None if roi_t is None else roi_t.movedim(axis, 0)
    arranged = tuple(image.shape[1:])
    model_axes = arranged[1:] if axis is not None else arranged
    pads = padding_to_patch(model_axes, window.patch_size)
    if axis is not None:
        pads = [(0, 0), *pads]
    if any(before or after for before, after in pads):
        flat = [amount for pair in reversed(pads) for amount in pair]
        image = torch.nn.functional.pad(image, flat)
    padded = tuple(image.shape[1:])
    if axis is None:
        corners = window_corners(padded, window.patch_size, window.step)
    else:
        in_plane = window_corners(padded[1:], window.patch_size, window.step)
        corners = [(d, *corner) for d in range(padded[0]) for corner in in_plane]
    return _Grid(image, window, axis, tuple(pads), tuple(corners)), roi_t


# ----------------------------------------------------------------------------- running windows


class _Runner:
    """Runs the model over windows in memory-sized batches; flips, mixed precision and progress."""

    def __init__(self, model: nn.Module, grid: _Grid, device: torch.device, accumulate_on: torch.device,
                 mixed_precision: bool, progress: ProgressCallback | None, batch_size: int | None,
                 output_key: int | str | None) -> None:
        self.model, self.grid, self.device, self.accumulate_on = model, grid, device, accumulate_on
        self.mixed_precision, self.progress, self.batch_size = mixed_precision, progress, batch_size
        self.output_key = output_key
        self.flips = mirror_combinations(grid.window.mirror_axes)
        self.weight = torch.from_numpy(importance_map(grid.window.patch_size, grid.window.gaussian))
        self.dtype = torch.float64 if grid.image.dtype == torch.float64 else torch.float32
        self.done, self.total = 0.0, 0
        self.begin("ran", 0)

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        if self.mixed_precision:
            with torch.autocast(self.device.type, dtype=torch.bfloat16):
                yield
        else:
            yield

    def window_input(self, corner: tuple[int, ...], flip: tuple[int, ...]) -> torch.Tensor:
        sample = self.grid.image[(slice(None), *self.grid.place(corner))]
        return sample.flip([1 + a for a in flip]) if flip else sample

    def begin(self, verb: str, count: int) -> None:
        """Start a stage of ``count`` windows (the fraction runs over all stages' ``total``)."""
        self.verb, self.stage_done, self.stage_count = verb, 0.0, count

    def report(self, windows: float) -> None:
        """Count ``windows`` more done (a fraction when a batch ends inside a window's flips)."""
        self.done += windows
        self.stage_done += windows
        if self.progress is not None:
            self.progress(min(self.done / max(self.total, 1), 1.0),
                          f"{self.verb} {int(self.stage_done + 1e-9)} of {self.stage_count} windows")

    def chunked(self, items: Sequence, step: Callable[[Sequence], None]) -> None:
        """``step`` over consecutive batches of ``items``; CUDA out-of-memory halves the batch."""
        if not items:
            return
        if self.batch_size is None:  # sized once (one probe forward), for every stage of the run
            probe = self.window_input(items[0][0], ())[None].to(self.device)
            self.batch_size = fitting_count(self.model, probe, len(items), factor=2)
        try:
            in_chunks(len(items), self.batch_size, self.device, lambda index: step([items[int(i)] for i in index]))
        except RuntimeError as error:
            if self.device.type == "cuda" and is_out_of_memory(error):
                raise _GpuExhausted() from error
            raise

    def denominator(self) -> torch.Tensor:
        """``D(p) = sum_w g_w(p)`` over the padded grid (no model needed)."""
        total = torch.zeros(self.grid.padded, dtype=self.dtype, device=self.accumulate_on)
        weight = self.weight.to(total)
        for corner in self.grid.corners:
            total[self.grid.place(corner)] += weight
        return total

    def fused_logits(self, denominator: torch.Tensor) -> torch.Tensor:
        """``Z = sum_w g_w z_w / D`` over the padded grid, ``(classes, *padded)``."""
        fused: list[torch.Tensor] = []
        weight = self.weight.to(self.device, self.dtype)
        items = [(corner, ()) for corner in self.grid.corners]

        def step(chunk: Sequence) -> None:
            batch = torch.stack([self.window_input(corner, ()) for corner, _ in chunk]).to(self.device)
            with torch.no_grad(), self.autocast():
                total = None
                for flip in self.flips:
                    dims = [2 + a for a in flip]
                    out = self.model(batch.flip(dims) if flip else batch)
                    out = _checked_output(out, batch, self.grid.window, self.output_key).to(self.dtype)
                    out = out.flip(dims) if flip else out
                    total = out if total is None else total + out
            total = total / len(self.flips) * weight
            if not fused:
                fused.append(torch.zeros((total.shape[1], *self.grid.padded), dtype=self.dtype,
                                         device=self.accumulate_on))
            for (corner, _), logits in zip(chunk, total.to(self.accumulate_on)):
                fused[0][(slice(None), *self.grid.place(corner))] += logits
            self.report(len(chunk))

        self.begin("predicted", len(items))
        self.chunked(items, step)
        return fused[0].div_(denominator)

    def explain(self, share: torch.Tensor, classes: list[int], denominator: torch.Tensor, todo: list[tuple[int, ...]],
                layers: list[str], methods: list[str]) -> dict[tuple[str, str], torch.Tensor]:
        """Signed maps stitched over the padded grid: each window's backward from its share of y."""
        maps = {(m, n): torch.zeros(self.grid.padded, dtype=self.dtype, device=self.accumulate_on)
                for m in methods for n in layers}
        weight = self.weight.to(self.accumulate_on, self.dtype)
        patch = tuple(self.grid.window.patch_size)
        items = [(corner, flip) for corner in todo for flip in self.flips]

        def step(chunk: Sequence) -> None:
            batch = torch.stack([self.window_input(corner, flip) for corner, flip in chunk]).to(self.device)
            shares = []
            for corner, flip in chunk:
                place = self.grid.place(corner)
                # y_w's weights m g_w / D (or dy/dZ g_w / D), split evenly over the flips
                part = share[(slice(None), *place)] * (weight / denominator[place]) / len(self.flips)
                shares.append(part.flip([1 + a for a in flip]) if flip else part)
            with self.autocast():
                output, activations = forward_with_activations(self.model, batch, layers, self.output_key)
                output = _checked_output(output, batch, self.grid.window, self.output_key)
                score = (output[:, classes].to(self.dtype) * torch.stack(shares).to(self.device)).sum()
            gradients = torch.autograd.grad(score, activations, allow_unused=True)
            del output, score
            with torch.no_grad():
                for name, activation, gradient in zip(layers, activations, gradients):
                    if gradient is None:
                        raise LayerError(
                            f"the output does not depend on layer '{name}', so it has nothing to explain; "
                            "choose a layer on the path to the output"
                        )
                    activation, gradient = activation.detach().to(self.dtype), gradient.to(self.dtype)
                    for method in methods:
                        upsampled = upsample_to(METHODS[method](activation, gradient), patch)
                        for (corner, flip), window_map in zip(chunk, upsampled.to(self.accumulate_on)):
                            if flip:
                                window_map = window_map.flip(list(flip))
                            maps[(method, name)][self.grid.place(corner)] += window_map
            self.report(len(chunk) / len(self.flips))

        self.begin("explained", len(todo))
        self.chunked(items, step)
        return maps


def _checked_output(output, batch: torch.Tensor, window: SlidingWindow, output_key: int | str | None) -> torch.Tensor:
    output = segmentation_output(output, batch, 0, output_key)
    if tuple(output.shape[2:]) != tuple(batch.shape[2:]):
        raise ModelError(
            f"the model's output has spatial size {tuple(output.shape[2:])} for a window of {tuple(batch.shape[2:])}; "
            "sliding windows need a model whose output lies on its input's grid"
        )
    return output


def _accumulator_device(device: torch.device, voxels: int, planes: int) -> torch.device:
    if device.type != "cuda":
        return device
    free, _ = torch.cuda.mem_get_info(device)
    return device if 4 * voxels * planes <= _ACCUMULATOR_SHARE_OF_GPU * free else torch.device("cpu")


# ----------------------------------------------------------------------------- the target's share per voxel


def _target_gradient(fused: torch.Tensor | None, roi: torch.Tensor | None, grid: _Grid, device: torch.device,
                     class_index: int, target: str, threshold: float, multilabel: bool, probabilities: bool):
    """``(dy/dZ over the padded grid for the classes that carry it, those classes, region voxels)``.

    For the logits target this is the region itself on class c; for the probability-threshold
    target the gradient of ``sum_p m s_c [s_c > t]`` through the fused softmax (or sigmoid).
    Every term depends on one voxel, so it is computed chunk by chunk along the first axis.
    """
    inside = torch.zeros(grid.padded, dtype=torch.bool, device=device)
    inside[grid.inside] = True
    region = None if roi is None else grid.pad(roi.to(inside.device))
    if target == "logits" and fused is None:  # the user's region: no prediction needed
        share = region[None] * inside
        return share, [class_index], int(share.ne(0).sum())
    if not 0 <= class_index < fused.shape[0]:
        raise InputError(
            f"class {class_index} is out of range: the model outputs {fused.shape[0]} class"
            f"{'es' if fused.shape[0] > 1 else ''} (0 to {fused.shape[0] - 1})"
        )
    classes = [class_index] if target == "logits" else list(range(fused.shape[0]))
    share = torch.zeros((len(classes), *grid.padded), dtype=fused.dtype, device=fused.device)
    voxels = 0
    rows = max(1, _TARGET_CHUNK_VOXELS // max(1, int(np.prod(grid.padded[1:], dtype=np.int64))))
    for start in range(0, grid.padded[0], rows):
        part = slice(start, min(start + rows, grid.padded[0]))
        logits = fused[:, part][None]
        part_roi = None if region is None else region[part][None]
        if target == "logits":
            _, used = per_sample_scores(logits, class_index, part_roi, target=target, threshold=threshold,
                                        multilabel=multilabel, probabilities=probabilities)
            share[0, part] = used[0] * inside[part]
        else:
            with torch.enable_grad():
                logits = logits.detach().requires_grad_()
                score, used = per_sample_scores(logits, class_index, part_roi, target=target, threshold=threshold,
                                                multilabel=multilabel, probabilities=probabilities)
                (gradient,) = torch.autograd.grad(score.sum(), logits)
            share[:, part] = gradient[0] * inside[part]
            used = used * inside[part]
        voxels += int((used[0] * inside[part]).ne(0).sum())
    keep = [i for i in range(len(classes)) if share[i].ne(0).any()] or [0]
    return share[keep], [classes[i] for i in keep], voxels


# ----------------------------------------------------------------------------- public entry points


def predict(model: nn.Module, image, *, sliding_window: SlidingWindow | None = None, device: str = "auto",
            slice_axis: int = 0, mixed_precision: bool = False, progress: ProgressCallback | None = None,
            batch_size: int | None = None, output_key: int | str | None = None) -> np.ndarray:
    """The model's fused logits over the whole image, as its own sliding-window inference gives them.

    Args:
        model: ``torch.nn.Module`` whose output is ``(N, classes, *patch)`` for an input ``(N, C, *patch)``,
            a TorchScript module or a ``LoadedModel`` (its card gives ``output_key``); it runs in its
            owner's inference mode (a model wholly in training mode in eval mode, with a warning).
        image: ``(channels, *spatial)`` array or tensor on the model's grid.
        sliding_window: the tiling; None runs the whole image as one window (a 3D model, or a 2D
            model on a 2D image).
        device: "auto", "cpu" or "cuda".
        slice_axis: for a 2D patch over a volume, the axis of the image's spatial dims to slice along.
        mixed_precision: run the forward under bf16 autocast (fused in float32).
        progress: ``progress(fraction, message)`` after each batch of windows; raising in it stops the run.
        batch_size: windows per batch (default: sized to the free memory).
        output_key: for a model returning a tuple, list or dict, the segmentation's entry (see
            ``engine.capture.select_output``).

    Returns:
        float32 ``(classes, *spatial)``: ``sum_w g_w z_w / sum_w g_w`` with the padding removed.
    """
    held = held_model(model)
    model, output_key = held.module, held.output_key(output_key)
    for message in held.notes:
        _warnings.warn(message, SegHiResCAMWarning, stacklevel=2)
    tensor = image_tensor(image, model)
    # None: the whole image as one window (weights 1, so Z is the model's output itself)
    window = sliding_window or SlidingWindow(tuple(tensor.shape[1:]), step=1.0, gaussian=False)
    grid, _ = _arrange(tensor, None, window, slice_axis)
    resolved = resolve_device(device)
    with prepared_model(model, resolved):
        try:
            fused = _predict_on(model, grid, resolved, mixed_precision, progress, batch_size, output_key)
        except _GpuExhausted:
            fused = _predict_on(model, grid, torch.device("cpu"), mixed_precision, progress, batch_size, output_key)
    return grid.restore(fused).to(torch.float32).cpu().numpy()


def _predict_on(model, grid, device, mixed_precision, progress, batch_size, output_key) -> torch.Tensor:
    model.to(device)  # prepared_model puts it back where it was
    runner = _Runner(model, grid, device, _accumulator_device(device, int(np.prod(grid.padded)), 8), mixed_precision,
                     progress, batch_size, output_key)
    runner.total = len(grid.corners)
    return runner.fused_logits(runner.denominator())


def explain_windows(
    model: nn.Module,
    image,
    *,
    layers: Sequence[str],
    class_index: int,
    window: SlidingWindow,
    roi=None,
    methods: Sequence[str] = ("seg-hires-grad-cam",),
    target: str = "logits",
    target_threshold: float = 0.5,
    slice_axis: int = 0,
    relu: bool = True,
    normalize: bool = True,
    multilabel: bool = False,
    probabilities: bool = False,
    device: str = "auto",
    mixed_precision: bool = False,
    progress: ProgressCallback | None = None,
    batch_size: int | None = None,
    output_key: int | str | None = None,
) -> WindowedExplanation:
    """Class activation maps of the model's fused sliding-window prediction (see the module docstring).

    Args:
        model: ``torch.nn.Module`` whose output is ``(N, classes, *patch)`` for an input ``(N, C, *patch)``,
            a TorchScript module or a ``LoadedModel`` (its card gives ``output_key``); it runs in its
            owner's inference mode (a model wholly in training mode in eval mode, with a warning).
        image: ``(channels, *spatial)`` array or tensor on the model's grid.
        layers: layer names; several give the mean of the layers' maps, each divided by its maximum.
        class_index: the class c (output channel).
        window: the tiling (patch size, step, Gaussian weights, mirroring).
        roi: bool or float weights of the image's spatial shape; None = the fused prediction's region
            for c (argmax of Z; one channel or ``multilabel``: Z > 0; probability-threshold: s_c(Z) > t).
        methods: keys of ``engine.methods.METHODS`` (Kernel-Weighted Contribution runs whole-volume only).
        target: "logits" or "probability-threshold".
        target_threshold: t for the probability-threshold target.
        slice_axis: for a 2D patch over a volume, the axis of the image's spatial dims to slice along.
        relu: keep positive evidence, after stitching; False gives the signed sum of the windows' maps.
        normalize: divide by the maximum of the whole map, once, at the end.
        multilabel: independent classes (sigmoid per channel).
        probabilities: the model outputs probabilities, not logits (they are fused as they are).
        device: "auto", "cpu" or "cuda".
        mixed_precision: bf16 autocast for the forward; targets, gradients and maps in float32.
        progress: ``progress(fraction, message)`` after each batch of windows; an exception raised in it
            (``CancelledError``) stops the run between windows, the model and its hooks left as found.
        batch_size: windows per batch (default: sized to the free memory).
        output_key: for a model returning a tuple, list or dict, the segmentation's entry (see
            ``engine.capture.select_output``).

    Returns:
        a :class:`WindowedExplanation`.
    """
    held = held_model(model)
    model, output_key = held.module, held.output_key(output_key)
    layers = [layers] if isinstance(layers, str) else list(layers)
    if not layers:
        raise InputError("no layer was given; pick at least one layer to explain")
    methods = list(methods)
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise InputError(
            f"method {unknown[0] if unknown else None!r} does not run on sliding windows; choose one of "
            f"{', '.join(METHODS)} (Kernel-Weighted Contribution needs the whole volume)"
        )
    if target not in TARGETS:
        raise InputError(f"target {target!r} is unknown; choose one of {', '.join(TARGETS)}")
    check_layers(model, layers)
    tensor = image_tensor(image, model)
    grid, roi_t = _arrange(tensor, roi, window, slice_axis)
    resolved = resolve_device(device)
    notes: list[str] = list(held.notes)
    job = _ExplainJob(model, grid, roi_t, layers, int(class_index), methods, target, float(target_threshold),
                      multilabel, probabilities, mixed_precision, progress, batch_size, output_key)
    with prepared_model(model, resolved):
        try:
            stitched, voxels, explained = job.run(resolved)
        except _GpuExhausted:
            notes.append("the GPU ran out of memory even one window at a time, so the CPU computed this map instead")
            resolved = torch.device("cpu")
            model.to(resolved)
            stitched, voxels, explained = job.run(resolved)
    if voxels == 0:
        notes.append(empty_region_note(target, roi is not None, int(class_index), float(target_threshold), fused=True))
    layer_maps = {(method, name): grid.restore(stitched[(method, name)]) for method in methods for name in layers}
    if relu:
        layer_maps = {key: torch.relu(value) for key, value in layer_maps.items()}
        if voxels:
            notes.extend(no_positive_evidence_notes(layer_maps, methods, layers))
    result = {method: combine_layer_maps([layer_maps[(method, name)] for name in layers], normalize)
              .to(torch.float32).cpu().numpy() for method in methods}
    return WindowedExplanation(result, str(resolved), voxels, tuple(notes), len(grid.corners), explained)


class _ExplainJob:
    """The fused target's split over windows, then the windows' backward passes."""

    def __init__(self, model, grid, roi, layers, class_index, methods, target, threshold, multilabel, probabilities,
                 mixed_precision, progress, batch_size, output_key) -> None:
        self.model, self.grid, self.roi, self.layers = model, grid, roi, layers
        self.class_index, self.methods, self.target, self.threshold = class_index, methods, target, threshold
        self.multilabel, self.probabilities = multilabel, probabilities
        self.mixed_precision, self.progress, self.batch_size = mixed_precision, progress, batch_size
        self.output_key = output_key

    def run(self, device: torch.device):
        needs_prediction = self.roi is None or self.target != "logits"
        planes = 2 + len(self.methods) * len(self.layers) + (4 if needs_prediction else 1)
        accumulate_on = _accumulator_device(device, int(np.prod(self.grid.padded)), planes)
        runner = _Runner(self.model, self.grid, device, accumulate_on, self.mixed_precision, self.progress,
                         self.batch_size, self.output_key)
        denominator = runner.denominator()
        # until the region is known, assume every window will be explained after the prediction
        runner.total = len(self.grid.corners) * (2 if needs_prediction else 1)
        fused = runner.fused_logits(denominator) if needs_prediction else None
        roi = None if self.roi is None else self.roi.to(accumulate_on)
        share, classes, voxels = _target_gradient(fused, roi, self.grid, accumulate_on, self.class_index, self.target,
                                                  self.threshold, self.multilabel, self.probabilities)
        del fused
        todo = [corner for corner in self.grid.corners
                if share[(slice(None), *self.grid.place(corner))].ne(0).any()]
        runner.total = int(runner.done) + len(todo)
        if runner.progress is not None and len(todo) < len(self.grid.corners):
            runner.progress(runner.done / max(runner.total, 1),
                            f"{len(self.grid.corners) - len(todo)} of {len(self.grid.corners)} windows have no share "
                            "of the region and are skipped")
        maps = runner.explain(share, classes, denominator, todo, self.layers, self.methods)
        return maps, voxels, len(todo)
