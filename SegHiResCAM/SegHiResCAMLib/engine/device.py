"""Device choice, model preparation (the owner's inference mode, device) with everything restored afterwards."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ..errors import InputError
from .torch_errors import is_out_of_memory


def resolve_device(device: str | torch.device) -> torch.device:
    """"auto" -> CUDA when torch can use it, else CPU; "cuda" without a GPU is an error."""
    name = str(device)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(name)
    except RuntimeError as error:
        raise InputError(f"device '{name}' is not understood; use 'auto', 'cpu' or 'cuda'") from error
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise InputError(
            "the GPU (cuda) was requested but torch cannot use one here (no NVIDIA driver, or a CPU-only torch); "
            "choose device 'auto' or 'cpu'"
        )
    return resolved


def model_device(model: nn.Module) -> torch.device:
    for tensor in list(model.parameters()) + list(model.buffers()):
        return tensor.device
    return torch.device("cpu")


def training_mode_warning(model: nn.Module) -> str | None:
    """The user's warning when :func:`prepared_model` will switch ``model`` to eval mode, else None."""
    if not model.training:
        return None
    return ("the model was in training mode, so it ran in evaluation mode (model.eval()) for this explanation and "
            "was put back afterwards; call model.eval() before explaining to run it exactly as it is (modules that "
            "must run in training mode, such as HD-BET's instance norms, may stay so)")


@contextmanager
def prepared_model(model: nn.Module, device: torch.device) -> Iterator[nn.Module]:
    """The model in its owner's inference mode on ``device``; modes, buffers and device restored on exit.

    A model whose top module is in eval mode runs exactly as it is: submodules left in training
    mode stay so (HD-BET keeps its instance norms in training mode to use each image's own
    statistics). Only a model wholly in training mode (its top module training) is switched to
    eval; the entry points tell the user (:func:`training_mode_warning`). A norm layer in training
    mode updates its running statistics in every forward pass, so every buffer is saved here and
    written back on exit (the original tensors, also after a move to another device).
    """
    training = {name: module.training for name, module in model.named_modules()}
    buffers = [(module, name, tensor, tensor.detach().clone())
               for module in model.modules() for name, tensor in module._buffers.items() if tensor is not None]
    original_device = model_device(model)
    try:
        if model.training:
            model.eval()
        if original_device != device:
            model.to(device)
        yield model
    finally:
        if model_device(model) != original_device:
            model.to(original_device)
        for name, module in model.named_modules():
            module.training = training.get(name, module.training)
        with torch.no_grad():
            for module, name, tensor, saved in buffers:
                if module._buffers[name] is not tensor:  # moved away and back: put the user's own tensor back
                    module._buffers[name] = tensor
                tensor.copy_(saved)


def memory_budget(device: torch.device) -> int:
    """Bytes one batch may use: half the free GPU memory, or a quarter of available RAM up to
    1 GiB on the CPU, where larger batches are no faster (a 64-slice 256^2 volume took the same
    time in batches of 4 or 64 slices) and only raise the peak."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.5)
    available = _available_ram()
    return int(min(available * 0.25, 2**30))


def _available_ram() -> int:
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 * 2**30


def forward_bytes(model: nn.Module, probe: torch.Tensor) -> int:
    """Bytes of every leaf module's output in one no-grad forward pass of ``probe``."""
    if any(isinstance(module, torch.jit.ScriptModule) for module in model.modules()):
        # Hooks do not fire inside TorchScript: its adapter captures every leaf's output instead.
        problems = model.layer_problems() if hasattr(model, "layer_problems") else {}
        names = [name for name, _ in model.layer_names()]
        leaves = [name for name in names if name not in problems and not any(n.startswith(name + ".") for n in names)]
        with torch.no_grad():
            _, outputs = model.forward_capturing(probe, leaves)
        return sum(out.numel() * out.element_size() for out in outputs if isinstance(out, torch.Tensor))
    total = 0

    def count(module, inputs, output) -> None:
        nonlocal total
        if isinstance(output, torch.Tensor):
            total += output.numel() * output.element_size()

    handles = [m.register_forward_hook(count) for m in model.modules() if not list(m.children())]
    try:
        with torch.no_grad():
            model(probe)
    finally:
        for handle in handles:
            handle.remove()
    return total


def fitting_count(model: nn.Module, probe: torch.Tensor, limit: int, factor: float = 1.0) -> int:
    """How many samples like ``probe`` (at most ``limit``, and at most the model's ``batch_limit``
    if it has one, as exported programs with a fixed batch size do) fit the memory budget at once,
    when each needs ``factor`` times its forward pass's outputs."""
    limit = min(limit, getattr(model, "batch_limit", None) or limit)
    if limit <= 1:
        return 1
    per_sample = max(1, int(factor * forward_bytes(model, probe)))
    return int(max(1, min(limit, memory_budget(probe.device) // per_sample)))


def in_chunks(count: int, size: int, device: torch.device, step: Callable[[torch.Tensor], None]) -> None:
    """Call ``step`` on consecutive index chunks of ``range(count)``; after a CUDA out-of-memory
    error, retry with half the chunk (a chunk of one re-raises)."""
    done = 0
    while done < count:
        index = torch.arange(done, min(count, done + size))
        try:
            step(index)
        except RuntimeError as error:
            if device.type != "cuda" or not is_out_of_memory(error) or size == 1:
                raise
            torch.cuda.empty_cache()
            size = max(1, size // 2)
            continue
        done += len(index)
