"""Upsampling of layer-resolution maps to the input grid, and global normalisation."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

_MODES = {1: "linear", 2: "bilinear", 3: "trilinear"}


def upsample_to(maps: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """Resize ``(B, *spatial)`` maps to ``size`` (bilinear in 2D, trilinear in 3D, align_corners=False)."""
    if tuple(maps.shape[1:]) == tuple(size):
        return maps
    mode = _MODES[len(size)]
    return F.interpolate(maps[:, None], size=size, mode=mode, align_corners=False)[:, 0]


def normalize_by_max(volume: torch.Tensor) -> torch.Tensor:
    """Divide by the maximum over the whole tensor; an all-zero map stays zero."""
    peak = volume.max()
    return volume / peak if peak > 0 else volume


def combine_layer_maps(maps: Sequence[torch.Tensor], normalize: bool) -> torch.Tensor:
    """One layer's map as it is; several layers' maps each divided by its own maximum, then
    averaged (multi-layer, SPIE 2022). ``normalize`` then divides by the overall maximum."""
    combined = maps[0] if len(maps) == 1 else torch.stack([normalize_by_max(m) for m in maps]).mean(0)
    return normalize_by_max(combined) if normalize else combined
