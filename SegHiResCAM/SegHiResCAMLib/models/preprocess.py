"""Bring a volume onto the grid and intensity range a model expects, and bring maps back.

Contract used by the pipeline (worker, command line, Slicer logic):

    prepared = prepare_input(volume, card)
    prepared.image                       # (C, *spatial) float32 on the model's grid
    prepared.roi_to_model(mask_kji)      # ROI in the volume's grid -> model grid
    prepared.heatmap_to_volume(heat)     # map on the model grid -> volume's (K, J, I) grid
    prepared.model_ijk_to_ras            # geometry of the model grid (its array read as K, J, I)

The steps, in order (each one axis-aligned, so each has an exact inverse):
1. reorient (``card.orientation``): axis swaps and flips only, no interpolation;
2. crop to the non-zero bounding box (``card.crop_nonzero``, nnU-Net);
3. intensity normalisation (``card.intensity``), on the cropped image as nnU-Net does (with
   ``"mask": "nonzero-filled"``, ``nonzero_only`` channels use nnU-Net's mask: the non-zero voxels
   of any channel with their holes filled);
4. resample to ``card.spacing``: linear, voxel centres aligned (as ``F.interpolate`` with
   ``align_corners=False``), new size ``round(old / new spacing * size)``; cards with
   ``resampling={"scheme": "nnunet", ...}`` resample as nnU-Net does (``models.nnunet_resampling``:
   the plans' spline order for the image and for the map back, the thick axis on its own);
5. transpose the axes (``card.transpose``);
6. zero-pad the end of each axis to a multiple of ``card.divisible_by``.
``heatmap_to_volume`` undoes 6, 5, 4, 2, 1: outside the crop the map is 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InputError, ModelError
from ..volume import Volume
from .card import ModelCard

# RAS axis (0 = R-L, 1 = A-P, 2 = S-I) and sign of each orientation letter
_LETTERS = {"R": (0, 1.0), "L": (0, -1.0), "A": (1, 1.0), "P": (1, -1.0), "S": (2, 1.0), "I": (2, -1.0)}


@dataclass(frozen=True)
class PreparedInput:
    image: np.ndarray
    roi_to_model: Callable[[np.ndarray], np.ndarray]
    heatmap_to_volume: Callable[[np.ndarray], np.ndarray]
    model_ijk_to_ras: np.ndarray = field(default_factory=lambda: np.eye(4))


# ----------------------------------------------------------------------------- intensity


def _normalize_channel(channel: np.ndarray, intensity: dict, mask: np.ndarray | None = None) -> None:
    """Normalise one float32 channel in place (``mask``: the voxels a non-zero-only z-score uses)."""
    scheme = intensity.get("scheme", "none")
    if scheme == "zscore":
        if intensity.get("nonzero_only"):
            inside = channel != 0 if mask is None else mask
            values = channel[inside]
            if values.size:
                channel[inside] = (values - values.mean()) / max(float(values.std()), 1e-8)
        else:
            channel -= channel.mean()
            channel /= max(float(channel.std()), 1e-8)
    elif scheme == "minmax":
        low, high = float(channel.min()), float(channel.max())
        channel -= low
        channel /= max(high - low, 1e-8)
    elif scheme == "ct-window":
        low, high = (float(v) for v in intensity["window"])
        out_low, out_high = (float(v) for v in intensity.get("range", (0.0, 1.0)))
        np.clip(channel, low, high, out=channel)
        channel -= low
        channel *= (out_high - out_low) / max(high - low, 1e-8)
        channel += out_low
    elif scheme == "percentile":
        low, high = np.percentile(channel, [intensity.get("lower", 0.5), intensity.get("upper", 99.5)])
        np.clip(channel, low, high, out=channel)
        channel -= low
        channel /= max(float(high - low), 1e-8)
    elif scheme == "clip-zscore":
        low, high = (float(v) for v in intensity["window"])
        np.clip(channel, low, high, out=channel)
        channel -= float(intensity["mean"])
        channel /= max(float(intensity["std"]), 1e-8)
    elif scheme != "none":
        raise ModelError(f"intensity scheme {scheme!r} is unknown")


def normalize_intensity(image: np.ndarray, intensity: dict) -> np.ndarray:
    """Apply the card's intensity scheme channel by channel; returns float32."""
    out = image.astype(np.float32, copy=True)
    if intensity.get("scheme", "none") == "per-channel":
        schemes = intensity.get("channels", [])
        if len(schemes) != out.shape[0]:
            raise ModelError(
                f"the model card gives {len(schemes)} per-channel intensity schemes for {out.shape[0]} channel(s)"
            )
        mask = nonzero_mask(out) if intensity.get("mask") == "nonzero-filled" else None
        for channel, scheme in zip(out, schemes):
            _normalize_channel(channel, scheme, mask)
    else:
        for channel in out:
            _normalize_channel(channel, intensity)
    return out


