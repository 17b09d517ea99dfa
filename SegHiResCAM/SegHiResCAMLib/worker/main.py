"""The worker: ``python -m SegHiResCAMLib.worker request.json`` (runs in Slicer's ``PythonSlicer``).

It reads the request (see :mod:`.protocol`), the image and ROI files, loads the model,
explains the volume, writes the heatmap file and reports on stdout in JSON lines: progress
events, warnings, then one result, or ONE error event with a one-line message (exit 1).
An unusable request exits 2. The command line runs the same :func:`execute`, so the
Slicer module and ``seghirescam explain`` cannot drift apart.

No slicer, qt or vtk import here: the worker must run with any plain Python that has torch.
"""

from __future__ import annotations

import logging
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from ..errors import InputError, SegHiResCAMError
from ..volume import Volume
from ..warning_relay import distinct, one_line, relayed_warnings
from .protocol import Request, emit

logger = logging.getLogger(__name__)

EventSink = Callable[..., None]  # sink(event_name, **fields)

EXIT_OK, EXIT_ERROR, EXIT_BAD_REQUEST = 0, 1, 2


@dataclass(frozen=True)
class RunResult:
    """What :func:`execute` produced, for callers that go on (the command line draws a PNG)."""

    image: Volume
    maps: dict[str, Volume]
    output: Path
    device: str
    seconds: float
    roi_voxels: int


def load_model_for(path: str | Path, *, trust_code: bool = False):
    """``load_model``, imported only when needed (it imports torch)."""
    from ..models.loading import load_model

    return load_model(path, trust_code=trust_code)


def inputs_of(request: Request) -> dict[str, str | None]:
    """Every input file or folder of a request, by the role a message names it with."""
    return {"the image": request.image, "the region file": request.roi, "the model": request.model}


def execute(request: Request, sink: EventSink) -> RunResult:
    """Run one request: read inputs, explain, write ``request.output``; report through ``sink``.

    ``sink(name, **fields)`` receives "progress" (fraction, message), "warning" (message) and
    finally "result" (output, device, seconds, roi_voxels, method, layer, target_class).
    SegHiResCAM's warnings (:class:`~SegHiResCAMLib.errors.SegHiResCAMWarning`) raised during the
    run are relayed as warning events, each once; other libraries' warnings go to the debug log.

    Raises:
        SegHiResCAMError: any problem a user can fix (its message is one sentence).
    """
    from ..io.images import check_output_path, read_image, read_mask, write_image
    from ..pipeline import explain_volume

    started = time.perf_counter()
    relay = distinct(lambda text: sink("warning", message=text))
    with relayed_warnings(relay):

        def progress(fraction: float, message: str) -> None:
            sink("progress", fraction=round(float(fraction), 4), message=message)

        # Fail before any reading or loading: a folder, a file type, or an input that would be overwritten.
        output = check_output_path(request.output, inputs=inputs_of(request))
        progress(0.0, f"reading {Path(request.image).name}")
        image = read_image(request.image)
        roi = None
        if request.roi:
            roi = read_mask(request.roi, image, label=request.roi_label)
        progress(0.0, f"loading the model {Path(request.model).name}")
        loaded = load_model_for(request.model, trust_code=request.trust_code)
        maps, explanation = explain_volume(
            loaded,
            image,
            target_class=request.target_class,
            roi=roi,
            layer=request.layer,
            methods=(request.method,),
            target=request.target,
            threshold=request.threshold,
            device=request.device,
            slice_axis=request.slice_axis,
            progress=progress,
        )
        for message in explanation.warnings:
            relay(message)
        write_image(maps[request.method], output)
    seconds = time.perf_counter() - started
    layer = request.layer if request.layer is not None else loaded.card.default_layer
    sink(
        "result",
        output=str(output),
        device=explanation.device,
        seconds=round(seconds, 3),
        roi_voxels=int(explanation.roi_voxels),
        method=request.method,
        layer=layer,
        target_class=request.target_class,
    )
    return RunResult(image, maps, output, explanation.device, seconds, int(explanation.roi_voxels))


def _read_request(path: str) -> Request:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as error:
        raise InputError(f"cannot read the worker request {path}: {error.strerror or error}") from error
    return Request.from_json(text)


def main(argv: list[str] | None = None, stdout: TextIO | None = None) -> int:
    """Entry point: ``python -m SegHiResCAMLib.worker request.json``; returns the exit status."""
    args = sys.argv[1:] if argv is None else list(argv)
    events = stdout if stdout is not None else sys.stdout

    def sink(name: str, **fields: Any) -> None:
        emit(events, name, **fields)

    if len(args) != 1:
        sink("error", message="usage: python -m SegHiResCAMLib.worker REQUEST.json")
        return EXIT_BAD_REQUEST
    try:
        request = _read_request(args[0])
    except InputError as error:
        sink("error", message=one_line(error))
        return EXIT_BAD_REQUEST
    # Anything a library prints must not corrupt the event stream: send it to stderr.
    saved_stdout = sys.stdout
    sys.stdout = sys.stderr
    try:
        execute(request, sink)
    except SegHiResCAMError as error:
        sink("error", message=one_line(error), type=type(error).__name__)
        return EXIT_ERROR
    except Exception as error:  # noqa: BLE001 - the one place that turns any failure into an event
        traceback.print_exc(file=sys.stderr)
        sink("error", message=f"unexpected {type(error).__name__}: {one_line(error)}")
        return EXIT_ERROR
    finally:
        sys.stdout = saved_stdout
    return EXIT_OK
