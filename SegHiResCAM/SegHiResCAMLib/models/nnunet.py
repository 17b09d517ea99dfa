"""nnU-Net v2 results folders (``plans.json``, ``dataset.json``, ``fold_N/checkpoint_final.pth``).

The network is built from the plans with the class they name (from the package
``dynamic_network_architectures``, the nnU-Net extra), the weights are read as tensors only,
and nnU-Net's preprocessing is written into the model card: axis order (``transpose_forward``),
crop to the non-zero region, per-channel normalisation, spacing; ``prepare_input`` applies
it and maps the heatmap back onto the original grid. TotalSegmentator's models are of this kind.

As nnU-Net's predictor: every trained fold (their mean, ``fold_ensemble.FoldEnsemble``), the
plans' resampling (``nnunet_resampling``: spline orders, the thick axis on its own), the
normalisation mask (hole-filled non-zero voxels of all channels) and the patch size for sliding
windows (``card.patch_size``; the engine's ``sliding_window`` runs nnU-Net's tiling). Test-time
mirroring is a choice of the sliding window, off unless asked.
"""

from __future__ import annotations

import importlib
import json
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import ModelError, UnsafeModelError
from .card import ModelCard
from .optional import require
from .weights import fit_weights

# Only classes from these packages may be named in plans (plans are data, not code).
_ALLOWED_PREFIXES = ("dynamic_network_architectures.", "torch.nn.")
_NORMALIZATION = {"ZScoreNormalization", "CTNormalization", "NoNormalization", "RescaleTo01Normalization",
                  "RGBTo0_1Normalization"}


def is_results_folder(folder: Path) -> bool:
    return folder.is_dir() and (folder / "plans.json").is_file() and (folder / "dataset.json").is_file()


def find_results_folder(path: Path) -> tuple[Path, Path | None]:
    """(results folder, checkpoint file or None) for a results folder, a fold folder or a checkpoint."""
    if path.is_file() and is_results_folder(path.parent.parent):
        return path.parent.parent, path
    if path.is_dir() and path.name.startswith("fold_") and is_results_folder(path.parent):
        return path.parent, _checkpoint_in(path)
    return path, None


def _checkpoint_in(fold: Path) -> Path | None:
    for name in ("checkpoint_final.pth", "checkpoint_best.pth"):
        if (fold / name).is_file():
            return fold / name
    return None


def _trained_folds(folder: Path) -> list[Path]:
    """Every fold's checkpoint, as nnU-Net's predictor finds them (fold_0, fold_1, ...; else fold_all)."""
    folds = sorted((p for p in folder.iterdir() if p.is_dir() and re.fullmatch(r"fold_\d+", p.name)),
                   key=lambda p: int(p.name.split("_")[1]))
    found = [c for c in (_checkpoint_in(f) for f in folds) if c is not None]
    if not found and (folder / "fold_all").is_dir():
        found = [c for c in [_checkpoint_in(folder / "fold_all")] if c is not None]
    if found:
        return found
    raise ModelError(
        f"the nnU-Net folder {folder.name} has no fold_N/checkpoint_final.pth; point at a folder that holds "
        "trained folds (e.g. .../nnUNetTrainer__nnUNetPlans__3d_fullres)"
    )


def _safe_numpy_globals() -> list[Any]:
    """Numpy types that checkpoints store in their training logs: plain data, no code."""
    core = getattr(np, "_core", None) or np.core
    names: list[Any] = [core.multiarray.scalar, np.dtype, core.multiarray._reconstruct, np.ndarray]
    names += [type(np.dtype(t)) for t in ("float64", "float32", "int64", "int32", "bool")]
    # checkpoints written with numpy 1 name the same functions under numpy.core
    names += [(core.multiarray.scalar, "numpy.core.multiarray.scalar"),
              (core.multiarray._reconstruct, "numpy.core.multiarray._reconstruct")]
    return names