def nonzero_mask(image: np.ndarray) -> np.ndarray:
    """nnU-Net's mask for normalisation: voxels non-zero in any channel, holes filled (3D)."""
    from .optional import require

    ndimage = require("scipy.ndimage", "nnunet")
    return ndimage.binary_fill_holes(np.any(image != 0, axis=0))


# ----------------------------------------------------------------------------- geometry

# An index map: model array index m (a0, a1, a2) -> volume array index v (K, J, I),
# v[axis[a]] = scale[a] * m[a] + offset[a]. Every step below is of this form.


def orientation_axes(ijk_to_ras: np.ndarray, code: str) -> tuple[list[int], list[bool]]:
    """Array axes (of K, J, I) and flips that make I, J, K point to ``code`` ("RAS", "LPS", ...).

    Returns:
        ``(axes, flips)``: new array axis n is old axis ``axes[n]``, reversed when ``flips[n]``.
    """
    direction = ijk_to_ras[:3, :3] / np.linalg.norm(ijk_to_ras[:3, :3], axis=0)
    axes_ijk, flips_ijk = [], []
    for letter in code:  # letter n is where the new axis n of (I, J, K) must point
        ras_axis, sign = _LETTERS[letter]
        column = int(np.argmax(np.abs(direction[ras_axis])))
        axes_ijk.append(column)
        flips_ijk.append(bool(direction[ras_axis, column] * sign < 0))
    if sorted(axes_ijk) != [0, 1, 2]:
        raise InputError(
            "the volume's axes are too oblique to reorient to the model's orientation "
            f"{code!r} by axis swaps; resample the volume first"
        )
    # I, J, K order -> array (K, J, I) order
    axes = [2 - axes_ijk[n] for n in (2, 1, 0)]
    flips = [flips_ijk[n] for n in (2, 1, 0)]
    return axes, flips


