"""The ``seghirescam`` command line: ``explain``, ``layers`` and ``demo``.

``explain`` and ``layers`` build the same request objects as the Slicer module's worker and run
them through the same application service (:func:`SegHiResCAMLib.service.run_request`), in this
process, with a progress bar instead of JSON events. Choices and their help come from
:mod:`SegHiResCAMLib.catalog`. Errors come out as one line, ``seghirescam: error: ...``, with exit
status 1 (2 for usage).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import traceback
from pathlib import Path
from typing import Any, TextIO

from . import __version__, catalog, window_options
from .cohort.command import add_batch_parser
from .errors import InputError, InternalError, SegHiResCAMError, internal_error_line, one_line
from .warning_relay import debug_log_to, distinct, relayed_warnings

PROG = "seghirescam"
#: How a user reports an internal error of the command line.
REPORT_ADVICE = "rerun with --debug and report the traceback it prints"


class ProgressBar:
    """A one-line bar on a terminal (``\\r`` redraws); silent when the stream is not a TTY."""

    def __init__(self, stream: TextIO, width: int = 30) -> None:
        self.stream = stream
        self.width = width
        self.active = bool(getattr(stream, "isatty", lambda: False)())
        self._drawn = False

    def update(self, fraction: float, message: str = "") -> None:
        if not self.active:
            return
        fraction = min(max(float(fraction), 0.0), 1.0)
        filled = int(round(fraction * self.width))
        line = f"[{'#' * filled}{'.' * (self.width - filled)}] {fraction * 100:3.0f}% {message}"
        columns = self._columns()
        self.stream.write("\r" + line[: columns - 1].ljust(columns - 1))
        self.stream.flush()
        self._drawn = True

    def _columns(self) -> int:
        try:
            columns = os.get_terminal_size(self.stream.fileno()).columns
        except (OSError, ValueError, AttributeError):  # not a real terminal (a test's pseudo-stream)
            return 80
        return max(columns, 40) if columns else 80  # a fresh pseudo-terminal reports 0 columns

    def close(self) -> None:
        """End the bar's line, so the next output starts on a fresh one."""
        if self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False


