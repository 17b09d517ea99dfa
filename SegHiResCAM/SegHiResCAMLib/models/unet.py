"""A plain U-Net for 2D or 3D (batch norm, skip connections): the demo and test network.

Module names are stable and readable, since users pick layers by name:
``encoder.0`` ... ``encoder.{n-2}``, ``bottleneck``, ``decoder.0`` ... ``decoder.{n-2}``
(``decoder.0`` is the first stage after the bottleneck, the coarsest), and ``head``,
the 1x1 convolution that produces the class logits.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..errors import ModelError

_CONV = {2: nn.Conv2d, 3: nn.Conv3d}
_UPCONV = {2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
_NORM = {2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_POOL = {2: nn.MaxPool2d, 3: nn.MaxPool3d}


class ConvBlock(nn.Sequential):
    """(conv 3, batch norm, ReLU) twice."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int) -> None:
        conv, norm = _CONV[spatial_dims], _NORM[spatial_dims]
        super().__init__(
            conv(in_channels, out_channels, 3, padding=1, bias=False),
            norm(out_channels),
            nn.ReLU(),
            conv(out_channels, out_channels, 3, padding=1, bias=False),
            norm(out_channels),
            nn.ReLU(),
        )


class UpBlock(nn.Module):
    """Transposed convolution (x2), concatenation with the skip, then a ConvBlock."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.up = _UPCONV[spatial_dims](in_channels, out_channels, 2, stride=2)
        self.conv = ConvBlock(spatial_dims, 2 * out_channels, out_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([self.up(x), skip], dim=1))


class UNet(nn.Module):
    """U-Net returning class logits of shape ``(N, out_channels, *spatial)``.

    Args:
        spatial_dims: 2 or 3.
        in_channels: image channels.
        out_channels: classes (logits, no softmax).
        channels: feature channels per level; the last is the bottleneck.
            Input sizes must be divisible by ``2 ** (len(channels) - 1)``.
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = 1,
        out_channels: int = 2,
        channels: Sequence[int] = (8, 16, 32, 64),
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ModelError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if len(channels) < 2:
            raise ModelError(f"channels needs at least two levels, got {list(channels)}")
        self.spatial_dims = spatial_dims
        levels = list(channels)
        inputs = [in_channels] + levels[:-2]
        self.encoder = nn.ModuleList(ConvBlock(spatial_dims, i, o) for i, o in zip(inputs, levels[:-1]))
        self.pool = _POOL[spatial_dims](2)
        self.bottleneck = ConvBlock(spatial_dims, levels[-2], levels[-1])
        ups = list(reversed(levels))
        self.decoder = nn.ModuleList(UpBlock(spatial_dims, i, o) for i, o in zip(ups[:-1], ups[1:]))
        self.head = _CONV[spatial_dims](levels[0], out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips: list[torch.Tensor] = []
        for block in self.encoder:
            x = block(x)
            skips.append(x)
            x = self.pool(x)
        x = self.bottleneck(x)
        # Indexing, not reversed(): keeps the network scriptable with torch.jit.script.
        for index, block in enumerate(self.decoder):
            x = block(x, skips[len(skips) - 1 - index])
        return self.head(x)
