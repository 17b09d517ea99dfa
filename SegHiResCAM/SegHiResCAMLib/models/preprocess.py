"""Bring a volume onto the grid and intensity range a model expects, and bring maps back.

Contract used by the pipeline (worker, command line, Slicer logic):

    prepared = prepare_input(volume, card)
    prepared.image                       # (C, *spatial) float32 on the model's grid
    prepared.roi_to_model(mask_kji)      # ROI in the volume's grid -> model grid
    prepared.heatmap_to_volume(heat)     # map on the model grid -> volume's (K, J, I) grid
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..errors import InputError
from ..volume import Volume
from .card import ModelCard


@dataclass(frozen=True)
class PreparedInput:
    image: np.ndarray
    roi_to_model: Callable[[np.ndarray], np.ndarray]
    heatmap_to_volume: Callable[[np.ndarray], np.ndarray]


def normalize_intensity(image: np.ndarray, intensity: dict) -> np.ndarray:
    """Apply the card's intensity scheme channel by channel; returns float32."""
    scheme = intensity.get("scheme", "none")
    out = image.astype(np.float32, copy=True)
    for channel in out:
        if scheme == "zscore":
            channel -= channel.mean()
            channel /= max(float(channel.std()), 1e-8)
        elif scheme == "minmax":
            low, high = float(channel.min()), float(channel.max())
            channel -= low
            channel /= max(high - low, 1e-8)
        elif scheme == "ct-window":
            low, high = intensity["window"]
            np.clip(channel, low, high, out=channel)
            channel -= low
            channel /= float(high - low)
        elif scheme == "percentile":
            low, high = np.percentile(channel, [intensity.get("lower", 0.5), intensity.get("upper", 99.5)])
            np.clip(channel, low, high, out=channel)
            channel -= low
            channel /= max(float(high - low), 1e-8)
    return out


def prepare_input(volume: Volume, card: ModelCard) -> PreparedInput:
    """Intensity normalisation on the volume's own grid (resampling: see card.spacing)."""
    image = volume.array if volume.array.ndim == 4 else volume.array[None]
    if image.shape[0] != card.in_channels:
        raise InputError(
            f"the model expects {card.in_channels} image channel(s) but the volume has {image.shape[0]}"
        )
    identity = lambda array: array  # noqa: E731
    return PreparedInput(normalize_intensity(image, card.intensity), identity, identity)
