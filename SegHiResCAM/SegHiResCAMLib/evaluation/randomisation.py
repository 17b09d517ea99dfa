"""Sanity checks by randomisation (Adebayo et al., "Sanity checks for saliency maps", NeurIPS 2018).

Model-parameter randomisation, cascading: the model's parametrised layers are grouped into
stages (the leaf modules that own parameters, grouped by their parent module) and ordered by
when they run in a forward pass. Starting at the output, the stages are re-initialised one after
another, cumulatively (stage 1 = the head, stage 2 = head and the block before it, ... last = the
whole model), and the map is recomputed after each. A method whose map depends on what the
model learnt changes: the Spearman rank correlation and SSIM (:mod:`similarity`) between the
trained and the randomised map fall. A map that stays the same (the region baseline, by design)
fails the check.

Re-initialisation: modules with ``reset_parameters()`` (convolutions, norms, linear layers) call
it under a seeded generator; other parameters are permuted at random (same values, no learnt
order). The model itself is never touched: every randomised model is a deep copy.

Data randomisation: the same comparison between the maps of the trained model and of a model
trained on randomly permuted labels, when such a model is given (it cannot be made here).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..engine.device import model_device, prepared_model
from ..errors import InputError
from .similarity import spearman, ssim


@dataclass(frozen=True)
class Randomisation:
    """Similarity of the trained model's map to the map after each cumulative randomisation stage.

    Attributes:
        stages: name of the deepest stage randomised at each point (output first; the last = all).
        spearman: Spearman rank correlation at each point (NaN where a map is constant).
        ssim: SSIM at each point.
    """

    stages: tuple[str, ...]
    spearman: tuple[float, ...]
    ssim: tuple[float, ...]


def _stage_name(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else name


def execution_stages(model: nn.Module, probe: torch.Tensor) -> list[tuple[str, list[str]]]:
    """Stages of the model from output to input: ``[(stage, [module names]), ...]``.

    A copy of the model runs once on ``probe`` with forward hooks on the modules that own
    parameters; the original model gets no hook.

    Raises:
        InputError: no module with parameters ran (e.g. a TorchScript model, whose submodules
            cannot be hooked).
    """
    shadow = copy.deepcopy(model)
    order: list[str] = []
    handles = []
    for name, module in shadow.named_modules():
        if name and any(True for _ in module.parameters(recurse=False)):
            handles.append(module.register_forward_hook(
                lambda module, inputs, output, name=name: order.append(name) if name not in order else None))
    try:
        with prepared_model(shadow, model_device(shadow)), torch.inference_mode():  # run as its owner runs it
            shadow(probe)
    finally:
        for handle in handles:
            handle.remove()
    if not order:
        raise InputError("no layer with parameters could be followed through this model (TorchScript models cannot "
                         "be hooked); randomisation checks need the model as Python code (weights + model card)")
    stages: dict[str, list[str]] = {}
    for name in reversed(order):
        stages.setdefault(_stage_name(name), []).append(name)
    return list(stages.items())


def randomised_copy(model: nn.Module, module_names: Sequence[str], seed: int = 0) -> nn.Module:
    """A deep copy of ``model`` with the named modules' parameters re-initialised (see the module docstring)."""
    shadow = copy.deepcopy(model)
    modules = dict(shadow.named_modules())
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        for offset, name in enumerate(module_names):
            torch.manual_seed(seed + offset)
            module = modules[name]
            if callable(getattr(module, "reset_parameters", None)):
                module.reset_parameters()
                continue
            for parameter in module.parameters(recurse=False):
                flat = parameter.view(-1)
                flat.copy_(flat[torch.randperm(flat.numel())])
    return shadow


def compare(reference: np.ndarray, other: np.ndarray) -> tuple[float, float]:
    """``(Spearman, SSIM)`` of two maps normalised to [0, 1]."""
    return spearman(reference, other), ssim(reference, other, data_range=1.0)


def parameter_randomisation(model: nn.Module, probe: torch.Tensor, map_of: Callable[[nn.Module], np.ndarray], *,
                            points: int | None = None, seed: int = 0,
                            reference: np.ndarray | None = None) -> Randomisation:
    """Cascading model-parameter randomisation of one method's map.

    Args:
        model: the trained model (left as it is).
        probe: one model input ``(1, C, *spatial)`` to find the order in which layers run.
        map_of: ``map_of(module) -> map`` in [0, 1] computed exactly like the trained map (same
            image, region, layer and method), for a model with the trained one's layer names.
        points: how many cascade points to compute, spread evenly from the output and always
            ending with the whole model; None = every stage.
        seed: seed of the re-initialisation.
        reference: the trained model's map, if already computed.

    Returns:
        Randomisation.
    """
    stages = execution_stages(model, probe)
    reference = map_of(model) if reference is None else reference
    chosen = list(range(len(stages)))
    if points is not None and 0 < points < len(stages):
        chosen = sorted({int(round(v)) for v in np.linspace(0, len(stages) - 1, int(points))})
    names, rhos, indices = [], [], []
    for position in chosen:
        modules = [module for _, group in stages[: position + 1] for module in group]
        rho, index = compare(reference, map_of(randomised_copy(model, modules, seed)))
        names.append(stages[position][0])
        rhos.append(rho)
        indices.append(index)
    return Randomisation(tuple(names), tuple(rhos), tuple(indices))


def data_randomisation(trained_map: np.ndarray, random_labels_map: np.ndarray) -> tuple[float, float]:
    """``(Spearman, SSIM)`` between the trained model's map and that of a model trained on permuted labels."""
    return compare(trained_map, random_labels_map)
