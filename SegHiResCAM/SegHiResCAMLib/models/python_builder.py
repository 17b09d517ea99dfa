"""A Python file that defines ``build_model()``, plus a state dict beside it.

Running the file runs its code, so it is refused unless the caller says the code is trusted
(``load_model(path, trust_code=True)``; command line ``--trust-code``; the panel asks first).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from torch import nn

from ..errors import ModelError, UnsafeModelError
from .trust import untrusted_message

WEIGHT_SUFFIXES = (".pth", ".pt")


def weights_beside(path: Path) -> Path:
    for suffix in WEIGHT_SUFFIXES:
        candidate = path.with_suffix(suffix)
        if candidate.is_file():
            return candidate
    raise ModelError(
        f"no weights found beside {path.name}: save them as {path.with_suffix('.pth').name} with "
        "torch.save(model.state_dict(), path)"
    )


def build_from_file(path: Path, *, trust_code: bool) -> nn.Module:
    """Import ``path`` as a fresh module and call its ``build_model()``."""
    if not trust_code:
        raise UnsafeModelError(untrusted_message(path))
    name = f"seghirescam_user_model_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ModelError(f"cannot import {path} as Python code")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look classes up here
    try:
        spec.loader.exec_module(module)
    except Exception as error:
        del sys.modules[name]
        raise ModelError(f"running {path.name} failed: {type(error).__name__}: {error}") from error
    build = getattr(module, "build_model", None)
    if not callable(build):
        raise ModelError(f"{path.name} defines no build_model() function returning the network")
    network = build()
    if not isinstance(network, nn.Module):
        raise ModelError(f"build_model() in {path.name} returned {type(network).__name__}, not a torch.nn.Module")
    return network
