"""The ``seghirescam`` command line: ``explain``, ``layers`` and ``demo``.

``explain`` runs exactly the worker's code (:func:`SegHiResCAMLib.worker.main.execute`) that
the Slicer module runs in ``PythonSlicer``, with a progress bar instead of JSON events.
Errors come out as one line, ``seghirescam: error: ...``, with exit status 1 (2 for usage).
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path
from typing import Any, TextIO

from . import __version__
from .errors import InputError, SegHiResCAMError
from .worker.main import one_line

PROG = "seghirescam"
from .worker.protocol import DEVICES


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
    commands = parser.add_subparsers(dest="command", metavar="{explain,layers,demo}", parser_class=_Parser)
    commands.required = True

    explain = commands.add_parser(
        "explain",
        help="explain one class of a model's segmentation of an image; write the heatmap",
        description="Explain why MODEL segments CLASS (inside ROI, or where it predicts CLASS) in IMAGE; "
        "write the heatmap on the image's exact voxel grid.",
    )
    explain.add_argument("--image", required=True, metavar="PATH", help="NRRD, NIfTI, or a DICOM series folder")
    explain.add_argument("--model", required=True, metavar="PATH", help=MODEL_HELP)
    explain.add_argument(
        "--layer", action="append", metavar="NAME",
        help="layer to explain (default: the model card's); repeat for the mean of several layers",
    )
    explain.add_argument("--class", dest="target_class", required=True, metavar="C", help="class index or class name")
    explain.add_argument("--roi", metavar="PATH", help="label file of the region to explain (default: the model's own prediction of C)")
    explain.add_argument("--roi-label", metavar="L", help="label value or segment name in --roi (default: its only label)")
    explain.add_argument("--method", default="seg-hires-grad-cam", metavar="M",
                         help="seg-hires-grad-cam (default), seg-grad-cam, seg-grad-cam++, seg-xgrad-cam, seg-layer-cam, "
                         "kernel-weighted-contribution (ablation of each channel: slow)")
    explain.add_argument("--target", default="logits", metavar="T",
                         help="what is explained: logits (default) or probability-threshold")
    explain.add_argument("--threshold", type=float, default=0.5,
                         help="probability threshold of the probability-threshold target (default: 0.5)")
    explain.add_argument("--out", required=True, metavar="PATH", help="heatmap file to write (.nrrd, .nii.gz)")
    explain.add_argument("--png", metavar="PATH", help="also write an axial slice with the heatmap over the image")
    _add_device(explain)
    _add_trust(explain)

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
    return parser


MODEL_HELP = ("model file or folder: TorchScript, state dict + model card (.json), MONAI bundle, "
              "nnU-Net v2 results folder, or a .py build_model() file (with --trust-code)")


def _add_device(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", choices=DEVICES, help="where to compute (default: auto = GPU if any)")


def _add_trust(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trust-code", action="store_true",
                        help="allow running code that comes with the model: a .py build_model() file, or a MONAI "
                        "bundle whose network definition holds expressions or its own code (only for models you trust)")


def _print(*parts: Any) -> None:
    print(*parts, file=sys.stdout, flush=True)


def _warn(message: str) -> None:
    print(f"{PROG}: warning: {message}", file=sys.stderr, flush=True)


def _check_choices(method: str, target: str) -> None:
    """Check names against the engine's own lists (argparse choices would import torch for --help)."""
    from .engine.explain import METHOD_NAMES
    from .engine.targets import TARGETS

    if method not in METHOD_NAMES:
        raise InputError(f"method {method!r} is unknown; choose one of: {', '.join(METHOD_NAMES)}")
    if target not in TARGETS:
        raise InputError(f"target {target!r} is unknown; choose one of: {', '.join(TARGETS)}")


def run_explain(args: argparse.Namespace) -> int:
    from .worker.main import execute
    from .worker.protocol import Request

    _check_choices(args.method, args.target)
    layer = None if not args.layer else (args.layer[0] if len(args.layer) == 1 else list(args.layer))
    roi_label: int | str | None = args.roi_label
    if isinstance(roi_label, str) and roi_label.lstrip("-").isdigit():
        roi_label = int(roi_label)
    target_class: int | str = int(args.target_class) if args.target_class.lstrip("-").isdigit() else args.target_class
    request = Request(
        image=str(args.image), model=str(args.model), output=str(args.out), layer=layer,
        target_class=target_class, roi=args.roi, roi_label=roi_label, method=args.method,
        target=args.target, threshold=args.threshold, device=args.device, trust_code=args.trust_code,
    )
    bar = ProgressBar(sys.stderr)

    def sink(name: str, **fields: Any) -> None:
        if name == "progress":
            bar.update(fields["fraction"], fields.get("message", ""))
        elif name == "warning":
            bar.close()
            _warn(fields["message"])

    try:
        result = execute(request, sink)
    finally:
        bar.close()
    _print(f"wrote {result.output} ({args.method}, device {result.device}, {result.seconds:.1f} s, "
           f"ROI {result.roi_voxels} voxels)")
    if args.png:
        from .overlays import render_overlays

        written, reason = render_overlays(result.image, result.maps[args.method], Path(args.png).with_suffix(""),
                                          orientations=("axial",), single_path=Path(args.png))
        if written:
            _print(f"wrote {written[0]}")
        else:
            _warn(f"no PNG written: {reason}")
    return 0


def run_layers(args: argparse.Namespace) -> int:
    from .engine.layers import list_layers
    from .worker.main import load_model_for

    loaded = load_model_for(args.model, trust_code=args.trust_code)
    card = loaded.card
    if args.size < 1:
        raise InputError(f"--size must be a positive number of voxels, got {args.size}")
    shape = card.example_shape(args.size)
    infos = list_layers(loaded.module, shape)
    default = card.default_layer
    _print(f"# {card.name}: {card.spatial_dims}D, classes {', '.join(f'{i}={n}' for i, n in enumerate(card.class_names))}")
    _print(f"# output shapes for an input of {'x'.join(map(str, shape))}; * = model card's default layer")
    width = max((len(info.name) for info in infos), default=4)
    kinds = max((len(info.type) for info in infos), default=4)
    for info in infos:
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


COMMANDS = {"explain": run_explain, "layers": run_layers, "demo": run_demo_command}


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 1 error, 2 usage)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except SegHiResCAMError as error:
        if args.debug:
            traceback.print_exc()
        print(f"{PROG}: error: {one_line(error)}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr, flush=True)
        return 130
    except Exception as error:  # noqa: BLE001 - a command line reports, it does not dump tracebacks
        if args.debug:
            traceback.print_exc()
        print(f"{PROG}: error: unexpected {type(error).__name__}: {one_line(error)} (rerun with --debug for details)",
              file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
