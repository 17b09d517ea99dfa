"""The worker's wire format: one request JSON file in, JSON lines out on stdout.

A request is file paths plus one :class:`~SegHiResCAMLib.settings.ExplainSettings` (written by the
Slicer job or any other caller; the command line builds the same objects in process)::

    {"kind": "explain",
     "images": ["t1.nrrd", "flair.nrrd"],          one per model input channel, in the card's order
     "roi": "roi.nrrd" | null, "roi_label": 1 | "segment name" | null,
     "model": "model.pt", "trust_code": false,
     "outputs": ["heat_hires.nrrd", "heat_grad.nrrd"],   one per method, in settings.methods' order
     "settings": {"target_class": 1, "layers": ["decoder.2"], "methods": ["seg-hires-grad-cam", "seg-grad-cam"],
                  "target": "logits", "target_threshold": 0.5, "device": "auto", "slice_axis": null,
                  "region": null, "point": {"ras": [12.5, -30.0, 41.0], "radius_mm": 10.0} | null, ...}}

    {"kind": "layers", "model": "model.pt", "trust_code": false, "size": 32}

``roi_label`` null takes the region file's single non-zero label; a string names a segment of a
``.seg.nrrd``. ``trust_code`` lets the model loader run code that comes with the model. A
"layers" request lists the model's layers with their output shapes for a probe input of ``size``
voxels per axis (the panel lists layers this way, so Slicer's own process never loads torch).

Events, one JSON object per line::

    {"event": "progress", "fraction": 0.25, "message": "explained 8 of 40 slices"}
    {"event": "warning", "message": "..."}
    {"event": "result", "output": "heat_hires.nrrd", "outputs": {"seg-hires-grad-cam": "heat_hires.nrrd", ...},
     "device": "cpu", "seconds": 1.3, "roi_voxels": 812, "layers": ["decoder.2"], "target_class": 1,
     "class_name": "tumour"}
    {"event": "result", "model": "...", "layers": [{"name": "decoder.2", "type": "Conv3d", "output_shape": [...],
     "unusable": null}], "default_layers": [...], "example_shape": [...], "in_channels": 2}  (a "layers" request)
    {"event": "error", "message": "the segment 'tumor' is empty inside the image", "type": "InputError"}

Exit status: 0 after a result, 1 after an error event, 2 for an unusable request (not JSON,
unknown or missing keys: :class:`RequestError`). Values the settings refuse are errors (exit 1).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, dataclass, fields
from typing import Any, ClassVar, TextIO, Union

from ..errors import InputError
from ..settings import ExplainSettings


class RequestError(InputError):
    """The request is not a request this worker understands (its structure, not its values)."""


@dataclass(frozen=True)
class ExplainRequest:
    """Explain one image (one file per model input channel) and write one heatmap file per method.

    Attributes:
        images: image files, one per model input channel in the model card's channel order (later
            images on another grid are resampled onto the first's, with a warning).
        model: the model file or folder.
        outputs: heatmap files to write, one per ``settings.methods`` entry, in that order.
        settings: what to explain.
        roi: a region file (label or weight map) on any grid, or None.
        roi_label: the label value or segment name in ``roi``; None = its single non-zero label.
        trust_code: allow running code that comes with the model.
    """

    kind: ClassVar[str] = "explain"
    images: tuple[str, ...]
    model: str
    outputs: tuple[str, ...]
    settings: ExplainSettings
    roi: str | None = None
    roi_label: int | str | None = None
    trust_code: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "images", _paths("images", self.images))
        object.__setattr__(self, "outputs", _paths("outputs", self.outputs))
        if not isinstance(self.settings, ExplainSettings):
            raise RequestError(f"the request's settings must be ExplainSettings, got {type(self.settings).__name__}")
        if len(self.outputs) != len(self.settings.methods):
            raise InputError(f"{len(self.outputs)} output file(s) for {len(self.settings.methods)} method(s) "
                             f"({', '.join(self.settings.methods)}); give one output file per method")
        if len(set(self.outputs)) != len(self.outputs):
            raise InputError(f"the output files {list(self.outputs)} name one file twice; give each method its own")
        _check_model(self.model, self.trust_code)
        if self.roi is not None and not (isinstance(self.roi, str) and self.roi):
            raise RequestError(f"roi must be a file name or null, got {self.roi!r}")
        if self.roi_label is not None and (isinstance(self.roi_label, bool)
                                           or not isinstance(self.roi_label, (int, str))):
            raise RequestError(f"roi_label must be a label value, a segment name or null, got {self.roi_label!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "images": list(self.images), "model": self.model, "outputs": list(self.outputs),
                "settings": self.settings.to_dict(), "roi": self.roi, "roi_label": self.roi_label,
                "trust_code": self.trust_code}

    def to_json(self) -> str:
        return json.dumps(self.to_dict())


@dataclass(frozen=True)
class LayersRequest:
    """List a model's layers with their output shapes for a probe input of ``size`` voxels per axis."""

    kind: ClassVar[str] = "layers"
    model: str
    trust_code: bool = False
    size: int = 32

    def __post_init__(self) -> None:
        _check_model(self.model, self.trust_code)
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 1:
            raise InputError(f"the probe size must be a positive number of voxels, got {self.size!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "model": self.model, "trust_code": self.trust_code, "size": self.size}

    def to_json(self) -> str:
        return json.dumps(self.to_dict())


Request = Union[ExplainRequest, LayersRequest]
REQUEST_KINDS: dict[str, type] = {ExplainRequest.kind: ExplainRequest, LayersRequest.kind: LayersRequest}


def request_from_dict(data: Mapping[str, Any]) -> Request:
    """The request a JSON object describes.

    Raises:
        RequestError: not an object, an unknown kind, unknown or missing keys (a malformed request).
        InputError: a value the request or its settings refuse.
    """
    if not isinstance(data, Mapping):
        raise RequestError(f"the worker request is malformed: a JSON object is needed, got {type(data).__name__}")
    data = dict(data)
    kind = data.pop("kind", ExplainRequest.kind)
    if kind not in REQUEST_KINDS:
        raise RequestError(f"the worker request is malformed: kind {kind!r} is unknown; "
                           f"known kinds: {', '.join(REQUEST_KINDS)}")
    cls = REQUEST_KINDS[kind]
    _check_keys(data, [f for f in fields(cls)], "")
    if cls is ExplainRequest:
        settings = data["settings"]
        if not isinstance(settings, Mapping):
            raise RequestError("the worker request is malformed: settings must be a JSON object")
        _check_keys(settings, list(fields(ExplainSettings)), "settings.")
        data["settings"] = ExplainSettings.from_dict(settings)
    return cls(**data)


def request_from_json(text: str) -> Request:
    """:func:`request_from_dict` of a JSON text (invalid JSON is a RequestError)."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise RequestError(f"the worker request is not valid JSON: {error}") from error
    return request_from_dict(data)


def _check_keys(data: Mapping[str, Any], known_fields: Sequence, prefix: str) -> None:
    known = [f.name for f in known_fields]
    required = [f.name for f in known_fields if _required(f)]
    unknown = sorted(set(data) - set(known))
    missing = [name for name in required if name not in data]
    if unknown or missing:
        problems = ([f"unknown keys {[prefix + k for k in unknown]}"] if unknown else []) + (
            [f"missing keys {[prefix + k for k in missing]}"] if missing else [])
        raise RequestError(f"the worker request is malformed: {'; '.join(problems)}; "
                           f"known keys: {', '.join(prefix + k for k in known)}")


def _required(field) -> bool:
    return field.default is MISSING and field.default_factory is MISSING


def _paths(name: str, value: object) -> tuple[str, ...]:
    items = (value,) if isinstance(value, str) else value
    if not isinstance(items, Sequence) or not items or not all(isinstance(p, str) and p for p in items):
        raise RequestError(f"{name} must be a non-empty list of file names, got {value!r}")
    return tuple(items)


def _check_model(model: object, trust_code: object) -> None:
    if not isinstance(model, str) or not model:
        raise RequestError(f"model must be a file or folder name, got {model!r}")
    if not isinstance(trust_code, bool):
        raise RequestError(f"trust_code must be true or false, got {trust_code!r}")


def emit(stream: TextIO, event: str, **fields: Any) -> None:
    """Write one event line and flush, so the reader sees it at once."""
    stream.write(json.dumps({"event": event, **fields}) + "\n")
    stream.flush()


def parse_event(line: str) -> dict[str, Any] | None:
    """Decode one output line; None for lines that are not events (stray prints)."""
    line = line.strip()
    if not line.startswith("{"):
        return None
    try:
        event = json.loads(line)
    except json.JSONDecodeError:
        return None
    return event if isinstance(event, dict) and "event" in event else None
