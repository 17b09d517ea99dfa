"""Device choice, model preparation (eval mode, device) with everything restored afterwards."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ..errors import InputError


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


@contextmanager
def prepared_model(model: nn.Module, device: torch.device) -> Iterator[nn.Module]:
    """The model in eval mode on ``device``; training flags and device restored on exit."""
    training = {name: module.training for name, module in model.named_modules()}
    original_device = model_device(model)
    try:
        model.eval()
        if original_device != device:
            model.to(device)
        yield model
    finally:
        if model_device(model) != original_device:
            model.to(original_device)
        for name, module in model.named_modules():
            module.training = training.get(name, module.training)


def is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error).lower()


def memory_budget(device: torch.device) -> int:
    """Bytes one batch may use: half the free GPU memory, or a quarter of available RAM (<= 4 GiB)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.5)
    available = _available_ram()
    return int(min(available * 0.25, 4 * 2**30))


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
