"""Models whose answers are known exactly, for the evaluation oracles (3D, CPU, tiny)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from SegHiResCAMLib.models.card import ModelCard
from SegHiResCAMLib.models.loading import LoadedModel
from SegHiResCAMLib.volume import Volume

SHAPE = (16, 16, 16)
BOX = (slice(4, 8), slice(8, 12), slice(4, 8))  # a 4^3 box: one 4-voxel block of the 4^3 grid


class BoxNet(nn.Module):
    """Class 1's logit at every voxel is the sum of ``features`` (= 2x) over BOX; class 0's is 0.

    So the region's score ``y = sum_p m(p) z_1(p)`` depends on the image inside BOX only, linearly.
    """

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Conv3d(1, 1, 1, bias=False)
        with torch.no_grad():
            self.features.weight.fill_(2.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inside = self.features(x)[:, :, BOX[0], BOX[1], BOX[2]].sum(dim=(2, 3, 4), keepdim=True)
        logit = inside.expand(-1, 1, *x.shape[2:])
        return torch.cat([torch.zeros_like(logit), logit], dim=1)


class NegativeNet(nn.Module):
    """Logits (0, -x) per voxel: class 1's probability sigmoid(-x) rises as the image darkens."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Conv3d(1, 1, 1, bias=False)
        with torch.no_grad():
            self.features.weight.fill_(-1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logit = self.features(x)
        return torch.cat([torch.zeros_like(logit), logit], dim=1)


def loaded(module: nn.Module, name: str = "oracle", **card_fields) -> LoadedModel:
    """A LoadedModel as load_model returns it (card with intensity "none" unless given)."""
    card = ModelCard(name=name, spatial_dims=3, class_names=("background", "object"), layers=("features",),
                     **card_fields)
    return LoadedModel(module=module.eval(), card=card, source=None, kind="python")  # type: ignore[arg-type]


def positive_volume(seed: int = 0, spacing=(1.0, 1.0, 1.0)) -> Volume:
    """Intensities in [1, 2): removing any voxel to 0 lowers BoxNet's score."""
    rng = np.random.default_rng(seed)
    matrix = np.diag([*spacing, 1.0])
    return Volume((1.0 + rng.random(SHAPE)).astype(np.float32), matrix)


def box_mask() -> np.ndarray:
    mask = np.zeros(SHAPE, bool)
    mask[BOX] = True
    return mask
