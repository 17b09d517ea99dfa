"""The engine's dispatch table: catalog method name -> the :class:`~.methods.HeatmapMethod` that runs it.

``Testing/test_catalog_settings.py`` asserts that this table and ``catalog.METHOD_CHOICES`` name the
same methods and agree on which use the gradient.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

from .kernel_weighted import KernelWeightedContribution
from .methods import METHODS, GradientMethod, HeatmapMethod

ENGINE_METHODS: dict[str, Callable[[], HeatmapMethod]] = {
    **{name: partial(GradientMethod, name, function) for name, function in METHODS.items()},
    KernelWeightedContribution.name: KernelWeightedContribution,
}


def build_methods(names: Sequence[str]) -> list[HeatmapMethod]:
    """Fresh method objects for the names (checked against the catalog by ``ExplainSettings``)."""
    return [ENGINE_METHODS[name]() for name in names]
