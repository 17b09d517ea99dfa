"""The user's choices, declared once: what to explain (:class:`ExplainSettings`) and how to show it
(:class:`DisplaySettings`).

Frozen dataclasses with no torch and no numpy, so the panel, the command line, the worker protocol and
the engine pass one object from door to engine instead of copying fields. Every value is checked
here, in ``__post_init__``, before any work starts; a bad value raises
:class:`~SegHiResCAMLib.errors.InputError` naming the field, the value and what is allowed.
``to_dict`` / ``from_dict`` make the JSON the worker protocol carries; unknown keys are refused.

Three thresholds, three names: ``ExplainSettings.target_threshold`` (the probability t of the
probability-threshold target), ``DisplaySettings.lower_threshold`` (heatmap values below it are
transparent), and the keep threshold of ``engine.validation.masking_scores`` (voxels whose map
exceeds it are kept when the image is masked).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, TypeVar

from . import catalog
from .errors import InputError
from .windows import SlidingWindow

#: ``ExplainSettings.sliding_window``'s default: windows when the model is run by windows or the
#: whole image does not fit the memory, otherwise one pass.
AUTO_WINDOW = "auto"

_DEVICE = re.compile(r"(auto|cpu|cuda)(:\d+)?")
S = TypeVar("S")


@dataclass(frozen=True)
class RegionPoint:
    """The point of the region kind "point": what a radiologist points at (a Markups point in Slicer).

    The region is the model's predicted region of the target class connected to the voxel that holds
    the point (6-connected: voxels sharing a face), or, where the model predicts no voxel of the class
    there, the voxels whose centres lie within ``radius_mm`` of the point.

    Attributes:
        ras: (R, A, S) in millimetres, in the image's own frame (the frame of its IJK-to-RAS matrix,
            before any parent transform; ``mrml.points.markup_point_ras`` brings a Slicer markup into it).
        radius_mm: the sphere's radius in millimetres, used only where nothing is predicted at the point.
    """

    ras: tuple[float, float, float]
    radius_mm: float = 10.0

    def __post_init__(self) -> None:
        try:  # a list, a tuple or a numpy array of three numbers
            values = () if isinstance(self.ras, (str, bytes)) else tuple(self.ras)
        except TypeError:
            values = ()
        if len(values) != 3 or not all(isinstance(value, numbers.Real) and not isinstance(value, bool)
                                       and math.isfinite(value) for value in values):
            raise InputError(f"the point must be three finite numbers (R, A, S) in millimetres, got {self.ras!r}")
        _set(self, "ras", tuple(float(value) for value in values))
        radius = self.radius_mm
        if isinstance(radius, bool) or not isinstance(radius, numbers.Real) or not 0.0 < radius < math.inf:
            raise InputError(f"the point's radius must be a positive number of millimetres, got {radius!r}")
        _set(self, "radius_mm", float(radius))

    def to_dict(self) -> dict[str, Any]:
        return _to_dict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RegionPoint:
        return _from_dict(cls, data, "point")


@dataclass(frozen=True)
class ExplainSettings:
    """What an explanation is asked to do.

    Attributes:
        target_class: the class c whose prediction is explained: an output channel index, or a
            class name from the model card (resolved when the model is known).
        layers: layer names; several give the mean of their normalised heatmaps; empty = the model
            card's default layer. A single name may be given as a string.
        methods: heatmap methods (``catalog.METHOD_CHOICES``), all computed in one run (the gradient
            methods from one backward pass); one heatmap each.
        target: the target kind (``catalog.TARGET_CHOICES``): "logits" or "probability-threshold".
        target_threshold: t of the probability-threshold target, strictly between 0 and 1.
        device: "auto" (the GPU if torch sees one), "cpu", "cuda" or "cuda:N".
        slice_axis: for 2D models, the axis of the model's input grid to slice along (the volume's
            0 = K, 1 = J, 2 = I unless the card reorients or transposes); None = the model card's.
        region: which voxels the target sums over (``catalog.REGION_CHOICES``): "mask" (a region
            is given), "prediction" (the model's own prediction of the class), "whole-image" or
            "point" (the predicted region connected to ``point``); None = "point" when a point is
            given, "mask" when a region is given, else "prediction".
        point: the :class:`RegionPoint` of the region kind "point" (a dict is read as one); None otherwise.
        multilabel: the classes are independent (one sigmoid per channel); None = the model card's.
        probabilities: the model outputs probabilities, not logits; None = the model card's.
        output_key: for a network whose forward returns a tuple, list or dict (deep supervision,
            UNet++), the entry that is the segmentation: an index (-1 = the last) or a key; None =
            the model card's, else the one entry at the input's full resolution.
        relu: keep only positive evidence (the methods' definition); False gives signed heatmaps.
        normalize: divide each heatmap by its maximum over the whole volume.
        batch_size: slices per batch for 2D models over volumes (windows per batch with sliding
            windows); None = sized to the free memory.
        sliding_window: how the model runs over the image: "auto" (the model's own tiling when its
            card has a patch size, or a static-shape program's shape; otherwise one pass when the
            memory estimate fits the device, else the largest window that fits), a
            :class:`~SegHiResCAMLib.windows.SlidingWindow` (a dict is read as one), or None (the
            whole image in one pass). A run that does not fit the memory is refused before the work.
    """

    target_class: int | str
    layers: tuple[str, ...] = ()
    methods: tuple[str, ...] = (catalog.DEFAULT_METHOD,)
    target: str = catalog.LOGITS
    target_threshold: float = 0.5
    device: str = "auto"
    slice_axis: int | None = None
    region: str | None = None
    point: RegionPoint | None = None
    multilabel: bool | None = None
    probabilities: bool | None = None
    output_key: int | str | None = None
    relu: bool = True
    normalize: bool = True
    batch_size: int | None = None
    sliding_window: SlidingWindow | str | None = AUTO_WINDOW

    def __post_init__(self) -> None:
        _set(self, "target_class", _class_choice(self.target_class))
        _set(self, "layers", _names("layers", self.layers, allow_empty=True))
        _set(self, "methods", _names("methods", self.methods, allow_empty=False))
        for name in self.methods:
            catalog.method(name)
        if len(set(self.methods)) != len(self.methods):
            raise InputError(f"methods {list(self.methods)} name a method twice; give each method once")
        catalog.find(catalog.TARGET_CHOICES, self.target, "target")
        _set(self, "target_threshold", _fraction("target_threshold", self.target_threshold, open_interval=True))
        if not isinstance(self.device, str) or not _DEVICE.fullmatch(self.device):
            raise InputError(f"device {self.device!r} is unknown; choose one of "
                             f"{', '.join(catalog.names(catalog.DEVICE_CHOICES))} (or cuda:N)")
        if self.slice_axis is not None:
            if _not_int(self.slice_axis) or self.slice_axis not in (0, 1, 2):
                raise InputError(f"slice_axis must be 0, 1 or 2 (the volume's K, J or I axis) or None (the model "
                                 f"card's), got {self.slice_axis!r}")
            _set(self, "slice_axis", int(self.slice_axis))
        if self.region is not None:
            catalog.find(catalog.REGION_CHOICES, self.region, "region")
        self._check_point()
        for name in ("multilabel", "probabilities"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), bool):
                raise InputError(f"{name} must be true, false or None (the model card's), got {getattr(self, name)!r}")
        if self.output_key is not None and not (isinstance(self.output_key, str) and self.output_key):
            if _not_int(self.output_key):
                raise InputError(f"output_key must be an index or a key of the model's outputs, or None (the model "
                                 f"card's), got {self.output_key!r}")
            _set(self, "output_key", int(self.output_key))  # numpy integers too
        for name in ("relu", "normalize"):
            if not isinstance(getattr(self, name), bool):
                raise InputError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.batch_size is not None:
            if _not_int(self.batch_size) or self.batch_size < 1:
                raise InputError(f"batch_size must be a positive number of slices or None (sized to the free "
                                 f"memory), got {self.batch_size!r}")
            _set(self, "batch_size", int(self.batch_size))
        self._check_window()
        self._check_methods_fit()

    def _check_window(self) -> None:
        """``sliding_window`` is "auto", None or a SlidingWindow (read from a dict)."""
        if isinstance(self.sliding_window, Mapping):
            _set(self, "sliding_window", SlidingWindow.from_dict(dict(self.sliding_window)))
        if not (self.sliding_window is None or self.sliding_window == AUTO_WINDOW
                or isinstance(self.sliding_window, SlidingWindow)):
            raise InputError(f"sliding_window must be 'auto', None (the whole image in one pass) or a SlidingWindow "
                             f"(a patch size), got {self.sliding_window!r}")
        if isinstance(self.sliding_window, SlidingWindow):
            whole = [catalog.method(name).label for name in self.methods if not catalog.method(name).gradient]
            if whole:  # its ablations run on the whole image (``engine.kernel_weighted``)
                raise InputError(f"{whole[0]} needs the whole image in one pass, not sliding windows; leave the "
                                 "windows on auto (or the whole volume), or choose another method")

    def _check_methods_fit(self) -> None:
        """Each method supports the target kind, and a signed map when ``relu`` is off."""
        for name in self.methods:
            info = catalog.method(name)
            if self.target not in info.targets:
                raise InputError(f"{info.label} explains the {' or '.join(info.targets)} target only, not "
                                 f"{self.target!r}; choose target {info.targets[0]!r} or another method")
            if not self.relu and not info.signed:
                raise InputError(f"{info.label} keeps positive evidence only, so it has no signed heatmap "
                                 "(relu=False); keep relu on or choose another method")

    def _check_point(self) -> None:
        """The point is a RegionPoint, and it is given exactly when the region kind is "point"."""
        if isinstance(self.point, Mapping):
            _set(self, "point", RegionPoint.from_dict(self.point))
        if self.point is not None and not isinstance(self.point, RegionPoint):
            raise InputError(f"point must be a RegionPoint (R, A, S and a radius) or None, got {self.point!r}")
        if self.region == "point" and self.point is None:
            raise InputError("the region kind 'point' needs a point: place a markup point (panel), give --point R A S "
                             "(command line) or point=RegionPoint((r, a, s)) (Python)")
        if self.point is not None and self.region not in (None, "point"):
            raise InputError(f"a point was given, but the region kind is {self.region!r}; leave the region kind unset "
                             "or choose 'point'")

    def region_kind(self, region_given: bool) -> str:
        """The region kind of a run: ``region``, or by default "point" when a point is given, "mask"
        when a region is given and "prediction" otherwise.

        Raises:
            InputError: ``region`` and what was given disagree (a "mask" without a region, or a
                region given with "prediction", "whole-image" or a point).
        """
        default = "point" if self.point is not None else ("mask" if region_given else "prediction")
        kind = self.region if self.region is not None else default
        if kind == "mask" and not region_given:
            raise InputError("the region kind 'mask' needs a region: a segment, a region file (--roi) or roi=")
        if kind != "mask" and region_given:
            label = catalog.find(catalog.REGION_CHOICES, kind, "region").label.lower()
            raise InputError(f"a region was given, but the region kind {kind!r} uses {label}; leave the region out, "
                             "or choose the region kind 'mask'")
        return kind

    @property
    def gradient_methods(self) -> tuple[str, ...]:
        """The methods computed from the target's gradient (one backward pass for all)."""
        return tuple(name for name in self.methods if catalog.method(name).gradient)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (lists for tuples) that :meth:`from_dict` turns back into equal settings."""
        return _to_dict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ExplainSettings:
        """Settings from :meth:`to_dict`'s output; unknown or missing keys are an InputError."""
        return _from_dict(cls, data, "explanation settings")


@dataclass(frozen=True)
class DisplaySettings:
    """How a heatmap is shown in Slicer.

    Attributes:
        opacity: the heatmap's opacity over the image in the slice views, 0 to 1.
        lower_threshold: heatmap values below it (0 to 1; the maximum is 1) are transparent.
        show_3d: also show the heatmap with volume rendering in the 3D view.
        output_name: the name of a new heatmap node; None = the default name
            (``mrml.heatmap_display.heatmap_node_name``).
        color_legend: show the heatmap's colour bar in the slice views that show it.
        side_by_side: with several methods, lay out one linked slice view per heatmap
            (``mrml.compare_views``); with one method it changes nothing.
    """

    opacity: float = 0.5
    lower_threshold: float = 0.2
    show_3d: bool = False
    output_name: str | None = None
    color_legend: bool = True
    side_by_side: bool = False

    def __post_init__(self) -> None:
        _set(self, "opacity", _fraction("opacity", self.opacity))
        _set(self, "lower_threshold", _fraction("lower_threshold", self.lower_threshold))
        for name in ("show_3d", "color_legend", "side_by_side"):
            if not isinstance(getattr(self, name), bool):
                raise InputError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.output_name is not None and (not isinstance(self.output_name, str) or not self.output_name.strip()):
            raise InputError(f"output_name must be a non-empty name or None (the default name), got {self.output_name!r}")

    def to_dict(self) -> dict[str, Any]:
        return _to_dict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DisplaySettings:
        return _from_dict(cls, data, "display settings")


# -- checks shared by both classes ---------------------------------------------------------------


def _set(settings: object, name: str, value: object) -> None:
    object.__setattr__(settings, name, value)  # normalising a frozen dataclass in __post_init__


def _not_int(value: object) -> bool:
    return isinstance(value, bool) or not isinstance(value, numbers.Integral)


def _class_choice(value: object) -> int | str:
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    if isinstance(value, str) and value.strip():
        return value.strip()
    if _not_int(value) or value < 0:  # type: ignore[operator]
        raise InputError(f"target_class must be a class index (0, 1, ...) or a class name from the model card, "
                         f"got {value!r}")
    return int(value)  # type: ignore[call-overload]  # numpy integers too


def _names(field: str, value: object, allow_empty: bool) -> tuple[str, ...]:
    items = (value,) if isinstance(value, str) else value
    if not isinstance(items, Sequence) or not all(isinstance(item, str) and item.strip() for item in items):
        raise InputError(f"{field} must be a list of names, got {value!r}")
    if not items and not allow_empty:
        choices = ", ".join(catalog.names(catalog.METHOD_CHOICES))
        raise InputError(f"no {field[:-1]} was given; choose at least one of {choices}")
    return tuple(items)


def _fraction(field: str, value: object, open_interval: bool = False) -> float:
    number = float(value) if isinstance(value, numbers.Real) and not isinstance(value, bool) else math.nan
    inside = 0.0 < number < 1.0 if open_interval else 0.0 <= number <= 1.0
    if not inside:  # NaN fails both comparisons
        between = "strictly between 0 and 1" if open_interval else "between 0 and 1"
        raise InputError(f"{field} must be a number {between}, got {value!r}")
    return number


def _to_dict(settings: object) -> dict[str, Any]:
    return {f.name: v.to_dict() if hasattr(v, "to_dict") else list(v) if isinstance(v, tuple) else v
            for f in fields(settings) for v in (getattr(settings, f.name),)}  # type: ignore[arg-type]


def _from_dict(cls: type[S], data: Mapping[str, Any], what: str) -> S:
    if not isinstance(data, Mapping):
        raise InputError(f"the {what} must be a JSON object, got {type(data).__name__}")
    known = [f.name for f in fields(cls)]  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise InputError(f"the {what} have unknown keys {unknown}; known keys: {', '.join(known)}")
    required = [f.name for f in fields(cls) if f.default is dataclasses.MISSING  # type: ignore[arg-type]
                and f.default_factory is dataclasses.MISSING]
    missing = [name for name in required if name not in data]
    if missing:
        raise InputError(f"the {what} lack the keys {missing}")
    return cls(**data)
