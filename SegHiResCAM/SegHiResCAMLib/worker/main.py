"""The worker: ``python -m SegHiResCAMLib.worker request.json`` (runs in Slicer's ``PythonSlicer``).

It reads the request (see :mod:`.protocol`), runs it through the application service
(:func:`SegHiResCAMLib.service.run_request`, the same code the command line and the demo run), and
reports on stdout in JSON lines: progress events, warnings, then one result, or ONE error event
with a one-line message (exit 1). An unusable request exits 2.

No slicer, qt or vtk import here: the worker must run with any plain Python that has torch.
"""

from __future__ import annotations

import sys
import traceback
from pathlib import Path
from typing import Any, TextIO

from ..errors import InputError, InternalError, SegHiResCAMError, internal_error_line, one_line
from .protocol import Request, RequestError, emit, request_from_json

EXIT_OK, EXIT_ERROR, EXIT_BAD_REQUEST = 0, 1, 2

#: How a user reports an internal error of the worker (its traceback went to stderr).
REPORT_ADVICE = ("please report it with the worker's log (Slicer: the Python console and the application log; "
                 "elsewhere: the worker's stderr)")


def read_request(path: str) -> Request:
    """The request in a JSON file (a RequestError when it cannot be read or understood)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as error:
        raise RequestError(f"cannot read the worker request {path}: {error.strerror or error}") from error
    return request_from_json(text)


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
        request = read_request(args[0])
    except RequestError as error:
        sink("error", message=one_line(error))
        return EXIT_BAD_REQUEST
    except InputError as error:  # a well-formed request with a value the settings refuse
        sink("error", message=one_line(error), type=type(error).__name__)
        return EXIT_ERROR
    # Anything a library prints must not corrupt the event stream: send it to stderr.
    saved_stdout = sys.stdout
    sys.stdout = sys.stderr
    try:
        from ..service import run_request

        result = run_request(
            request,
            progress=lambda fraction, message: sink("progress", fraction=round(float(fraction), 4), message=message),
            warn=lambda message: sink("warning", message=message),
        )
        sink("result", **result.event())
    except InternalError as error:
        traceback.print_exc(file=sys.stderr)
        sink("error", message=internal_error_line(error, REPORT_ADVICE), type=type(error).__name__)
        return EXIT_ERROR
    except SegHiResCAMError as error:
        sink("error", message=one_line(error), type=type(error).__name__)
        return EXIT_ERROR
    except Exception as error:  # noqa: BLE001 - the one place that turns any other failure into an event
        traceback.print_exc(file=sys.stderr)
        sink("error", message=internal_error_line(error, REPORT_ADVICE, "running the worker"), type="InternalError")
        return EXIT_ERROR
    finally:
        sys.stdout = saved_stdout
    return EXIT_OK
