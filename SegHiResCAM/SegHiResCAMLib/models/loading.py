"""Turn a model file or folder into a module ``explain`` can use, plus its model card.

Supported (``load_model`` tells them apart by what is on disk):

| what the path is | kind |
| --- | --- |
| ``torch.export`` archive (``.pt2``, ``torch.export.save``) | ``exported-program`` |
| TorchScript file (``torch.jit.script``/``trace``; MONAI's ``model.ts``) | ``torchscript`` |
| state dict + model card ``<stem>.json``/``model.json`` naming the network | ``state-dict`` |
| state dict + bare network spec ``{"name": "UNet", "args": {...}}`` (MONAI nets) | ``monai-network`` |
| MONAI bundle folder (``configs/inference.json``, ``models/model.pt`` or ``.ts``) | ``monai-bundle`` |
| nnU-Net v2 results folder, fold folder or ``checkpoint_final.pth`` | ``nnunet`` |
| Python file defining ``build_model()`` + ``<stem>.pth`` (needs ``trust_code``) | ``python`` |

Loading never unpickles arbitrary objects: ``torch.load(..., weights_only=True)``, and ``.pt2``
archives are checked before ``torch.export.load`` reads them (``exported_archive``). A card
JSON beside a model (``<stem>.json``, or ``model.json`` in its folder) overrides, key by key,
what the loader read from the bundle, plans or network.
"""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..errors import ModelError
from .card import ModelCard, find_card
from .trust import code_to_trust  # noqa: F401  (the trust question, torch-free; public here before)
from .weights import fit_weights, load_state_dict


@dataclass(frozen=True)
class LoadedModel:
    """A network ready for ``explain`` (eval mode but for the card's ``train_mode_modules``, on CPU)
    and the card describing it. ``explain(loaded, ...)`` takes it as it is (the card gives defaults)."""

    module: nn.Module
    card: ModelCard
    source: Path
    kind: str


def _build_unet(**args: Any) -> nn.Module:
    from .unet import UNet

    return UNet(**args)


# name in a card's "network" -> builder(**args)
BUILDERS: dict[str, Callable[..., nn.Module]] = {"SegHiResCAM.UNet": _build_unet}


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise ModelError(f"cannot read {path}: {error}") from error
    if not isinstance(data, dict):
        raise ModelError(f"{path.name} must hold a JSON object")
    return data


def is_network_spec(data: dict[str, Any]) -> bool:
    """A bare network spec ``{"name": ..., "args": {...}}`` (optionally with a "card")."""
    return "name" in data and set(data) <= {"name", "args", "card"} and isinstance(data.get("args", {}), dict)


def _with_card_beside(card: ModelCard, source: Path) -> ModelCard:
    """``card`` with the keys of a card JSON beside ``source`` put over it."""
    card_path = find_card(source)
    if card_path is None:
        return card
    data = _read_json(card_path)
    if is_network_spec(data):
        data = data.get("card", {})
    return ModelCard.from_dict({**card.to_dict(), **data})


def build_network(card: ModelCard, source: Path) -> nn.Module:
    if not card.network or "name" not in card.network:
        raise ModelError(f"the model card for {source.name} has no 'network' entry saying how to build the network")
    name = card.network["name"]
    if name not in BUILDERS and name.startswith(("monai.", "monai:")):
        from .monai_models import build_network as build_monai

        return build_monai(name, card.network.get("args", {}))
    if name not in BUILDERS:
        raise ModelError(f"network {name!r} in the model card is unknown; known networks: {', '.join(sorted(BUILDERS))}")
    return BUILDERS[name](**card.network.get("args", {}))


def _load_weights(module: nn.Module, weights: Path) -> None:
    fit_weights(module, load_state_dict(weights), f"the weights in {weights.name}", "the network described for them")


def _card_for_spec(spec: dict[str, Any], source: Path) -> ModelCard:
    args = spec.get("args", {})
    name = str(spec["name"])
    is_monai = name not in BUILDERS
    network = {"name": name if not is_monai or name.startswith("monai") else f"monai.{name}", "args": args}
    guessed: dict[str, Any] = {"name": source.stem, "network": network}
    for key in ("spatial_dims", "in_channels"):  # MONAI networks take these arguments by these names
        if isinstance(args.get(key), int):
            guessed[key] = args[key]
    if is_monai:
        guessed["transpose"] = [2, 1, 0]  # MONAI's loaders give (I, J, K) arrays
    return ModelCard.from_dict({**guessed, **spec.get("card", {}), "network": network})


def _load_torchscript(source: Path) -> LoadedModel:
    from .torchscript import load_torchscript

    module = load_torchscript(source)
    card = _with_card_beside(ModelCard(name=source.stem), source)
    return LoadedModel(module=module.eval(), card=card, source=source, kind="torchscript")


def _load_exported(source: Path) -> LoadedModel:
    from .exported import card_defaults, fit_card, load_exported

    module = load_exported(source)
    card = fit_card(module, _with_card_beside(ModelCard(name=source.stem, **card_defaults(module)), source))
    if card.train_mode_modules:
        # A program's graph fixed each module's mode at export; setting flags on its stand-ins would change nothing.
        raise ModelError(f"model card: train_mode_modules cannot apply to the exported program {source.name}, which "
                         "runs as it was exported; remove the entry, or use the TorchScript or Python model")
    return LoadedModel(module=module.eval(), card=card, source=source, kind="exported-program")