class _Parser(argparse.ArgumentParser):
    """argparse, with the one-line error format the rest of the command uses."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        self.exit(2, f"{PROG}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="Explain segmentation networks with class activation maps (Seg-HiRes-Grad CAM, Seg-Grad CAM, ...).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--debug", action="store_true", help="print the full traceback on errors")
    commands = parser.add_subparsers(dest="command", metavar="{explain,batch,layers,demo,evaluate}", parser_class=_Parser)
    commands.required = True

    explain = commands.add_parser(
        "explain",
        help="explain one class of a model's segmentation of an image; write the heatmap",
        description="Explain why MODEL segments CLASS (inside the region ROI, or where it predicts CLASS) in IMAGE; "
        "write the heatmap on the image's exact voxel grid.",
    )
    explain.add_argument("--image", required=True, action="append", metavar="PATH",
                         help="NRRD, NIfTI, or a DICOM series folder; repeat it for a model with several input "
                         "channels, one image per channel in the model card's order (later images are resampled "
                         "onto the first one's grid)")
    explain.add_argument("--model", required=True, metavar="PATH", help=MODEL_HELP)
    explain.add_argument(
        "--layer", action="append", metavar="NAME",
        help="layer to explain (default: the model card's); repeat for the mean of several layers",
    )
    explain.add_argument("--class", dest="target_class", required=True, metavar="C", help="class index or class name")
    explain.add_argument("--roi", metavar="PATH", help="label file of the region to explain (default: the model's own prediction of C)")
    explain.add_argument("--roi-label", metavar="L", help="label value or segment name in --roi (default: its only label)")
    explain.add_argument("--region", choices=catalog.names(catalog.REGION_CHOICES), metavar="KIND",
                         help="what the target sums over: " + _choices_help(catalog.REGION_CHOICES)
                         + " (default: mask with --roi, else prediction)")
    explain.add_argument("--point", nargs=3, type=float, metavar=("R", "A", "S"),
                         help="explain the model's predicted region of C connected to this point, in the image's RAS "
                         "millimetres as Slicer shows them (ITK and NIfTI tools show LPS: negate the first two); where "
                         "the model predicts nothing there, a sphere around it (--point-radius)")
    explain.add_argument("--point-radius", type=float, metavar="MM",
                         help="radius of the sphere around --point used where the model predicts nothing (default: 10)")
    explain.add_argument("--method", action="append", metavar="M",
                         help=_choices_help(catalog.METHOD_CHOICES, catalog.DEFAULT_METHOD)
                         + "; repeat it for several heatmaps from one run (the gradient methods share one backward)")
    explain.add_argument("--target", default=catalog.LOGITS, metavar="T",
                         help="what is explained: " + _choices_help(catalog.TARGET_CHOICES, catalog.LOGITS))
    explain.add_argument("--threshold", type=float, default=0.5,
                         help="the target threshold t of the probability-threshold target, strictly between 0 and 1 "
                         "(default: 0.5)")
    explain.add_argument("--slice-axis", type=int, choices=(0, 1, 2), metavar="A",
                         help="for 2D models: the axis of the model's input grid to slice along (0 = K, 1 = J, "
                         "2 = I of the volume unless the model card reorients it; default: the model card's)")
    explain.add_argument("--out", required=True, metavar="PATH",
                         help="heatmap file to write (.nrrd, .nii.gz); with several --method, one file per method: "
                         "PATH's name with _<method> before the extension (heat_seg-grad-cam.nrrd)")
    explain.add_argument("--png", metavar="PATH",
                         help="also write a picture of the heatmap over the image: axial, coronal and sagittal planes "
                         "through its hottest voxel in the region, with orientation letters, colour bar and title "
                         "(named like --out per method; needs matplotlib)")
    _add_device(explain)
    window_options.add_arguments(explain)  # batch copies them with explain's other options
    _add_trust(explain)
    add_batch_parser(commands, explain)

    layers = commands.add_parser(
        "layers", help="list a model's layers with their output shapes",
        description="List the layers of MODEL that can be explained, with their output shapes for a probe input.",
    )
    layers.add_argument("--model", required=True, metavar="PATH", help=MODEL_HELP)
    layers.add_argument("--size", type=int, default=64, metavar="N",
                        help="probe input size per spatial axis (rounded up to what the model needs; default 64)")
    _add_trust(layers)

    demo = commands.add_parser(
        "demo", help="explain the bundled demo models on the bundled MNI152 T1 and write heatmaps and pictures",
        description="Explain the white-matter segment of the bundled demo models on the MNI152 T1 with "
        "Seg-HiRes-Grad CAM and Seg-Grad CAM; write heatmaps (NRRD) and slice pictures (PNG).",
    )
    demo.add_argument("--out", default="seghirescam-demo", metavar="DIR", help="output folder (default: seghirescam-demo)")
    demo.add_argument("--size", type=int, metavar="N", help="explain only a central block of N voxels per axis (faster)")
    demo.add_argument("--quick", action="store_true", help="a small, fast run (a 32-voxel block, 3D model only)")
    demo.add_argument("--layer", metavar="NAME", help="layer to explain in every model (default: each model card's)")
    demo.add_argument("--data", metavar="DIR", help="folder with the demo image and models (default: the bundled ones)")
    _add_device(demo)

    from .evaluation import command as evaluate_command

    evaluate_command.add_arguments(commands.add_parser("evaluate", help=evaluate_command.HELP,
                                                       description=evaluate_command.DESCRIPTION))
    return parser


MODEL_HELP = ("model file or folder: TorchScript, state dict + model card (.json), MONAI bundle, "
              "nnU-Net v2 results folder, or a .py build_model() file (with --trust-code)")


def _choices_help(choices, default: str | None = None) -> str:
    """``name (what it is)`` for each catalog choice, the default marked."""
    return "; ".join(f"{c.name}{' (default)' if c.name == default else ''}: {c.description or c.label}"
                     for c in choices)


def _add_device(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", choices=catalog.names(catalog.DEVICE_CHOICES),
                        help="where to compute (default: auto = GPU if any)")


def _add_trust(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trust-code", action="store_true",
                        help="allow running code that comes with the model: a .py build_model() file, or a MONAI "
                        "bundle whose network definition holds expressions or its own code (only for models you trust)")


def _print(*parts: Any) -> None:
    print(*parts, file=sys.stdout, flush=True)


def _warn(message: str) -> None:
    print(f"{PROG}: warning: {message}", file=sys.stderr, flush=True)


def _class_or_name(text: str) -> int | str:
    return int(text) if text.strip().lstrip("-").isdigit() else text


def _point(args: argparse.Namespace, region_point: type):
    """The RegionPoint of --point and --point-radius, or None."""
    if args.point is None:
        if args.point_radius is not None:
            raise InputError("--point-radius needs --point R A S, the point whose region is explained")
        return None
    radius = {} if args.point_radius is None else {"radius_mm": args.point_radius}
    return region_point(tuple(args.point), **radius)


def explain_settings(args: argparse.Namespace):
    """The ExplainSettings of ``seghirescam explain`` (and ``batch``, which shares its options)."""
    from .settings import ExplainSettings, RegionPoint

    return ExplainSettings(
        target_class=_class_or_name(args.target_class), layers=tuple(args.layer or ()),
        methods=tuple(args.method or (catalog.DEFAULT_METHOD,)), target=args.target, target_threshold=args.threshold,
        device=args.device, slice_axis=args.slice_axis, region=args.region, point=_point(args, RegionPoint),
        sliding_window=window_options.window_choice(args),
    )


def explain_request(args: argparse.Namespace):
    """The worker request (paths + settings) that ``seghirescam explain`` runs."""
    from .service import method_outputs
    from .worker.protocol import ExplainRequest

    settings = explain_settings(args)
    roi_label = None if args.roi_label is None else _class_or_name(args.roi_label)
    return ExplainRequest(
        images=tuple(str(path) for path in args.image), model=str(args.model),
        outputs=tuple(str(path) for path in method_outputs(args.out, settings.methods)), settings=settings,
        roi=args.roi, roi_label=roi_label, trust_code=args.trust_code,
    )


def run_explain(args: argparse.Namespace) -> int:
    from .service import method_outputs, run_request

    request = explain_request(args)
    if args.png:  # checked with the heatmap files, before any reading or loading
        from .errors import MissingDependencyError
        from .io.outputs import PICTURE_SUFFIXES, check_distinct_outputs, check_output_file
        from .pictures import pictures_unavailable
        from .service import inputs_of

        reason = pictures_unavailable()
        if reason:
            raise MissingDependencyError(f"--png cannot be written: {reason}; or leave --png out")
        pictures = method_outputs(args.png, request.settings.methods)
        for picture in pictures:
            check_output_file(picture, inputs=inputs_of(request), suffixes=PICTURE_SUFFIXES, kind="picture")
        check_distinct_outputs([*request.outputs, *pictures])
    bar = ProgressBar(sys.stderr)
    try:
        result = run_request(request, progress=bar.update, warn=lambda message: (bar.close(), _warn(message)))
    finally:
        bar.close()
    for method, path in result.outputs.items():
        _print(f"wrote {path} ({method}, device {result.device}, {result.seconds:.1f} s, "
               f"region {result.roi_voxels} voxels)")
    if args.png:
        from .pictures import region_label, save_explanation_picture

        region = region_label(args.roi, args.roi_label, result.settings)
        for method, png in zip(result.settings.methods, method_outputs(args.png, result.settings.methods)):
            _print(f"wrote {save_explanation_picture(png, result, method, model=Path(args.model).name, region=region)}")
    return 0


def run_layers(args: argparse.Namespace) -> int:
    from .service import run_request
    from .worker.protocol import LayersRequest

    listing = run_request(LayersRequest(model=str(args.model), trust_code=args.trust_code, size=args.size))
    shape = listing.example_shape
    default = listing.default_layers[0] if listing.default_layers else None
    _print(f"# {listing.model}: {listing.spatial_dims}D, classes "
           f"{', '.join(f'{i}={n}' for i, n in enumerate(listing.class_names))}")
    _print(f"# output shapes for an input of {'x'.join(map(str, shape))}; * = model card's default layer")
    width = max((len(info.name) for info in listing.layers), default=4)
    kinds = max((len(info.type) for info in listing.layers), default=4)
    for info in listing.layers:
        shape_text = "x".join(map(str, info.output_shape)) if info.output_shape else "-"
        mark = "*" if info.name == default else " "
        why = f"  (cannot be explained: {info.unusable})" if info.unusable else ""
        _print(f"{mark} {info.name.ljust(width)}  {info.type.ljust(kinds)}  {shape_text}{why}")
    return 0


def run_demo_command(args: argparse.Namespace) -> int:
    from .demo_run import run_demo

    size = args.size if args.size is not None else (32 if args.quick else None)
    bar = ProgressBar(sys.stderr)
    try:
        report = run_demo(Path(args.out), data_dir=Path(args.data) if args.data else None, size=size,
                          quick=args.quick, device=args.device, layer=args.layer,
                          progress=bar.update, warn=lambda message: (bar.close(), _warn(message)))
    finally:
        bar.close()
    _print(report)
    return 0


def run_batch(args: argparse.Namespace) -> int:
    from .cohort.command import run_batch_command

    bar = ProgressBar(sys.stderr)
    return run_batch_command(args, explain_settings(args), bar.update, bar.close, _print, _warn,
                             lambda line: print(f"{PROG}: error: {line}", file=sys.stderr, flush=True))


def run_evaluate(args: argparse.Namespace) -> int:
    from .evaluation.command import run

    return run(args)


COMMANDS = {"explain": run_explain, "batch": run_batch, "layers": run_layers, "demo": run_demo_command,
            "evaluate": run_evaluate}


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 1 error, 2 usage)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        # Only SegHiResCAM's own warnings reach the user; --debug also shows what other libraries warned about.
        with debug_log_to(sys.stderr, PROG) if args.debug else contextlib.nullcontext(), \
                relayed_warnings(distinct(_warn)):
            return COMMANDS[args.command](args)
    except InternalError as error:
        return _report_error(args, internal_error_line(error, REPORT_ADVICE))
    except SegHiResCAMError as error:
        return _report_error(args, one_line(error))
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr, flush=True)
        return 130
    except Exception as error:  # noqa: BLE001 - a command line reports, it does not dump tracebacks
        return _report_error(args, internal_error_line(error, REPORT_ADVICE, f"running '{PROG} {args.command}'"))


def _report_error(args: argparse.Namespace, line: str) -> int:
    """The one error line (after the traceback, with --debug); exit status 1."""
    if args.debug:
        traceback.print_exc()
    print(f"{PROG}: error: {line}", file=sys.stderr, flush=True)
    return 1


if __name__ == "__main__":
    sys.exit(main())
