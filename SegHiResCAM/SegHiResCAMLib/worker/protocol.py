"""The worker's wire format: one request JSON file in, JSON lines out on stdout.

Request (a JSON object, written by the Slicer logic or the command line)::

    {"image": "in.nrrd", "roi": "roi.nrrd" | null, "roi_label": 1 | "segment name" | null,
     "model": "model.pt", "layer": "decoder.2" | ["a", "b"], "target_class": 1,
     "method": "seg-hires-grad-cam", "target": "logits", "threshold": 0.5,
     "device": "auto", "output": "heat.nrrd", "trust_code": false, "slice_axis": null}

``roi_label`` null takes the ROI file's single non-zero label; a string names a segment of a
``.seg.nrrd``. ``trust_code`` lets the model loader run a Python builder file beside the model.
``slice_axis`` (0, 1, 2 or null = the model card's) is the axis a 2D model slices along.

Events, one JSON object per line::

    {"event": "progress", "fraction": 0.25, "message": "explaining slices 1-8 of 40"}
    {"event": "warning", "message": "..."}
    {"event": "result", "output": "heat.nrrd", "device": "cpu", "seconds": 1.3}
    {"event": "error", "message": "the segment 'tumor' is empty inside the image", "type": "InputError"}

Exit status: 0 after a result, 1 after an error event, 2 for an unusable request.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any, TextIO

from ..errors import InputError

DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class Request:
    image: str
    model: str
    output: str
    layer: str | list[str] | None = None
    target_class: int = 1
    roi: str | None = None
    roi_label: int | str | None = 1
    method: str = "seg-hires-grad-cam"
    target: str = "logits"
    threshold: float = 0.5
    device: str = "auto"
    trust_code: bool = False
    slice_axis: int | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "Request":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise InputError(f"the worker request is not valid JSON: {error}") from error
        try:
            return cls(**data)
        except TypeError as error:
            raise InputError(f"the worker request is malformed: {error}") from error


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
