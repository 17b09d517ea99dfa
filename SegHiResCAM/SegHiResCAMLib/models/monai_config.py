"""A MONAI bundle's configuration read as plain data, without torch and without running its code.

Enough to find a bundle, read ``configs/inference.json`` (or ``.yaml``), resolve ``@name``
references, and say whether building its network would run code that comes with the bundle
(``$`` expressions, or a class outside ``monai.networks.nets``): the trust question
(``models.trust``) needs nothing more, so the panel can ask it before torch is installed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import ModelError, UnsafeModelError
from .optional import require

_CONFIG_NAMES = ("inference.json", "inference.yaml", "inference.yml")


def config_path(folder: Path) -> Path | None:
    """The bundle's ``configs/inference.json`` (or ``.yaml``), None if absent."""
    return next((folder / "configs" / name for name in _CONFIG_NAMES if (folder / "configs" / name).is_file()), None)


def is_bundle(folder: Path) -> bool:
    return folder.is_dir() and config_path(folder) is not None


def read_config(path: Path) -> dict[str, Any]:
    """The bundle config as plain data (JSON, or YAML with safe loading)."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as error:
            raise ModelError(f"cannot read {path}: {error}") from error
    yaml = require("yaml", "monai")
    data = yaml.safe_load(text)
    if not isinstance(data, dict):
        raise ModelError(f"{path} must hold a mapping of config entries")
    return data


def resolve_references(value: Any, config: dict[str, Any], seen: tuple[str, ...] = ()) -> Any:
    """Replace ``@name`` references by their (plain) values; refuse ``$`` expressions."""
    if isinstance(value, str) and value.startswith("$"):
        raise UnsafeModelError(
            f"the bundle's network definition contains the Python expression {value!r}; running it means "
            "trusting the bundle's code. If you trust it, allow code (command line: --trust-code; the panel "
            "asks), or replace the expression by its value in configs/inference.json."
        )
    if isinstance(value, str) and value.startswith("@"):
        key = value[1:]
        if key in seen or key not in config:
            raise ModelError(f"the bundle's network definition refers to {value!r}, which is {'circular' if key in seen else 'not defined'}")
        return resolve_references(config[key], config, seen + (key,))
    if isinstance(value, dict):
        return {k: resolve_references(v, config, seen) for k, v in value.items()}
    if isinstance(value, list):
        return [resolve_references(v, config, seen) for v in value]
    return value


def is_monai_target(target: Any) -> bool:
    return isinstance(target, str) and ("." not in target or target.startswith("monai.networks.nets."))


def code_in_network_def(config: dict[str, Any]) -> str | None:
    """Why building the bundle's network would run the bundle's code, or None."""
    try:
        definition = resolve_references(config.get("network_def", {}), config)
    except UnsafeModelError as error:
        return str(error)
    except ModelError:
        return None  # not code; loading reports the broken reference
    target = definition.get("_target_") if isinstance(definition, dict) else None
    if target is not None and not is_monai_target(target):
        return (f"the bundle's network is {target!r}, code that comes with the bundle rather than a MONAI network; "
                "running it means trusting the bundle.")
    return None
