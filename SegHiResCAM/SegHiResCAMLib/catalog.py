"""Every choice SegHiResCAM offers, named once: methods, target kinds, devices, region kinds.

Plain data, no torch and no numpy, so that every door reads the same names: the panel's enums
(``SegHiResCAM.py``, checked against this file by ``Testing/test_slicer_module_static.py``, with
their labels taken from here), the command line's choices and help, the settings' validation
(:mod:`SegHiResCAMLib.settings`, and so the worker protocol), and the engine's dispatch table
(``engine.registry``; a test asserts that both name the same methods).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

from .errors import InputError

LOGITS = "logits"
PROBABILITY_THRESHOLD = "probability-threshold"


@dataclass(frozen=True)
class Choice:
    """One named option: ``name`` is what the library, files and the command line use; ``label`` is
    what the panel shows."""

    name: str
    label: str
    description: str = ""


@dataclass(frozen=True)
class MethodChoice(Choice):
    """A heatmap method.

    Attributes:
        formula: the map in one line (notation of docs/DESIGN.md: A the layer's activations, G = dy/dA).
        gradient: computed from the target's gradient (all such methods share one backward pass);
            False for ablation methods, which run forward passes of their own.
        targets: the target kinds it can explain.
        signed: ``relu=False`` gives a meaningful signed map.
        note: what the panel adds to the label (cost, caveats).
    """

    formula: str = ""
    gradient: bool = True
    targets: tuple[str, ...] = (LOGITS, PROBABILITY_THRESHOLD)
    signed: bool = True
    note: str = ""

    @property
    def panel_label(self) -> str:
        return f"{self.label} ({self.note})" if self.note else self.label


METHOD_CHOICES: tuple[MethodChoice, ...] = (
    MethodChoice("seg-hires-grad-cam", "Seg-HiRes-Grad CAM", "element-wise gradient times activation (default)",
                 formula="ReLU(sum_k G_k * A_k)"),
    MethodChoice("seg-grad-cam", "Seg-Grad CAM", "one weight per channel: the mean gradient",
                 formula="ReLU(sum_k mean_u(G_k) A_k)"),
    MethodChoice("seg-grad-cam++", "Seg-Grad CAM++", "Grad-CAM++ weights (the paper's eq. 19)",
                 formula="ReLU(sum_k w_k A_k), w_k = sum_u alpha_k(u) ReLU(G_k(u))"),
    MethodChoice("seg-xgrad-cam", "Seg-XGrad CAM", "XGrad-CAM weights",
                 formula="ReLU(sum_k w_k A_k), w_k = sum_u(G_k A_k) / sum_u(A_k)"),
    MethodChoice("seg-layer-cam", "Seg-Layer CAM", "element-wise positive gradient times activation",
                 formula="ReLU(sum_k ReLU(G_k) * A_k)"),
    MethodChoice("kernel-weighted-contribution", "Kernel-Weighted Contribution",
                 "channel weights from zeroing each channel (about 2K forward passes for K channels)",
                 formula="ReLU(sum_k w_k ReLU(A_k)), w_k from ablating channel k",
                 gradient=False, targets=(LOGITS,), signed=False, note="slow: ablates each channel"),
)
DEFAULT_METHOD = METHOD_CHOICES[0].name

TARGET_CHOICES: tuple[Choice, ...] = (
    Choice(LOGITS, "Logits", "y = sum_p m(p) z_c(p): the class logits summed over the region"),
    Choice(PROBABILITY_THRESHOLD, "Probability above a threshold",
           "y = sum_p m(p) s_c(p) [s_c(p) > t]: the class probabilities above the target threshold t"),
)

DEVICE_CHOICES: tuple[Choice, ...] = (
    Choice("auto", "Auto (GPU if available)", "the GPU when torch sees one, else the CPU"),
    Choice("cuda", "GPU (CUDA)", "the GPU; refused where torch sees none"),
    Choice("cpu", "CPU", "the CPU"),
)

#: Region kinds: which voxels m(p) the target sums over.
REGION_CHOICES: tuple[Choice, ...] = (
    Choice("mask", "A segment", "the user's region: a segment, or a label or weight file"),
    Choice("prediction", "The model's prediction", "where the model predicts the class"),
    Choice("whole-image", "The whole image", "every voxel of the image (never the padding added for the model)"),
    Choice("point", "The prediction at a point",
           "the model's predicted region of the class connected to a point (a markup), or a sphere around the point "
           "where the model predicts nothing"),
)

C = TypeVar("C", bound=Choice)


def names(choices: Sequence[Choice]) -> tuple[str, ...]:
    """The names of a catalog list, in its order."""
    return tuple(choice.name for choice in choices)


def find(choices: Sequence[C], name: object, what: str) -> C:
    """The choice called ``name``.

    Raises:
        InputError: naming ``what`` (e.g. "method"), the value received and the names allowed.
    """
    for choice in choices:
        if choice.name == name:
            return choice
    raise InputError(f"{what} {name!r} is unknown; choose one of {', '.join(names(choices))}")


def method(name: object) -> MethodChoice:
    """The method called ``name``; an InputError listing the methods otherwise."""
    return find(METHOD_CHOICES, name, "method")
