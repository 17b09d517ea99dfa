"""The trust question, without torch: would loading this model run code that comes with it?

The panel asks it before anything is installed or loaded, and the command line refuses such
models without ``--trust-code``. Reading file names and JSON/YAML configs is enough.
"""

from __future__ import annotations

from pathlib import Path

from .monai_config import code_in_network_def, config_path, is_bundle, read_config


def untrusted_message(path: Path) -> str:
    """Why a Python model file needs trust, and how to give it at each door."""
    return (
        f"{path.name} is Python code: loading it runs that code with your permissions. Only continue if you "
        "trust where it came from. Command line: add --trust-code; Python: load_model(path, trust_code=True); "
        "the Slicer panel asks before running it."
    )


def code_to_trust(path: str | Path) -> str | None:
    """Why loading ``path`` would run code that comes with the model, or None if it would not.

    For the panel and the command line, to ask before ``load_model(path, trust_code=True)``.
    """
    source = Path(path)
    if source.suffix == ".py" and source.is_file():
        return untrusted_message(source)
    if source.is_dir() and is_bundle(source):
        return code_in_network_def(read_config(config_path(source)))
    return None
