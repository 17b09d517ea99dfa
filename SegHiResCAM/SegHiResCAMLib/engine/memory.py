"""How much memory an explanation will need, known before the work, and whether the device has it.

A probe runs the engine's own step (forward with the graph cut at the layer, the target, the
gradient, the methods, the upsampling) once on a small input while a dispatch mode counts
every tensor storage that is alive at each moment; the peak of that count, per voxel, scales
to the real input (convolutional networks' activations grow with the voxels). Volume-sized
buffers (the input, the fused logits, the accumulators, the maps handed back) are added from
their shapes. For sliding windows the per-window part is one batch of windows: it does not
grow with the volume, only the accumulators do.
"""

from __future__ import annotations

import math
import os
import re
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from ..errors import InputError
from ..windows import SlidingWindow
from .capture import forward_with_activations, segmentation_output
from .device import _available_ram, prepared_model, resolve_device
from .methods import METHODS
from .resize import upsample_to

#: Environment variable that sets the memory an explanation may plan with (see ``available_bytes``).
AVAILABLE_MEMORY_VARIABLE = "SEGHIRESCAM_AVAILABLE_MEMORY"
# Share of the available memory an explanation may plan to use (the rest: the caller, the OS).
USABLE_SHARE = 0.8
# Memory the CPU runtime takes on its first explanation in a process beyond the tensors (oneDNN's
# kernels and scratch, thread-local buffers): 60-90 MB measured here with torch 2.13 on x86.
RUNTIME_BYTES = 64 * 2**20
# Probe edge for 3D models (rounded up to the network's divisibility): small enough to be cheap.
PROBE_EDGE = 32


@dataclass(frozen=True)
class MemoryEstimate:
    """The planned peak of an explanation against what the device offers.

    Attributes:
        peak_bytes: estimated peak of the memory the explanation adds (beyond the model's weights).
        available_bytes: free memory of the device now (RAM available, or free GPU memory).
        device: the device the estimate is for.
        per_sample_bytes: the probe's share: one forward/backward of one sample (a window, a slice
            or the whole volume) at the real size.
        volume_bytes: buffers that grow with the volume (input, fused logits, accumulators, maps).
    """

    peak_bytes: int
    available_bytes: int
    device: str
    per_sample_bytes: int
    volume_bytes: int

    @property
    def fits(self) -> bool:
        """The peak lies within the usable share of the available memory."""
        return self.peak_bytes <= USABLE_SHARE * self.available_bytes

    def describe(self) -> str:
        """E.g. "about 6.3 GB of 11.8 GB available on the CPU"."""
        where = "the CPU" if self.device == "cpu" else f"the GPU ({self.device})"
        return f"about {_gigabytes(self.peak_bytes)} of {_gigabytes(self.available_bytes)} available on {where}"


def _gigabytes(count: int) -> str:
    return f"{count / 1e9:.1f} GB" if count >= 1e8 else f"{count / 1e6:.0f} MB"


def available_bytes(device: str | torch.device) -> int:
    """Free memory of ``device`` now: RAM available to new allocations, or free GPU memory; or the
    amount the environment variable ``SEGHIRESCAM_AVAILABLE_MEMORY`` names (bytes, or with a unit:
    ``6GB``, ``512MB``), for a machine shared with other work, and for tests.

    Raises:
        InputError: the environment variable is not an amount of memory.
    """
    told = os.environ.get(AVAILABLE_MEMORY_VARIABLE, "").strip()
    if told:
        return _amount(told)
    resolved = resolve_device(device)
    if resolved.type == "cuda":
        free, _ = torch.cuda.mem_get_info(resolved)
        return int(free)
    return int(_available_ram())


def _amount(text: str) -> int:
    match = re.fullmatch(r"(\d+(?:\.\d*)?)\s*([KMGT]?)B?", text.upper())
    if not match or float(match.group(1)) <= 0:
        raise InputError(f"{AVAILABLE_MEMORY_VARIABLE}={text!r} is not an amount of memory; give bytes or e.g. 6GB, "
                         "512MB, or unset it to use what the device has free")
    return int(float(match.group(1)) * 1000 ** " KMGT".index(match.group(2) or " "))