def _resample(array: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Linear resampling of ``(C, *spatial)`` to ``shape``, voxel centres aligned."""
    if tuple(array.shape[1:]) == tuple(shape):
        return array
    tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None]
    mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[len(shape)]
    out = F.interpolate(tensor, size=tuple(int(s) for s in shape), mode=mode, align_corners=False)
    return out[0].numpy()


@dataclass(frozen=True)
class _Plan:
    """The geometric steps for one volume and card (see the module docstring)."""

    volume_shape: tuple[int, int, int]
    axes: tuple[int, int, int]
    flips: tuple[bool, bool, bool]
    crop: tuple[slice, slice, slice]
    resampled: tuple[int, int, int]
    transpose: tuple[int, int, int]
    padded: tuple[int, int, int]
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)  # of the cropped (oriented) array axes
    target_spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)  # of the resampled array axes
    resampling: dict | None = None  # the card's; None = linear

    def forward(self, array: np.ndarray, pad_value: float = 0.0) -> np.ndarray:
        """``(C, K, J, I)`` volume array -> ``(C, *model)`` model array. Intensity is applied by the caller."""
        return self.to_model(self.to_cropped(array), pad_value)

    def to_cropped(self, array: np.ndarray) -> np.ndarray:
        out = array.transpose(0, *(a + 1 for a in self.axes))
        flip = [n + 1 for n in range(3) if self.flips[n]]
        if flip:
            out = np.flip(out, axis=flip)
        return np.ascontiguousarray(out[(slice(None), *self.crop)])

    def to_model(self, cropped: np.ndarray, pad_value: float = 0.0, *, linear: bool = False) -> np.ndarray:
        out = self._resampled(cropped.astype(np.float32, copy=False), self.resampled, "image", linear)
        out = out.transpose(0, *(a + 1 for a in self.transpose))
        pad = [(0, 0)] + [(0, p - s) for p, s in zip(self.padded, out.shape[1:])]
        return np.ascontiguousarray(np.pad(out, pad, constant_values=pad_value), dtype=np.float32)

    def backward(self, heat: np.ndarray) -> np.ndarray:
        """``(*model)`` map -> ``(K, J, I)`` map on the volume's grid (0 outside the crop)."""
        heat = np.asarray(heat, dtype=np.float32)
        if heat.shape != self.padded:
            raise InputError(f"the map has shape {heat.shape}, but the model grid is {self.padded}")
        shape_t = tuple(self.resampled[a] for a in self.transpose)
        out = heat[tuple(slice(0, s) for s in shape_t)]
        out = out.transpose(np.argsort(self.transpose))
        cropped_shape = tuple(s.stop - s.start for s in self.crop)
        out = self._resampled(out[None], cropped_shape, "map", False)[0]
        oriented_shape = tuple(self.volume_shape[a] for a in self.axes)
        full = np.zeros(oriented_shape, dtype=np.float32)
        full[self.crop] = out
        flip = [n for n in range(3) if self.flips[n]]
        if flip:
            full = np.flip(full, axis=flip)
        return np.ascontiguousarray(full.transpose(np.argsort(self.axes)))

    def _resampled(self, array: np.ndarray, shape: tuple[int, ...], which: str, linear: bool) -> np.ndarray:
        """Linear, or nnU-Net's recipe for the image (cropped -> model) or the map (model -> cropped)."""
        if linear or self.resampling is None or tuple(array.shape[1:]) == tuple(shape):
            return _resample(array, shape)
        from .nnunet_resampling import resample

        forward = which == "image"
        current, new = (self.spacing, self.target_spacing) if forward else (self.target_spacing, self.spacing)
        return resample(array, shape, current, new, self.resampling[which],
                        float(self.resampling.get("anisotropy_threshold", 3.0)))

    def model_index_to_volume_index(self) -> np.ndarray:
        """4x4 matrix from model array index (a0, a1, a2, 1) to volume array index (k, j, i, 1)."""
        # padding and transpose: model index m -> resampled index r
        transpose = np.zeros((4, 4))
        transpose[3, 3] = 1.0
        for a, source in enumerate(self.transpose):
            transpose[source, a] = 1.0
        cropped = [s.stop - s.start for s in self.crop]
        resample = np.eye(4)
        for n in range(3):
            factor = cropped[n] / self.resampled[n]
            resample[n, n] = factor
            resample[n, 3] = 0.5 * factor - 0.5
        crop = np.eye(4)
        crop[:3, 3] = [s.start for s in self.crop]
        oriented_shape = [self.volume_shape[a] for a in self.axes]
        orient = np.zeros((4, 4))
        orient[3, 3] = 1.0
        for n, source in enumerate(self.axes):
            orient[source, n] = -1.0 if self.flips[n] else 1.0
            orient[source, 3] = oriented_shape[n] - 1.0 if self.flips[n] else 0.0
        return orient @ crop @ resample @ transpose


_REVERSE = np.array([[0, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]], dtype=float)


def _nonzero_box(image: np.ndarray) -> tuple[slice, slice, slice]:
    nonzero = np.any(image != 0, axis=0)
    if not nonzero.any():
        return tuple(slice(0, s) for s in image.shape[1:])  # type: ignore[return-value]
    box = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        hits = np.flatnonzero(nonzero.any(axis=other))
        box.append(slice(int(hits[0]), int(hits[-1]) + 1))
    return tuple(box)  # type: ignore[return-value]


def plan_for(volume: Volume, card: ModelCard, image: np.ndarray | None = None) -> _Plan:
    """The geometric steps that take ``volume`` onto ``card``'s grid."""
    shape = tuple(int(s) for s in volume.spatial_shape)
    ijk_to_ras = volume.ijk_to_ras
    if card.orientation:
        axes, flips = orientation_axes(ijk_to_ras, card.orientation)
    else:
        axes, flips = [0, 1, 2], [False, False, False]
    oriented = tuple(shape[a] for a in axes)
    if card.crop_nonzero and image is not None:
        oriented_image = image.transpose(0, *(a + 1 for a in axes))
        crop = _nonzero_box(np.flip(oriented_image, axis=[n + 1 for n in range(3) if flips[n]]))
    else:
        crop = tuple(slice(0, s) for s in oriented)
    cropped = [s.stop - s.start for s in crop]
    # spacing of the oriented array axes (K, J, I order after reorientation)
    spacing_ijk = np.linalg.norm(ijk_to_ras[:3, :3], axis=0)
    spacing_kji = [spacing_ijk[2 - a] for a in axes]
    resampled = list(cropped)
    target_spacing = [float(s) for s in spacing_kji]
    if card.spacing is not None:
        target_kji = list(reversed(card.spacing))
        for n in range(3):
            if target_kji[n] is not None and target_kji[n] > 0:
                # nnU-Net's compute_new_shape, in its order of operations
                resampled[n] = max(int(round(spacing_kji[n] / target_kji[n] * cropped[n])), 1)
                target_spacing[n] = float(target_kji[n])
    transpose = tuple(card.transpose) if card.transpose else (0, 1, 2)
    model_shape = [resampled[a] for a in transpose]
    step = int(card.divisible_by)
    padded = []
    for a, size in enumerate(model_shape):
        is_slice_axis = card.spatial_dims == 2 and a == card.slice_axis
        padded.append(size if is_slice_axis else -(-size // step) * step)
    return _Plan(shape, tuple(axes), tuple(flips), crop, tuple(resampled), transpose, tuple(padded),  # type: ignore[arg-type]
                 tuple(float(s) for s in spacing_kji), tuple(target_spacing), card.resampling)  # type: ignore[arg-type]


def prepare_input(volume: Volume, card: ModelCard, *, pad_to_divisible: bool = True) -> PreparedInput:
    """Put ``volume`` on the model's grid and intensity scale (see the module docstring).

    ``pad_to_divisible=False`` skips step 6: sliding windows of the card's patch size need no
    divisibility, and nnU-Net tiles the unpadded image.

    Raises:
        InputError: the channel count differs from the card, or the volume cannot be reoriented.
    """
    image = volume.array if volume.array.ndim == 4 else volume.array[None]
    if image.shape[0] != card.in_channels:
        raise InputError(
            f"the model expects {card.in_channels} image channel(s) but the volume has {image.shape[0]}"
        )
    plan = plan_for(volume, card if pad_to_divisible else replace(card, divisible_by=1), image)
    cropped = normalize_intensity(plan.to_cropped(image), card.intensity)
    model_image = plan.to_model(cropped)

    def roi_to_model(mask: np.ndarray) -> np.ndarray:
        mask = np.asarray(mask)
        if mask.shape != tuple(volume.spatial_shape):
            raise InputError(f"the ROI has shape {mask.shape} but the image has {tuple(volume.spatial_shape)}")
        # regions resample linearly (a weight map stays in [0, 1]; masks are cut at 0.5)
        moved = plan.to_model(plan.to_cropped(mask[None].astype(np.float32)), linear=True)[0]
        return moved >= 0.5 if mask.dtype == bool else moved

    model_ijk_to_ras = volume.ijk_to_ras @ _REVERSE @ plan.model_index_to_volume_index() @ _REVERSE
    return PreparedInput(model_image, roi_to_model, plan.backward, model_ijk_to_ras)
