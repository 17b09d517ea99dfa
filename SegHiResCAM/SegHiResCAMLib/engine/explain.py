"""Public entry point of the CAM engine (being written: signature is final)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Explanation:
    """What one explanation produced.

    Attributes:
        maps: method name -> float32 map of the image's spatial shape.
        device: the device that ran ("cpu", "cuda:0").
        roi_voxels: voxels in the ROI that defined the target.
        seconds: wall time of the whole call.
        warnings: messages for the user (empty ROI, CPU fallback, ...).
    """

    maps: dict[str, np.ndarray]
    device: str
    roi_voxels: int
    seconds: float
    warnings: tuple[str, ...] = ()

    @property
    def heatmap(self) -> np.ndarray:
        """The map of the first method asked for."""
        return next(iter(self.maps.values()))


ProgressCallback = Callable[[float, str], None]


def explain_detailed(model, image, *, layer, target_class, roi=None, methods: Sequence[str] = ("seg-hires-grad-cam",),
                     target="logits", threshold=0.5, spatial_dims=None, slice_axis=0, normalize=True,
                     device="auto", progress: ProgressCallback | None = None) -> Explanation:
    raise NotImplementedError


def explain(model, image, *, layer, target_class, roi=None, method="seg-hires-grad-cam", target="logits",
            threshold=0.5, spatial_dims=None, slice_axis=0, normalize=True, device="auto") -> np.ndarray:
    raise NotImplementedError
