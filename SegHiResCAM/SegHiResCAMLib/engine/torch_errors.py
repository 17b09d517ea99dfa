"""The few failures that torch reports only through its message text, recognised in one place.

Where torch raises a type of its own (``torch.cuda.OutOfMemoryError``, ``pickle.UnpicklingError``
from ``torch.load``), code checks the type. The text checks below exist because the same failures
also arrive as a plain ``RuntimeError``: out-of-memory raised by CUDA kernels, cuDNN or cuBLAS
rather than by torch's caching allocator, and autograd's complaint about a tensor changed in place.
"""

from __future__ import annotations

import torch


def is_out_of_memory(error: BaseException) -> bool:
    """CUDA out-of-memory: torch's own type, or the RuntimeError text of kernels and libraries."""
    return isinstance(error, torch.cuda.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and "out of memory" in str(error).lower()
    )


def is_inplace_modification(error: BaseException) -> bool:
    """Autograd's RuntimeError for a captured output that a later operation changed in place."""
    return isinstance(error, RuntimeError) and ("leaf Variable" in str(error) or "in-place" in str(error))
