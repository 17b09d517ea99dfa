"""Heatmap methods: each turns a layer's activations A (and the target's gradient G) into a map.

The gradient methods are pure functions: they take ``activation`` and ``gradient`` of shape
``(B, K, *spatial)`` and return the map before ReLU, shape ``(B, *spatial)``; 2D and 3D alike.
Notation as in DESIGN.md: G_k(u) = dy/dA_k(u), y = sum_p m(p) z_c(p).

:class:`HeatmapMethod` is the one interface the engine's batch loop (``engine.job``) runs: a
gradient method wraps its function (:class:`GradientMethod`); a method that needs passes of its
own over the whole input first, like Kernel-Weighted Contribution's ablations
(``engine.kernel_weighted``), does them in :meth:`HeatmapMethod.prepare`. Like pytorch-grad-cam's
``BaseCAM`` subclasses, the loop does not know which kind it runs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..progress import ProgressCallback

Method = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _spatial(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(range(2, t.ndim))


def seg_hires_grad_cam(activation: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
    """Seg-HiRes-Grad CAM (Rheude et al., MELBA 2024): ``sum_k G_k * A_k``.

    HiResCAM's element-wise product (Draelos & Carin, arXiv:2011.08891) with the
    segmentation target; keeps the gradient's spatial support, so the map is local
    to the ROI's receptive field.
    """
    return (gradient * activation).sum(dim=1)


def seg_grad_cam(activation: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
    """Seg-Grad CAM (Vinogradova et al., AAAI 2020): ``sum_k mean_u(G_k) * A_k``."""
    weights = gradient.mean(dim=_spatial(gradient), keepdim=True)
    return (weights * activation).sum(dim=1)


def seg_grad_cam_plus_plus(activation: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
    """Grad-CAM++ (Chattopadhay et al., WACV 2018, eq. 19) on the segmentation target.

    ``alpha_k(u) = G^2 / (2 G^2 + (sum_v A_k(v)) G^3)``, ``w_k = sum_u alpha_k(u) ReLU(G_k(u))``,
    map ``sum_k w_k A_k``. This is the closed form as printed in the paper (the spatial
    sum of A multiplies G^3); it never exponentiates the score, so it cannot overflow
    on ROI sums of thousands of voxels. The "sum of A*G^3" variant some peers use is
    a different formula.
    """
    g2 = gradient.pow(2)
    g3 = g2 * gradient
    activation_sum = activation.sum(dim=_spatial(activation), keepdim=True)
    denominator = 2 * g2 + activation_sum * g3
    safe = torch.where(denominator != 0, denominator, torch.ones_like(denominator))
    alpha = torch.where(gradient != 0, g2 / safe, torch.zeros_like(g2))
    weights = (alpha * torch.relu(gradient)).sum(dim=_spatial(gradient), keepdim=True)
    return (weights * activation).sum(dim=1)


def seg_xgrad_cam(activation: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
    """XGrad-CAM (Fu et al., BMVC 2020): ``w_k = sum_u G_k A_k / sum_u A_k``, map ``sum_k w_k A_k``."""
    dims = _spatial(activation)
    activation_sum = activation.sum(dim=dims, keepdim=True)
    safe = torch.where(activation_sum != 0, activation_sum, torch.ones_like(activation_sum))
    weights = (gradient * activation).sum(dim=dims, keepdim=True) / safe
    weights = torch.where(activation_sum != 0, weights, torch.zeros_like(weights))
    return (weights * activation).sum(dim=1)


def seg_layer_cam(activation: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
    """LayerCAM (Jiang et al., TIP 2021): ``sum_k ReLU(G_k) * A_k``, element-wise like HiResCAM."""
    return (torch.relu(gradient) * activation).sum(dim=1)


METHODS: dict[str, Method] = {
    "seg-hires-grad-cam": seg_hires_grad_cam,
    "seg-grad-cam": seg_grad_cam,
    "seg-grad-cam++": seg_grad_cam_plus_plus,
    "seg-xgrad-cam": seg_xgrad_cam,
    "seg-layer-cam": seg_layer_cam,
}


@dataclass(frozen=True)
class Preparation:
    """What a method's :meth:`HeatmapMethod.prepare` may run on (the model is already prepared:
    in its owner's inference mode, on ``device``).

    Attributes:
        model: the network.
        samples: ``(S, C, *model_spatial)`` model inputs, on the CPU (moved per chunk).
        roi: ``(S, *model_spatial)`` region per sample, or None for the model's prediction.
        todo: indices of the samples with something to explain (a non-empty given region).
        device: where the model runs.
        layers: the layers explained.
        class_index, multilabel, probabilities: the target's class and how outputs are read.
        output_key: which of several outputs is the segmentation (``engine.capture.select_output``).
        progress: this stage's share of the bar (None: report nothing).
    """

    model: nn.Module
    samples: torch.Tensor
    roi: torch.Tensor | None
    todo: torch.Tensor
    device: torch.device
    layers: Sequence[str]
    class_index: int
    multilabel: bool
    probabilities: bool
    output_key: int | str | None
    progress: ProgressCallback | None


class HeatmapMethod:
    """One heatmap method as the engine's batch loop runs it.

    Attributes:
        name: the catalog name (``catalog.METHOD_CHOICES``).
        uses_gradient: the map needs G = dy/dA (all such methods share one backward pass).
        preparation_weight: cost of :meth:`prepare` relative to the gradient pass's 1, for the
            progress bar; 0 = no preparation.
    """

    name: str = ""
    uses_gradient: bool = True
    preparation_weight: float = 0.0

    def check(self, model: nn.Module) -> None:
        """Refuse, before any work, a model this method cannot run on (raise a SegHiResCAMError)."""

    def prepare(self, run: Preparation) -> None:
        """Passes of its own over the input before the maps are drawn (e.g. ablations)."""

    def layer_map(self, layer: str, activation: torch.Tensor, gradient: torch.Tensor | None) -> torch.Tensor:
        """The map before ReLU, ``(B, *spatial)``, from the layer's ``(B, K, *spatial)`` activations."""
        raise NotImplementedError


class GradientMethod(HeatmapMethod):
    """A method that is a function of (A, G), one of :data:`METHODS`."""

    def __init__(self, name: str, function: Method) -> None:
        self.name, self.function = name, function

    def layer_map(self, layer: str, activation: torch.Tensor, gradient: torch.Tensor | None) -> torch.Tensor:
        return self.function(activation, gradient)
