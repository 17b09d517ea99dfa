"""Small networks built the way published ones are: in-place operations after layers, one module passed
into every block, instance norms kept in training mode (HD-BET), deep supervision and dict outputs."""

from __future__ import annotations

from typing import Dict, List

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def _conv(dims: int):
    return nn.Conv2d if dims == 2 else nn.Conv3d


class InplaceAfterLayers(nn.Module):
    """Each layer's output is changed in place right after it: ``y += skip`` (``body``), an
    ``nn.ReLU(inplace=True)`` (``act``, which returns its own input), ``torch.relu_`` (``mix``)."""

    def __init__(self, dims: int = 2, classes: int = 3) -> None:
        super().__init__()
        conv = _conv(dims)
        self.stem = conv(1, 4, 3, padding=1)
        self.body = conv(4, 4, 3, padding=1)
        self.act = nn.ReLU(inplace=True)
        self.mix = conv(4, 4, 3, padding=1)
        self.head = conv(4, classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = self.stem(x)
        y = self.body(skip)
        y += skip
        y = self.act(y)
        z = self.mix(y)
        z = torch.relu_(z)
        return self.head(z)

    def reference(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The same network without any in-place operation, and each layer's own output."""
        stem = self.stem(x)
        body = self.body(stem)
        act = torch.relu(body + stem)
        mix = self.mix(act)
        return self.head(torch.relu(mix)), {"stem": stem, "body": body, "act": act, "mix": mix}


class SharedBlock(nn.Module):
    """conv -> the activation module it was given (the same object in every block)."""

    def __init__(self, dims: int, channels: int, act: nn.Module) -> None:
        super().__init__()
        self.conv = _conv(dims)(channels, channels, 3, padding=1)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv(x))


class SharedActivationNet(nn.Module):
    """One ``nn.ReLU`` passed into all three blocks: one module object under the names ``act``,
    ``blocks.0.act``, ``blocks.1.act`` and ``blocks.2.act``, run three times per forward pass."""

    def __init__(self, dims: int = 2, classes: int = 2) -> None:
        super().__init__()
        conv = _conv(dims)
        self.act = nn.ReLU()
        self.stem = conv(1, 4, 3, padding=1)
        self.blocks = nn.ModuleList([SharedBlock(dims, 4, self.act) for _ in range(3)])
        self.head = conv(4, classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


class HDBETBlock(nn.Module):
    """HD-BET's pattern: instance norm (running statistics tracked) -> in-place leaky ReLU -> conv, plus a residual."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = nn.InstanceNorm3d(channels, affine=True, track_running_stats=True)
        self.conv = nn.Conv3d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.leaky_relu(self.norm(x), 0.01, inplace=True)) + x


class TinyHDBET(nn.Module):
    """A small 3D network built like HD-BET: instance norms that HD-BET keeps in training mode at inference
    (each image uses its own statistics), softmax outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv3d(1, 4, 3, padding=1)
        self.context = HDBETBlock(4)
        self.down = nn.Conv3d(4, 8, 3, stride=2, padding=1)
        self.deep = HDBETBlock(8)
        self.deep_seg = nn.Conv3d(8, 2, 1)
        self.up = nn.ConvTranspose3d(8, 4, 2, stride=2)
        self.end_norm = nn.InstanceNorm3d(4, affine=True, track_running_stats=True)
        self.end_conv = nn.Conv3d(4, 4, 3, padding=1)
        self.seg = nn.Conv3d(4, 2, 1)

    def outputs(self, x: torch.Tensor) -> List[torch.Tensor]:
        """The full-resolution softmax, then the half-resolution one (deep supervision)."""
        skip = self.context(self.stem(x))
        deep = self.deep(self.down(skip))
        x = self.up(deep) + skip
        x = self.end_conv(F.leaky_relu(self.end_norm(x), 0.01, inplace=True))
        return [torch.softmax(self.seg(x), 1), torch.softmax(self.deep_seg(deep), 1)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.outputs(x)[0]


class TinyHDBETWithDS(TinyHDBET):
    """HD-BET with ``do_ds``: returns ``[full resolution, half resolution]``, the full one first."""

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:  # type: ignore[override]
        return self.outputs(x)


def hd_bet_like(seed: int = 0, do_ds: bool = False, dtype=torch.float64) -> TinyHDBET:
    """A TinyHDBET as HD-BET runs it: eval mode, every instance norm back in training mode, running
    statistics far from any image's own (so eval mode would predict something else)."""
    torch.manual_seed(seed)
    model = (TinyHDBETWithDS() if do_ds else TinyHDBET()).to(dtype).eval()
    for module in model.modules():
        if isinstance(module, nn.InstanceNorm3d):
            module.running_mean.uniform_(1.0, 2.0)
            module.running_var.uniform_(4.0, 9.0)
            module.num_batches_tracked.fill_(1000)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.3, 0.3)
            module.train()
    return model


class TwoOutputs(nn.Module):
    """Returns a dict: ``"seg"`` (full resolution) and ``"aux"`` (half resolution), or two full-resolution
    entries (``"seg"`` and ``"edges"``) when ``both_full``."""

    def __init__(self, both_full: bool = False) -> None:
        super().__init__()
        self.both_full = both_full
        self.features = nn.Conv2d(1, 4, 3, padding=1)
        self.seg = nn.Conv2d(4, 3, 1)
        self.aux = nn.Conv2d(4, 3, 1)

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        features = torch.relu(self.features(x))
        if self.both_full:
            return {"edges": self.aux(features), "seg": self.seg(features)}
        return {"aux": self.aux(F.avg_pool2d(features, 2)), "seg": self.seg(features)}


class OnlySeg(nn.Module):
    """``TwoOutputs``' segmentation alone, with its weights: the reference a chosen output must equal."""

    def __init__(self, source: TwoOutputs) -> None:
        super().__init__()
        self.features, self.seg = source.features, source.seg
        self.training = source.training  # in the source's mode, as the owner would run it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.seg(torch.relu(self.features(x)))


def blob(shape: tuple[int, ...], seed: int = 0, dtype=np.float32) -> np.ndarray:
    """(1, *shape): a bright ball in smooth noise, so predictions are neither empty nor everything."""
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    ball = 2.0 * np.exp(-sum(g ** 2 for g in grids) * 3)
    return (ball + 0.3 * rng.standard_normal(shape)).astype(dtype)[None]


def float32_tolerance(*reduction_sizes: int) -> float:
    """An absolute tolerance for values of order one computed in float32 along reductions of these
    sizes: a few units of rounding per term summed."""
    return 4 * float(np.finfo(np.float32).eps) * float(sum(reduction_sizes))

