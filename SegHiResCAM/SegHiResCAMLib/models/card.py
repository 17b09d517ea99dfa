"""The model card: what a model expects and what it outputs, stored as JSON beside it.

``explain`` on a volume applies the card (spacing, orientation, intensity) so the
heatmap comes back in the volume's own grid.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ..errors import InputError, ModelError
from ..settings import ExplainSettings

INTENSITY_SCHEMES = ("none", "zscore", "ct-window", "minmax", "percentile", "clip-zscore", "per-channel")


@dataclass(frozen=True)
class ModelCard:
    """Facts about a segmentation model that the explanation needs.

    Attributes:
        name: display name.
        spatial_dims: 2 (applied slice by slice) or 3.
        in_channels: input channels.
        class_names: one name per output channel (index = class).
        spacing: voxel size in mm the model was trained at, along I, J, K (after reorientation,
            before ``transpose``); None = use as is; a None entry keeps that axis as is.
        orientation: where I, J, K should point ("RAS", "LPS", ...: Slicer/ITK convention, the
            volume is reoriented by axis swaps and flips, no interpolation); None = use as is.
        intensity: normalisation, e.g. {"scheme": "zscore"} (add "nonzero_only": true to use and
            change only the voxels inside the non-zero region), {"scheme": "ct-window",
            "window": [-1000, 1000]} (clip, then map to "range", [0, 1] by default),
            {"scheme": "minmax"}, {"scheme": "percentile", "lower": 0.5, "upper": 99.5},
            {"scheme": "clip-zscore", "window": [lo, hi], "mean": m, "std": s} (nnU-Net's CT
            scheme), {"scheme": "per-channel", "channels": [one of the above per channel]};
            {"scheme": "none"} by default.
        layers: layer names worth explaining, first = default.
        outputs: "logits" or "probabilities".
        multilabel: the classes are independent (one sigmoid per output channel, e.g. nnU-Net
            region-based models): a class's predicted region is sigmoid > 0.5, not argmax.
        slice_axis: for 2D models, the axis of the model's input grid to slice along (the
            volume's K, J, I axes unless ``orientation`` or ``transpose`` change them).
        divisible_by: the input's spatial sizes must be multiples of this (zero padding is added
            at the end of each axis, except the slice axis of a 2D model).
        transpose: order of the volume's array axes (0 = K, 1 = J, 2 = I) in the model's input,
            numpy-style: (2, 1, 0) for MONAI networks (which see I, J, K), nnU-Net's
            ``transpose_forward``; None = (0, 1, 2).
        crop_nonzero: crop the volume to the bounding box of its non-zero voxels first (nnU-Net).
        train_mode_modules: submodules that run in training mode when the model is loaded, as their
            owner runs them (HD-BET keeps its instance norms in training mode so they use each image's
            own statistics): submodule paths, globs over paths ("*.norm*") or class names
            ("InstanceNorm3d"); the rest of the network runs in evaluation mode.
        output_key: for a network whose forward returns a tuple, list or dict (deep supervision,
            UNet++), the entry that is the segmentation (an index, -1 = the last, or a key); None = the
            one entry at the input's full resolution (several such entries are refused).
        patch_size: the input size the model was trained on and runs by sliding windows, one entry
            per axis of the model's input grid (nnU-Net plans' ``patch_size``, a MONAI bundle's
            inferer ``roi_size``); None = the model runs on the whole volume.
        resampling: how ``prepare_input`` resamples, when not linear: {"scheme": "nnunet",
            "image": {"order": 3, "order_z": 0, "force_separate_z": None}, "map": {"order": 1,
            "order_z": 0, "force_separate_z": None}, "anisotropy_threshold": 3.0} follows
            nnU-Net's plans (spline of the given order; for anisotropic spacing the thick axis
            separately); None = linear.
        network: how to build the network: {"name": ..., "args": {...}} (see models.loading).
        extra: anything else a loader needs (kept verbatim).
    """

    name: str = "model"
    spatial_dims: int = 3
    in_channels: int = 1
    class_names: tuple[str, ...] = ()
    spacing: tuple[float, float, float] | None = None
    orientation: str | None = None
    intensity: dict[str, Any] = field(default_factory=lambda: {"scheme": "none"})
    layers: tuple[str, ...] = ()
    outputs: str = "logits"
    multilabel: bool = False
    slice_axis: int = 0
    divisible_by: int = 1
    transpose: tuple[int, int, int] | None = None
    crop_nonzero: bool = False
    train_mode_modules: tuple[str, ...] = ()
    output_key: int | str | None = None
    patch_size: tuple[int, ...] | None = None
    resampling: dict[str, Any] | None = None
    network: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.spatial_dims not in (2, 3):
            raise ModelError(f"model card: spatial_dims must be 2 or 3, got {self.spatial_dims!r}")
        if self.outputs not in ("logits", "probabilities"):
            raise ModelError(f"model card: outputs must be 'logits' or 'probabilities', got {self.outputs!r}")
        scheme = self.intensity.get("scheme", "none")
        if scheme not in INTENSITY_SCHEMES:
            raise ModelError(
                f"model card: intensity scheme {scheme!r} is unknown; use one of {', '.join(INTENSITY_SCHEMES)}"
            )
        object.__setattr__(self, "class_names", tuple(self.class_names))
        object.__setattr__(self, "layers", tuple(self.layers))
        if isinstance(self.train_mode_modules, str) or not all(isinstance(m, str) for m in self.train_mode_modules):
            raise ModelError("model card: train_mode_modules must be a list of submodule names, globs or class "
                             f"names, got {self.train_mode_modules!r}")
        object.__setattr__(self, "train_mode_modules", tuple(self.train_mode_modules))
        if self.output_key is not None and (isinstance(self.output_key, bool)
                                            or not isinstance(self.output_key, (int, str))):
            raise ModelError(f"model card: output_key must be an index or a key of the model's outputs, "
                             f"got {self.output_key!r}")
        if self.spacing is not None:
            if len(self.spacing) != 3:
                raise ModelError(f"model card: spacing needs 3 entries (I, J, K), got {list(self.spacing)}")
            object.__setattr__(self, "spacing", tuple(None if s is None else float(s) for s in self.spacing))
        if self.transpose is not None:
            if sorted(self.transpose) != [0, 1, 2]:
                raise ModelError(f"model card: transpose must be a permutation of 0, 1, 2, got {list(self.transpose)}")
            object.__setattr__(self, "transpose", tuple(int(a) for a in self.transpose))
        if self.patch_size is not None:
            patch = tuple(self.patch_size)
            if len(patch) != self.spatial_dims or not all(isinstance(v, int) and v > 0 for v in patch):
                raise ModelError(
                    f"model card: patch_size needs {self.spatial_dims} positive whole numbers (one per axis of the "
                    f"model's input), got {list(patch)}"
                )
            object.__setattr__(self, "patch_size", patch)
        if self.resampling is not None and self.resampling.get("scheme") != "nnunet":
            raise ModelError(f"model card: resampling scheme {self.resampling.get('scheme')!r} is unknown; use 'nnunet'")
        if int(self.divisible_by) < 1:
            raise ModelError(f"model card: divisible_by must be a positive number, got {self.divisible_by!r}")
        if self.orientation is not None:
            code = self.orientation.upper()
            axes = sorted({"R": 0, "L": 0, "A": 1, "P": 1, "S": 2, "I": 2}.get(c, 9) for c in code)
            if len(code) != 3 or axes != [0, 1, 2]:
                raise ModelError(f"model card: orientation must be a code like 'RAS' or 'LPS', got {self.orientation!r}")
            object.__setattr__(self, "orientation", code)

    def example_shape(self, size: int) -> tuple[int, ...]:
        """A model input ``(1, channels, *spatial)`` of at least ``size`` voxels per axis that the
        model accepts (rounded up to ``divisible_by``), for probing layer shapes."""
        step = max(int(self.divisible_by), 1)
        edge = -(-max(int(size), 1) // step) * step
        return (1, self.in_channels, *([edge] * self.spatial_dims))

    @property
    def default_layer(self) -> str | None:
        return self.layers[0] if self.layers else None

    def settings_for(self, settings: ExplainSettings) -> ExplainSettings:
        """``settings`` with what they leave to the model taken from this card: the layers (none
        given: the default layer, if any), the class index (a class name looked up), and the slice
        axis, multilabel, probabilities and output_key where they are None.

        Raises:
            InputError: an unknown class name, or an index outside the card's classes.
        """
        return dataclasses.replace(
            settings,
            layers=settings.layers or ((self.default_layer,) if self.default_layer else ()),
            target_class=resolve_class(settings.target_class, self.class_names),
            slice_axis=self.slice_axis if settings.slice_axis is None else settings.slice_axis,
            multilabel=self.multilabel if settings.multilabel is None else settings.multilabel,
            probabilities=(self.outputs == "probabilities") if settings.probabilities is None else settings.probabilities,
            output_key=self.output_key if settings.output_key is None else settings.output_key,
        )

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["class_names"] = list(self.class_names)
        data["layers"] = list(self.layers)
        data["train_mode_modules"] = list(self.train_mode_modules)
        for key in ("spacing", "transpose", "patch_size"):
            if isinstance(data[key], tuple):
                data[key] = list(data[key])
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelCard":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ModelError(f"model card: unknown keys {unknown}; known keys are {sorted(known)}")
        return cls(**data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> "ModelCard":
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as error:
            raise ModelError(f"cannot read the model card {path}: {error}") from error
        return cls.from_dict(data)


def resolve_class(target_class: int | str, class_names: Sequence[str]) -> int:
    """The class index for an index or a class name, checked against the model card.

    Raises:
        InputError: unknown name, or an index outside the model's classes.
    """
    names = list(class_names)
    if isinstance(target_class, str) and not target_class.strip().lstrip("-").isdigit():
        lowered = {name.lower(): index for index, name in enumerate(names)}
        if target_class.lower() in lowered:
            return lowered[target_class.lower()]
        listed = ", ".join(f"{i} = {n}" for i, n in enumerate(names)) or "the model card names none"
        raise InputError(f"the model has no class named {target_class!r}; classes: {listed}")
    try:
        index = int(target_class)
    except (TypeError, ValueError) as error:
        raise InputError(f"the class must be an index or a class name, got {target_class!r}") from error
    if index < 0 or (names and index >= len(names)):
        listed = ", ".join(f"{i} = {n}" for i, n in enumerate(names))
        raise InputError(f"class {index} does not exist; the model has {len(names)} classes: {listed}")
    return index


def find_card(path: Path) -> Path | None:
    """The model card beside a weights file: ``<stem>.json``, else ``model.json``; in a folder, ``model.json``."""
    candidates = (path / "model.json",) if path.is_dir() else (path.with_suffix(".json"), path.parent / "model.json")
    for candidate in candidates:
        if candidate.is_file() and candidate != path:
            return candidate
    return None