def _load_bundle(folder: Path, trust_code: bool) -> LoadedModel:
    from . import monai_models

    config = monai_models.read_config(monai_models.config_path(folder))
    card = monai_models.bundle_card(folder, config)
    weights, script = folder / "models" / "model.pt", folder / "models" / "model.ts"
    if weights.is_file():
        module = monai_models.build_bundle_network(config, trust_code=trust_code, bundle=folder)
        _load_weights(module, weights)
    elif script.is_file():
        from .torchscript import load_torchscript

        module = load_torchscript(script)
    else:
        raise ModelError(f"the bundle {folder.name} has neither models/model.pt nor models/model.ts")
    return LoadedModel(module=module.eval(), card=_with_card_beside(card, folder), source=folder, kind="monai-bundle")


def _load_nnunet(source: Path) -> LoadedModel:
    from .nnunet import find_results_folder, load_results_folder

    module, card = load_results_folder(source)
    folder, _ = find_results_folder(source)
    return LoadedModel(module=module, card=_with_card_beside(card, folder), source=source, kind="nnunet")


def _load_python(source: Path, trust_code: bool) -> LoadedModel:
    from .python_builder import build_from_file, weights_beside

    module = build_from_file(source, trust_code=trust_code)
    _load_weights(module, weights_beside(source))
    card = _with_card_beside(ModelCard(name=source.stem), source)
    return LoadedModel(module=module.eval(), card=card, source=source, kind="python")


def load_model(path: str | Path, *, trust_code: bool = False) -> LoadedModel:
    """Load a model and its card from ``path`` (any kind in the module docstring's table).

    The network comes in evaluation mode, except the submodules that the card's
    ``train_mode_modules`` names, which run in training mode as their owner runs them.

    Args:
        path: a model file or folder.
        trust_code: allow running code that comes with the model (a ``.py`` builder, or
            ``$`` expressions in a MONAI bundle's network definition).

    Raises:
        ModelError: the file is missing, unreadable, damaged, not a model (an image, text, an
            archive, ...) or not a segmentation model.
        UnsafeModelError: the file would need full unpickling, or is code and ``trust_code`` is False.
        MissingDependencyError: the model needs an optional package (the message names the extra).
    """
    loaded = _load_any(Path(path), trust_code)
    set_train_mode_modules(loaded.module, loaded.card.train_mode_modules)
    return loaded


def set_train_mode_modules(module: nn.Module, patterns: Sequence[str]) -> None:
    """Put the submodules that ``patterns`` name into training mode (each pattern a submodule path,
    a glob over paths such as ``"*.norm*"``, or a class name such as ``"InstanceNorm3d"``).

    Raises:
        ModelError: a pattern names no submodule.
    """
    named = module.submodules() if hasattr(module, "submodules") else [
        (name, sub) for name, sub in module.named_modules() if name]
    for pattern in patterns:
        chosen = [sub for name, sub in named
                  if fnmatch.fnmatchcase(name, pattern) or getattr(sub, "original_name", type(sub).__name__) == pattern]
        if not chosen:
            examples = ", ".join(name for name, _ in named[:6])
            raise ModelError(f"model card: train_mode_modules entry {pattern!r} names no module of the network; give "
                             f"submodule paths (e.g. {examples}), globs over them, or class names")
        for sub in chosen:
            sub.train()


def _load_any(source: Path, trust_code: bool) -> LoadedModel:
    from . import monai_models, nnunet
    from .exported_archive import is_exported_program_file
    from .model_file import model_file_kind

    if not source.exists():
        raise ModelError(f"the model file {source} does not exist")
    if source.is_dir():
        if monai_models.is_bundle(source):
            return _load_bundle(source, trust_code)
        if nnunet.is_results_folder(nnunet.find_results_folder(source)[0]):
            return _load_nnunet(source)
        inside = sorted(p.name for p in source.iterdir() if p.suffix in (".pt", ".pth", ".ts", ".py"))
        hint = f"; it holds {', '.join(inside[:4])}: choose that file instead" if inside else ""
        raise ModelError(
            f"the folder {source.name} is neither a MONAI bundle (configs/inference.json, models/model.pt) nor an "
            f"nnU-Net v2 results folder (plans.json, dataset.json, fold_N/checkpoint_final.pth){hint}"
        )
    if source.suffix == ".py":
        return _load_python(source, trust_code)
    if source.suffix == ".pt2" or is_exported_program_file(source):
        return _load_exported(source)  # checked by exported_archive before torch reads it
    if source.suffix == ".json":
        _read_json(source)
        weights = next((source.with_suffix(s) for s in (".pth", ".pt") if source.with_suffix(s).is_file()), None)
        if weights is None:
            raise ModelError(f"no weights beside {source.name}: expected {source.with_suffix('.pth').name}")
        source = weights
    kind_on_disk = model_file_kind(source)  # an empty, damaged or wrong file is refused here, saying what it is
    if nnunet.is_results_folder(source.parent.parent) and source.parent.name.startswith("fold_"):
        return _load_nnunet(source)
    if kind_on_disk == "torchscript":
        return _load_torchscript(source)
    card_path = find_card(source)
    if card_path is None:
        raise ModelError(
            f"no model card found beside {source.name}: write {source.with_suffix('.json').name} "
            "(see README, 'Model card') describing the network, its classes and its input"
        )
    data = _read_json(card_path)
    if is_network_spec(data):
        card, kind = _card_for_spec(data, source), "monai-network"
        if str(data["name"]) in BUILDERS:
            kind = "state-dict"
    else:
        card, kind = ModelCard.from_dict(data), "state-dict"
    module = build_network(card, source)
    _load_weights(module, source)
    module.eval()
    return LoadedModel(module=module, card=card, source=source, kind=kind)
