"""Import optional packages lazily, with a message that names the extra to install."""

from __future__ import annotations

import importlib
from types import ModuleType

from ..errors import MissingDependencyError

# extra name -> what it adds; the message shows the pip command
EXTRAS = {"monai": "MONAI networks and bundles", "nnunet": "nnU-Net v2 networks and resampling (dynamic_network_architectures, scipy)"}


def require(module: str, extra: str) -> ModuleType:
    """Import ``module`` or raise MissingDependencyError naming ``seghirescam[extra]``."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise MissingDependencyError(
            f"loading this model needs the optional package '{module.split('.')[0]}' ({EXTRAS[extra]}), which is "
            f"not installed. Install it with: pip install \"seghirescam[{extra}]\" (in Slicer: "
            f"slicer.util.pip_install('{_pip_name(module)}')), then try again."
        ) from error


def _pip_name(module: str) -> str:
    return {"dynamic_network_architectures": "dynamic_network_architectures"}.get(module.split(".")[0],
                                                                                 module.split(".")[0])