class _LiveTensorBytes(TorchDispatchMode):
    """Counts the bytes of every tensor storage created under it while it is alive; keeps the peak.

    Storages that existed before (the input, the weights) are not counted. Temporary buffers
    inside one operation are not seen; a CPU convolution's are small next to its output.
    """

    def __init__(self, existing: Sequence[torch.Tensor]) -> None:
        super().__init__()
        self.live = self.peak = 0
        self.known: set[int] = {t.untyped_storage().data_ptr() for t in existing}

    def _count(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key, size = storage.data_ptr(), storage.nbytes()
        if size == 0 or key in self.known:
            return
        self.known.add(key)
        self.live += size
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._release, key, size)

    def _release(self, key: int, size: int) -> None:
        self.live -= size
        self.known.discard(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor) and leaf.device.type != "meta":
                self._count(leaf)
        return out


def step_peak_bytes(model: nn.Module, probe: torch.Tensor, layers: Sequence[str], methods: int = 1,
                    output_key: int | str | None = None) -> int:
    """Peak bytes of tensors alive during one explanation step of the engine on ``probe`` ``(B, C, *spatial)``.

    The step is the engine's: forward with activations (graph from the layer on), a region
    target on every class-0 voxel, ``autograd.grad`` to the layers, ``methods`` maps per layer
    upsampled to the input. ``output_key`` picks the segmentation among several outputs
    (``engine.capture.select_output``).
    """
    existing = [probe, *model.parameters(), *model.buffers()]
    with prepared_model(model, probe.device), _LiveTensorBytes(existing) as counter:
        output, activations = forward_with_activations(model, probe, list(layers), output_key)
        output = segmentation_output(output, probe, 0)
        score = output[:, 0].sum()
        gradients = torch.autograd.grad(score, activations, allow_unused=True)
        del output, score
        method = next(iter(METHODS.values()))
        with torch.no_grad():
            maps = [upsample_to(method(a.detach(), g), tuple(probe.shape[2:]))
                    for a, g in zip(activations, gradients) if g is not None for _ in range(methods)]
        del activations, gradients, maps
    return counter.peak


