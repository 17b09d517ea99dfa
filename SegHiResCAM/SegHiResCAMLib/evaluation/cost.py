"""What a method costs: wall-clock seconds and the peak memory its computation adds.

Peak memory on the CPU is the process's resident-set high-water mark (``VmHWM``), reset before
the call by writing 5 to ``/proc/self/clear_refs`` (Linux); the cost is ``VmHWM after - VmRSS
before``. On CUDA it is ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``.
Where neither is available the memory is NaN (never a guess).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


@dataclass(frozen=True)
class Cost:
    """Seconds of wall-clock time and peak memory added (MiB; NaN when it cannot be measured)."""

    seconds: float
    peak_mib: float


def _status_kib(field: str) -> float:
    for line in _STATUS.read_text().splitlines():
        if line.startswith(field + ":"):
            return float(line.split()[1])
    raise OSError(f"{field} is not in {_STATUS}")


def _reset_cpu_peak() -> float | None:
    """Reset the resident high-water mark; the resident size now (KiB), or None where impossible."""
    try:
        _CLEAR_REFS.write_text("5")
        return _status_kib("VmRSS")
    except OSError:
        return None


def measure(call: Callable[[], Any], device: str = "cpu") -> tuple[Any, Cost]:
    """Run ``call()`` and return its result with its :class:`Cost`."""
    cuda = str(device).startswith("cuda")
    if cuda:
        import torch

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = float(torch.cuda.memory_allocated())
    else:
        before_kib = _reset_cpu_peak()
    started = time.perf_counter()
    result = call()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    if cuda:
        peak = (float(torch.cuda.max_memory_allocated()) - before) / 2 ** 20
    elif before_kib is None:
        peak = float("nan")
    else:
        try:
            peak = max(_status_kib("VmHWM") - before_kib, 0.0) / 1024.0
        except OSError:
            peak = float("nan")
    return result, Cost(seconds, peak)