def load_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """The network weights of an nnU-Net checkpoint, read without running pickled code."""
    from .model_file import load_weights, model_file_kind

    model_file_kind(path)  # an empty, cut-short or wrong file says what it is
    checkpoint = load_weights(path, "Re-save only the weights: torch.save({'network_weights': "
                                    "checkpoint['network_weights']}, path) in a Python session you trust.",
                              _safe_numpy_globals())
    weights = checkpoint.get("network_weights", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise ModelError(f"{path.name} has no 'network_weights' state dict; is it an nnU-Net v2 checkpoint?")
    # torch.compile'd training stores names with an "_orig_mod." prefix
    return {key.replace("_orig_mod.", "", 1): value for key, value in weights.items()}


def _locate(name: str) -> Any:
    """Import ``package.module.Name`` if it lies in an allowed package."""
    if not name.startswith(_ALLOWED_PREFIXES):
        raise UnsafeModelError(
            f"the plans name {name!r}; only classes from {', '.join(p.rstrip('.') for p in _ALLOWED_PREFIXES)} "
            "are built from nnU-Net plans"
        )
    module_name, _, attribute = name.rpartition(".")
    if module_name.startswith("dynamic_network_architectures"):
        module = require(module_name, "nnunet")
    else:
        module = importlib.import_module(module_name)
    found = getattr(module, attribute, None)
    if found is None:
        raise ModelError(f"{name!r} named in the plans does not exist in the installed {module_name}")
    return found


def _configuration(plans: dict[str, Any], name: str) -> dict[str, Any]:
    configurations = plans.get("configurations", {})
    if name not in configurations:
        raise ModelError(f"the plans have no configuration {name!r}; they have: {', '.join(configurations)}")
    config = dict(configurations[name])
    parent = config.pop("inherits_from", None)
    if parent:
        merged = _configuration(plans, parent)
        merged.update(config)
        return merged
    return config


def _labels(dataset: dict[str, Any]) -> tuple[tuple[str, ...], bool]:
    """(class names by output channel, region-based)."""
    labels = dataset.get("labels", {})
    if any(isinstance(v, (list, tuple)) for v in labels.values()):
        return tuple(name for name, value in labels.items() if name != "background"), True
    ordered = sorted(labels.items(), key=lambda item: int(item[1]))
    return tuple(name for name, _ in ordered), False


def build_network(plans: dict[str, Any], config: dict[str, Any], in_channels: int, classes: int) -> nn.Module:
    """The network the plans describe, without deep supervision, with out-of-place activations."""
    if "architecture" in config:
        architecture = config["architecture"]
        cls = _locate(architecture["network_class_name"])
        kwargs = dict(architecture["arch_kwargs"])
        for key in architecture.get("_kw_requires_import", []):
            if kwargs.get(key) is not None:
                kwargs[key] = _locate(kwargs[key])
    else:  # plans written by nnU-Net v2 before 2.4
        class_name = config.get("UNet_class_name", "PlainConvUNet")
        cls = _locate(f"dynamic_network_architectures.architectures.unet.{class_name}")
        kernels = config["conv_kernel_sizes"]
        dims = len(kernels[0])
        stages = len(kernels)
        kwargs = {
            "n_stages": stages,
            "features_per_stage": [min(config["UNet_base_num_features"] * 2 ** i, config["unet_max_num_features"])
                                   for i in range(stages)],
            "conv_op": nn.Conv3d if dims == 3 else nn.Conv2d,
            "kernel_sizes": kernels,
            "strides": config["pool_op_kernel_sizes"],
            "n_conv_per_stage_decoder": config["n_conv_per_stage_decoder"],
            "conv_bias": True,
            "norm_op": nn.InstanceNorm3d if dims == 3 else nn.InstanceNorm2d,
            "norm_op_kwargs": {"eps": 1e-5, "affine": True},
            "dropout_op": None,
            "dropout_op_kwargs": None,
            "nonlin": nn.LeakyReLU,
            "nonlin_kwargs": {"inplace": True},
        }
        blocks_key = "n_blocks_per_stage" if class_name == "ResidualEncoderUNet" else "n_conv_per_stage"
        kwargs[blocks_key] = config["n_conv_per_stage_encoder"]
    if isinstance(kwargs.get("nonlin_kwargs"), dict):
        # in-place activations would overwrite the activation a CAM captures; results are identical
        kwargs["nonlin_kwargs"] = {**kwargs["nonlin_kwargs"], "inplace": False}
    try:
        return cls(input_channels=in_channels, num_classes=classes, deep_supervision=False, **kwargs)
    except TypeError as error:
        raise ModelError(f"cannot build {cls.__name__} from the plans: {error}") from error


def _intensity(plans: dict[str, Any], config: dict[str, Any], channels: int) -> dict[str, Any]:
    schemes = config.get("normalization_schemes", ["ZScoreNormalization"] * channels)
    use_mask = config.get("use_mask_for_norm", [False] * channels)
    properties = plans.get("foreground_intensity_properties_per_channel", {})
    per_channel = []
    for index, scheme in enumerate(schemes):
        if scheme not in _NORMALIZATION:
            raise ModelError(f"nnU-Net normalisation {scheme!r} is not supported; supported: {sorted(_NORMALIZATION)}")
        if scheme == "ZScoreNormalization":
            per_channel.append({"scheme": "zscore", "nonzero_only": bool(use_mask[index])})
        elif scheme == "CTNormalization":
            stats = properties.get(str(index))
            if stats is None:
                raise ModelError(f"the plans lack foreground_intensity_properties_per_channel for channel {index}")
            per_channel.append({"scheme": "clip-zscore", "window": [stats["percentile_00_5"], stats["percentile_99_5"]],
                                "mean": stats["mean"], "std": stats["std"]})
        elif scheme == "RescaleTo01Normalization":
            per_channel.append({"scheme": "minmax"})
        elif scheme == "RGBTo0_1Normalization":
            per_channel.append({"scheme": "ct-window", "window": [0, 255]})
        else:
            per_channel.append({"scheme": "none"})
    # nnU-Net z-scores "use_mask_for_norm" channels over one mask: the hole-filled non-zero region of
    # all channels (its crop_to_nonzero), not each channel's own non-zero voxels
    return {"scheme": "per-channel", "channels": per_channel, "mask": "nonzero-filled"}


def _resampling(config: dict[str, Any]) -> dict[str, Any]:
    """nnU-Net's resampling of the image (to the plans' spacing) and of the logits (back), from the plans."""
    def recipe(key: str, order: int) -> dict[str, Any]:
        kwargs = config.get(key) or {}
        return {"order": int(kwargs.get("order", order)), "order_z": int(kwargs.get("order_z", 0)),
                "force_separate_z": kwargs.get("force_separate_z")}

    return {"scheme": "nnunet", "image": recipe("resampling_fn_data_kwargs", 3),
            "map": recipe("resampling_fn_probabilities_kwargs", 1), "anisotropy_threshold": 3.0}


def card_for(folder: Path, plans: dict[str, Any], dataset: dict[str, Any], configuration: str,
             network: nn.Module) -> ModelCard:
    config = _configuration(plans, configuration)
    channels = dataset.get("channel_names", dataset.get("modality", {"0": "image"}))
    class_names, regions = _labels(dataset)
    transpose = tuple(int(a) for a in plans.get("transpose_forward", (0, 1, 2)))
    spacing_model = [float(s) for s in config["spacing"]]
    spatial_dims = 2 if len(config.get("patch_size", spacing_model)) == 2 else 3
    if spatial_dims == 2:
        spacing_model = [None, *spacing_model[-2:]]  # 2D: the first (slice) axis keeps its spacing
    spacing_kji: list[float | None] = [None, None, None]
    for model_axis, array_axis in enumerate(transpose):
        spacing_kji[array_axis] = spacing_model[model_axis]
    strides = config.get("architecture", {}).get("arch_kwargs", {}).get("strides", config.get("pool_op_kernel_sizes", [[1]]))
    per_axis = np.prod(np.asarray(strides, dtype=int), axis=0)
    layers = tuple(name for name, _ in network.named_modules() if re.fullmatch(r"decoder\.stages\.\d+", name))
    return ModelCard(
        name=f"{dataset.get('name', folder.name)} ({configuration})",
        spatial_dims=spatial_dims,
        in_channels=len(channels),
        class_names=class_names,
        spacing=tuple(reversed(spacing_kji)),
        intensity=_intensity(plans, config, len(channels)),
        layers=tuple(reversed(layers)),  # the last decoder stage (full resolution) first
        outputs="logits",
        multilabel=bool(regions),
        slice_axis=0,
        divisible_by=int(np.max(per_axis)),
        transpose=transpose,  # type: ignore[arg-type]
        crop_nonzero=True,
        patch_size=tuple(int(v) for v in config["patch_size"]) if "patch_size" in config else None,
        resampling=_resampling(config),
        extra={"nnunet": {"configuration": configuration, "region_based": regions}},
    )


def _configuration_name(folder: Path, plans: dict[str, Any]) -> str:
    """From the folder name (``Trainer__Plans__configuration``), else 3d_fullres, 2d, the first."""
    parts = folder.name.split("__")
    if len(parts) == 3 and parts[2] in plans.get("configurations", {}):
        return parts[2]
    for name in ("3d_fullres", "2d"):
        if name in plans.get("configurations", {}):
            return name
    return next(iter(plans.get("configurations", {})))


def load_results_folder(path: Path) -> tuple[nn.Module, ModelCard]:
    """Network (eval mode, CPU) and card from an nnU-Net v2 results folder, fold folder or checkpoint.

    A results folder gives the ensemble of every trained fold (``FoldEnsemble``: the mean of their
    logits, as nnU-Net's predictor); a fold folder or a checkpoint gives that fold alone.
    """
    folder, checkpoint = find_results_folder(path)
    checkpoints = [checkpoint] if checkpoint is not None else _trained_folds(folder)
    try:
        plans = json.loads((folder / "plans.json").read_text(encoding="utf-8"))
        dataset = json.loads((folder / "dataset.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise ModelError(f"cannot read plans.json / dataset.json in {folder}: {error}") from error
    configuration = _configuration_name(folder, plans)
    config = _configuration(plans, configuration)
    channels = len(dataset.get("channel_names", dataset.get("modality", {"0": "image"})))
    class_names, _ = _labels(dataset)
    networks = []
    for checkpoint in checkpoints:
        network = build_network(plans, config, channels, len(class_names))
        fit_weights(network, load_checkpoint(checkpoint), f"the weights in {checkpoint}",
                    f"the network the plans describe ({configuration})")
        networks.append(network.eval())
    card = card_for(folder, plans, dataset, configuration, networks[0])
    fold_names = [c.parent.name for c in checkpoints]
    card = replace(card, extra={**card.extra, "nnunet": {**card.extra["nnunet"], "folds": fold_names}})
    if len(networks) == 1:
        return networks[0], card
    from .fold_ensemble import FoldEnsemble

    return FoldEnsemble(networks, fold_names).eval(), card
