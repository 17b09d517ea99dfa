"""MONAI networks: a bundle folder, or a network given as a JSON spec beside a state dict.

A bundle's ``configs/inference.json`` (or ``.yaml``, read by ``models.monai_config``) describes the
network in ``network_def``; its values may be plain literals, ``@name`` references to other entries,
or ``$expression`` strings, which are Python code. Plain definitions are built here without running any code;
a definition with expressions needs ``trust_code=True`` and is then built by MONAI's own
config parser. Weights come from ``models/model.pt`` (tensors only) or, failing that, the
TorchScript ``models/model.ts``.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import ModelError, UnsafeModelError
from .card import ModelCard
from .monai_config import config_path, is_bundle, is_monai_target, read_config, resolve_references  # noqa: F401
from .optional import require

def network_class(name: str) -> type[nn.Module]:
    """The class ``monai.networks.nets.<name>`` (``name`` may carry a ``monai.`` path or ``monai:`` prefix)."""
    short = name.split(":")[-1].rsplit(".", 1)[-1]
    nets = require("monai.networks.nets", "monai")
    cls = getattr(nets, short, None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ModelError(f"{name!r} is not a network in monai.networks.nets; check the spelling (e.g. 'UNet', 'SegResNet')")
    return cls


def build_network(name: str, args: dict[str, Any]) -> nn.Module:
    """Build ``monai.networks.nets.<name>(**args)``."""
    cls = network_class(name)
    try:
        return cls(**args)
    except TypeError as error:
        raise ModelError(f"cannot build MONAI {cls.__name__} with arguments {args}: {error}") from error


def _parse_with_monai(config: dict[str, Any], bundle: Path) -> nn.Module:
    """Build ``network_def`` with MONAI's own parser, which runs the bundle's code (trusted only)."""
    import sys

    parser = require("monai.bundle", "monai").ConfigParser(config)
    sys.path.insert(0, str(bundle))  # bundles import their own scripts/ package
    try:
        return parser.get_parsed_content("network_def")
    finally:
        sys.path.remove(str(bundle))


def build_bundle_network(config: dict[str, Any], *, trust_code: bool, bundle: Path) -> nn.Module:
    """The bundle's ``network_def``, built without running code unless ``trust_code``.

    Raises:
        UnsafeModelError: the definition holds ``$`` expressions or names a class outside
            ``monai.networks.nets`` (the bundle's own code) and ``trust_code`` is False.
    """
    if "network_def" not in config:
        raise ModelError(f"{bundle.name}: configs/inference has no 'network_def' entry describing the network")
    try:
        definition = resolve_references(config["network_def"], config)
    except UnsafeModelError:
        if not trust_code:
            raise
        return _parse_with_monai(config, bundle)
    if not isinstance(definition, dict) or "_target_" not in definition:
        raise ModelError(f"{bundle.name}: 'network_def' must be a mapping with a '_target_' class name")
    if not is_monai_target(definition["_target_"]):
        if not trust_code:
            raise UnsafeModelError(
                f"the bundle's network is {definition['_target_']!r}, code that comes with the bundle rather than a "
                "MONAI network; running it means trusting the bundle. If you do, allow code (command line: "
                "--trust-code; the panel asks)."
            )
        return _parse_with_monai(config, bundle)
    args = {k: v for k, v in definition.items() if not k.startswith("_")}
    return build_network(str(definition["_target_"]), args)


def _find_transform(transforms: Any, *names: str) -> dict[str, Any] | None:
    if isinstance(transforms, dict):
        transforms = transforms.get("transforms", [])
    for transform in transforms if isinstance(transforms, list) else []:
        if isinstance(transform, dict) and str(transform.get("_target_", "")).rsplit(".", 1)[-1] in names:
            return transform
    return None


def bundle_card(bundle: Path, config: dict[str, Any]) -> ModelCard:
    """A model card from the bundle's metadata and preprocessing (what can be read without running code)."""
    metadata_path = bundle / "configs" / "metadata.json"
    metadata = json.loads(metadata_path.read_text(encoding="utf-8")) if metadata_path.is_file() else {}
    data_format = metadata.get("network_data_format", {})
    inputs = next(iter(data_format.get("inputs", {}).values()), {})
    outputs = next(iter(data_format.get("outputs", {}).values()), {})
    definition = config.get("network_def", {})
    spatial_dims = definition.get("spatial_dims", len(inputs.get("spatial_shape", [0, 0, 0])))
    spatial_dims = spatial_dims if spatial_dims in (2, 3) else 3  # "@references" or odd shapes: assume 3D
    in_channels = inputs.get("num_channels", definition.get("in_channels", 1))
    in_channels = in_channels if isinstance(in_channels, int) else 1
    divisible_by = 1
    for size in inputs.get("spatial_shape", []):  # MONAI writes e.g. "16*n" for multiples of 16
        match = re.fullmatch(r"\s*(\d+)\s*\*\s*n\s*", str(size))
        if match:
            divisible_by = max(divisible_by, int(match.group(1)))
    strides = definition.get("strides")
    if divisible_by == 1 and isinstance(strides, list) and all(isinstance(v, int) for v in strides):
        divisible_by = int(math.prod(strides))  # UNet-like networks: each stride divides the size
    channel_def = outputs.get("channel_def", {})
    class_names = tuple(str(channel_def[key]) for key in sorted(channel_def, key=lambda k: int(k))) if channel_def else ()
    preprocessing = config.get("preprocessing", {})
    spacing = orientation = None
    intensity: dict[str, Any] = {"scheme": "none"}
    found = _find_transform(preprocessing, "Spacingd", "Spacing")
    if found and isinstance(found.get("pixdim"), list) and all(isinstance(v, (int, float)) for v in found["pixdim"]):
        spacing = tuple(float(v) for v in found["pixdim"])
        spacing = spacing + (None,) * (3 - len(spacing))
    found = _find_transform(preprocessing, "Orientationd", "Orientation")
    if found and isinstance(found.get("axcodes"), str):
        orientation = found["axcodes"]
    found = _find_transform(preprocessing, "ScaleIntensityRanged", "ScaleIntensityRange")
    if found and all(isinstance(found.get(k), (int, float)) for k in ("a_min", "a_max")):
        intensity = {"scheme": "ct-window", "window": [found["a_min"], found["a_max"]],
                     "range": [found.get("b_min", 0.0), found.get("b_max", 1.0)]}
    elif _find_transform(preprocessing, "NormalizeIntensityd", "NormalizeIntensity"):
        intensity = {"scheme": "zscore", "nonzero_only": bool(_find_transform(preprocessing, "NormalizeIntensityd",
                                                                               "NormalizeIntensity").get("nonzero"))}
    patch_size, extra = _inferer_window(config, spatial_dims)
    return ModelCard(
        name=str(metadata.get("name", bundle.name)),
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        class_names=class_names,
        spacing=spacing,
        orientation=orientation,
        intensity=intensity,
        divisible_by=divisible_by,
        transpose=(2, 1, 0),  # MONAI arrays are (I, J, K)
        patch_size=patch_size,
        extra={"bundle": str(bundle), **extra},
    )


def _inferer_window(config: dict[str, Any], spatial_dims: int) -> tuple[tuple[int, ...] | None, dict[str, Any]]:
    """The patch size, step and weighting of the bundle's SlidingWindowInferer (literal values only)."""
    inferer = config.get("inferer")
    if not (isinstance(inferer, dict) and str(inferer.get("_target_", "")).endswith("SlidingWindowInferer")):
        return None, {}
    roi = inferer.get("roi_size")
    if not (isinstance(roi, list) and len(roi) == spatial_dims and all(isinstance(v, int) and v > 0 for v in roi)):
        return None, {}
    overlap = inferer.get("overlap", 0.25)  # MONAI's defaults
    mode = inferer.get("mode", "constant")
    options: dict[str, Any] = {"gaussian": mode == "gaussian"}
    if isinstance(overlap, (int, float)) and 0 <= overlap < 1:
        options["step"] = 1.0 - float(overlap)
    return tuple(roi), {"sliding_window": options}
