"""How a patch-trained model is run over a larger image: the sliding-window choice.

Torch- and numpy-free, so the panel, the settings object and the worker's JSON can carry it.
The tiling itself (tile starts, Gaussian weights) is in ``engine.tiling``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import InputError


@dataclass(frozen=True)
class SlidingWindow:
    """Overlapping patches fused by weighted averaging, as nnU-Net v2's predictor runs a model.

    Attributes:
        patch_size: the model's input size per spatial axis of the model (2 or 3 entries), in
            the model grid's array order (as nnU-Net's plans and MONAI's ``roi_size`` give it); one
            entry means that size along every axis of the model (:meth:`for_dims` expands it once
            the model is known: the command line's ``--patch-size 96``, the panel's patch size).
        step: the tile step as a fraction of the patch (nnU-Net's ``tile_step_size``; MONAI's
            ``overlap`` is ``1 - step``); 0 < step <= 1.
        gaussian: weight each window's outputs by nnU-Net's Gaussian importance map (sigma =
            patch / 8); False weights every voxel of every window equally (MONAI's "constant").
        mirror_axes: test-time mirroring (nnU-Net's ``allowed_mirroring_axes``): the model's
            outputs on every combination of flips along these axes of the patch are averaged.
    """

    patch_size: tuple[int, ...]
    step: float = 0.5
    gaussian: bool = True
    mirror_axes: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        try:
            patch = tuple(int(s) for s in self.patch_size)
            exact = all(float(s) == int(s) for s in self.patch_size)
        except (TypeError, ValueError):
            patch, exact = (), False
        if not exact or len(patch) not in (1, 2, 3) or min(patch, default=0) < 1:
            raise InputError(
                f"the patch size {self.patch_size!r} is not usable; give 2 or 3 positive whole numbers, "
                "e.g. (128, 128, 128) for a 3D model or (512, 512) for a 2D one (or one number for every axis)"
            )
        try:
            step = float(self.step)
        except (TypeError, ValueError):
            step = float("nan")
        if not 0.0 < step <= 1.0:  # NaN fails too
            raise InputError(f"the tile step {self.step!r} must lie in (0, 1]; nnU-Net uses 0.5 (half-patch overlap)")
        try:
            axes = tuple(int(a) for a in self.mirror_axes)
        except (TypeError, ValueError):
            axes = (-1,)
        dims = 3 if len(patch) == 1 else len(patch)  # a cube's axes are checked again by for_dims
        if len(set(axes)) != len(axes) or any(not 0 <= a < dims for a in axes):
            raise InputError(
                f"the mirror axes {self.mirror_axes!r} must be distinct axes of the patch, "
                f"between 0 and {dims - 1}"
            )
        object.__setattr__(self, "patch_size", patch)
        object.__setattr__(self, "step", step)
        object.__setattr__(self, "gaussian", bool(self.gaussian))
        object.__setattr__(self, "mirror_axes", axes)

    @property
    def spatial_dims(self) -> int:
        return len(self.patch_size)

    def for_dims(self, dims: int) -> SlidingWindow:
        """This window for a model with ``dims`` spatial axes: one size expanded to every axis.

        Raises:
            InputError: the patch has another number of axes than the model, or a mirror axis
                the model does not have.
        """
        if len(self.patch_size) == 1:
            return SlidingWindow(self.patch_size * dims, self.step, self.gaussian, self.mirror_axes)
        if len(self.patch_size) != dims:
            raise InputError(
                f"the patch size {'x'.join(map(str, self.patch_size))} has {len(self.patch_size)} axes but the model "
                f"is {dims}D; give {dims} sizes (or one number for every axis)"
            )
        return self

    def describe(self) -> str:
        """E.g. "96x96x96" (with the step and mirroring when they are not nnU-Net's defaults)."""
        text = "x".join(map(str, self.patch_size))
        if self.step != 0.5:
            text += f", step {self.step:g}"
        if self.mirror_axes:
            text += f", mirrored along axes {', '.join(map(str, self.mirror_axes))}"
        return text

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able values (lists for tuples)."""
        return {"patch_size": list(self.patch_size), "step": self.step, "gaussian": self.gaussian,
                "mirror_axes": list(self.mirror_axes)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SlidingWindow:
        """The inverse of :meth:`to_dict`; unknown keys are refused by name."""
        if not isinstance(data, dict):
            raise InputError(f"a sliding window is described by a mapping, got {type(data).__name__}")
        known = {"patch_size", "step", "gaussian", "mirror_axes"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InputError(f"sliding window: unknown keys {unknown}; known keys are {sorted(known)}")
        if "patch_size" not in data:
            raise InputError("sliding window: 'patch_size' is missing")
        return cls(**data)


def window_for_card(card) -> SlidingWindow | None:
    """How the model's own inference tiles it (``card`` a ``models.card.ModelCard``; not imported, since
    the card imports the settings, which import this module): the card's patch size with the step and weighting it
    names (``extra["sliding_window"]``, from a MONAI bundle's inferer), else nnU-Net's defaults."""
    if card.patch_size is None:
        return None
    options = card.extra.get("sliding_window", {}) if isinstance(card.extra, dict) else {}
    return SlidingWindow(tuple(card.patch_size), **{k: v for k, v in options.items() if k in ("step", "gaussian")})
