"""Tiny networks of the kinds users bring (scriptable U-Nets, nnU-Net folders), for the model-loading tests."""

from __future__ import annotations

from typing import List

import numpy as np
import torch
from torch import nn


class Block(nn.Module):
    """conv 3 -> ReLU."""

    def __init__(self, dims: int, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = (nn.Conv2d if dims == 2 else nn.Conv3d)(in_channels, out_channels, 3, padding=1)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv(x))


class Up(nn.Module):
    """Upsampling block whose forward takes an extra argument (the skip)."""

    def __init__(self, dims: int, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.up = (nn.ConvTranspose2d if dims == 2 else nn.ConvTranspose3d)(in_channels, out_channels, 2, stride=2)
        self.conv = Block(dims, 2 * out_channels, out_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([self.up(x), skip], 1))


class ScriptableUNet(nn.Module):
    """A 3-level U-Net that ``torch.jit.script`` and ``torch.jit.trace`` both accept."""

    def __init__(self, dims: int = 3, classes: int = 3) -> None:
        super().__init__()
        self.enc = nn.ModuleList([Block(dims, 1, 4), Block(dims, 4, 8)])
        self.pool = nn.MaxPool2d(2) if dims == 2 else nn.MaxPool3d(2)
        self.mid = Block(dims, 8, 16)
        self.dec = nn.ModuleList([Up(dims, 16, 8), Up(dims, 8, 4)])
        self.head = (nn.Conv2d if dims == 2 else nn.Conv3d)(4, classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips: List[torch.Tensor] = []
        for block in self.enc:
            x = block(x)
            skips.append(x)
            x = self.pool(x)
        x = self.mid(x)
        index = 0
        for block in self.dec:
            x = block(x, skips[len(skips) - 1 - index])
            index += 1
        return self.head(x)


def scriptable_unet(dims: int = 3, classes: int = 3, seed: int = 0) -> ScriptableUNet:
    torch.manual_seed(seed)
    return ScriptableUNet(dims, classes).eval()


def blob_image(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """(1, *shape) float32 image: smooth noise with a bright blob, so predictions are not constant."""
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    blob = np.exp(-sum(g ** 2 for g in grids) * 4)
    return (blob + 0.1 * rng.standard_normal(shape)).astype(np.float32)[None]


def hooked(model: nn.Module, x: torch.Tensor, layers: list[str]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The eager reference: output and layer outputs through forward hooks."""
    modules = dict(model.named_modules())
    captured: dict[str, torch.Tensor] = {}
    handles = [modules[name].register_forward_hook(lambda m, i, o, name=name: captured.__setitem__(name, o))
               for name in layers]
    try:
        output = model(x)
    finally:
        for handle in handles:
            handle.remove()
    return output, [captured[name] for name in layers]