def _probe_shape(spatial: Sequence[int], divisible_by: int) -> tuple[int, ...]:
    step = max(int(divisible_by), 1)
    edge = -(-max(PROBE_EDGE, 2 * step) // step) * step
    return tuple(min(edge, -(-int(s) // step) * step) for s in spatial)


def _scaled_sample_bytes(model: nn.Module, channels: int, spatial: Sequence[int], layers: Sequence[str],
                         methods: int, divisible_by: int, device: torch.device, output_key: int | str | None) -> int:
    """One sample's step at ``spatial``, from a probe at a small size scaled by the voxel ratio."""
    probe_spatial = _probe_shape(spatial, divisible_by)
    accepted = getattr(model, "accepted_shape", None)  # a static-shape program runs at its own size only
    if accepted is not None:
        probe_spatial = tuple(accepted((1, channels, *probe_spatial))[2:])
    probe = torch.zeros((1, channels, *probe_spatial), device=device, dtype=_model_dtype(model))
    peak = step_peak_bytes(model, probe, layers, methods, output_key)
    return int(peak * math.prod(spatial) / math.prod(probe_spatial))


def _model_dtype(model: nn.Module) -> torch.dtype:
    for tensor in list(model.parameters()) + list(model.buffers()):
        if tensor.dtype.is_floating_point:
            return tensor.dtype
    return torch.float32


def estimate_whole_volume(model: nn.Module, image_shape: Sequence[int], *, layers: Sequence[str], classes: int,
                          methods: int = 1, divisible_by: int = 1, device: str = "auto",
                          output_key: int | str | None = None) -> MemoryEstimate:
    """Peak memory of today's one-pass explanation of a 3D model on ``image_shape`` ``(C, *spatial)``.

    (A 2D model on a volume runs slices in memory-sized batches; estimate one slice as a window.)
    """
    resolved = resolve_device(device)
    channels, spatial = int(image_shape[0]), tuple(int(s) for s in image_shape[1:])
    voxels = math.prod(spatial)
    sample = _scaled_sample_bytes(model, channels, spatial, layers, methods, divisible_by, resolved, output_key)
    # input copy; the region; per method and layer the map and its float32 copy handed back
    volume = 4 * voxels * (channels + 1 + 2 * methods * len(layers))
    del classes  # the output is part of the probe's count
    return MemoryEstimate(sample + volume + RUNTIME_BYTES, available_bytes(resolved), str(resolved), sample, volume)


def estimate_windows(model: nn.Module, image_shape: Sequence[int], *, layers: Sequence[str], classes: int,
                     window: SlidingWindow, methods: int = 1, batch_size: int = 1, default_region: bool = True,
                     target: str = "logits", divisible_by: int = 1, device: str = "auto",
                     output_key: int | str | None = None) -> MemoryEstimate:
    """Peak memory of a sliding-window explanation of ``image_shape`` ``(C, *spatial)``.

    ``batch_size`` windows run at once. The volume-sized planes follow the run's phases: the
    prediction (the weights' sum D and the fused logits, with the default region or the threshold
    target), the target's share (one class for logits, every class for the threshold target),
    the explanation (D, the share, the stitched maps), the end (the maps, their ReLU'd and
    normalised copies); the largest phase counts.
    """
    resolved = resolve_device(device)
    channels, spatial = int(image_shape[0]), tuple(int(s) for s in image_shape[1:])
    dims = len(window.patch_size)
    padded = [max(s, p) for s, p in zip(spatial[len(spatial) - dims:], window.patch_size)]
    voxels = math.prod(spatial[: len(spatial) - dims]) * math.prod(padded)
    sample = _scaled_sample_bytes(model, channels, window.patch_size, layers, methods, divisible_by, resolved,
                                  output_key)
    per_batch = sample * max(1, int(batch_size))  # a batch holds windows, or flips of windows
    padded_copy = channels if tuple(padded) != spatial[len(spatial) - dims:] else 0
    predicted = classes if (default_region or target != "logits") else 0
    share = 1 if target == "logits" else classes
    maps = methods * len(layers)
    phases = (
        padded_copy + 1 + predicted + share + 0.25,  # prediction done, share computed (0.25: a bool mask)
        padded_copy + 1 + share + maps,  # explanation pass
        maps + 2,  # the end: ReLU'd and normalised copies of one method's map
    )
    volume = int(4 * voxels * max(phases))
    return MemoryEstimate(per_batch + volume + RUNTIME_BYTES, available_bytes(resolved), str(resolved), sample,
                          volume)


def auto_window(model: nn.Module, image_shape: Sequence[int], *, layers: Sequence[str], classes: int,
                card_window: SlidingWindow | None = None, methods: int = 1, divisible_by: int = 1,
                device: str = "auto", budget_bytes: int | None = None,
                output_key: int | str | None = None) -> tuple[SlidingWindow | None, MemoryEstimate]:
    """What "auto" runs: the card's own tiling if it has one; else the whole volume when its estimate
    fits; else the largest cubic window (a multiple of ``divisible_by``, halving from the image's size)
    whose estimate fits. The estimate comes back too, so a caller can show it, or refuse with it when
    even the smallest window does not fit (``fits`` is then False).

    ``budget_bytes`` replaces the usable share of the device's free memory (for tests and callers
    that reserve memory of their own).
    """
    kwargs = dict(layers=layers, classes=classes, methods=methods, divisible_by=divisible_by, device=device,
                  output_key=output_key)

    def fits(estimate: MemoryEstimate) -> bool:
        return estimate.fits if budget_bytes is None else estimate.peak_bytes <= budget_bytes

    if card_window is not None:
        return card_window, estimate_windows(model, image_shape, window=card_window, **kwargs)
    whole = estimate_whole_volume(model, image_shape, **kwargs)
    if fits(whole):
        return None, whole
    spatial = [int(s) for s in image_shape[1:]]
    step = max(int(divisible_by), 1)
    edge = max(step, min(spatial) // step * step)
    smallest = max(step, -(-16 // step) * step)
    chosen = None
    while True:
        window = SlidingWindow((edge,) * len(spatial))
        estimate = estimate_windows(model, image_shape, window=window, **kwargs)
        chosen = (window, estimate)
        if fits(estimate) or edge <= smallest:
            return chosen
        edge = max(smallest, (edge // 2) // step * step)
