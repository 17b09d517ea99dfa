"""``seghirescam evaluate``: every faithfulness and sanity check of several methods on one case, as a report.

    seghirescam evaluate --image I --model M --class C [--roi R] --layer L [--layer L2 ...]
                         --methods m1 m2 ... --out DIR
    seghirescam evaluate --cases cases.csv --model M --class C ... --out DIR

writes ``DIR/metrics.csv`` (case, method, layer, metric, value), ``DIR/report.html`` and its
pictures (see :mod:`report`); with ``--cases`` (the table of ``seghirescam batch``), one report
per case and one across the cases, resumable (see :mod:`cohort`). This module imports nothing heavy at import time: the command
line's parser is built without torch.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .. import window_options

DEFAULT_METHODS = ("seg-hires-grad-cam", "seg-grad-cam", "seg-grad-cam++", "seg-xgrad-cam", "seg-layer-cam")
HELP = "score several CAM methods' maps (faithfulness, randomisation, localisation, sparseness, cost); write a report"
DESCRIPTION = ("Explain CLASS of MODEL on IMAGE with each method at each layer, score every map with deletion/insertion, "
               "masking, randomisation, localisation, sparseness and cost checks next to three baseline maps "
               "(random, the region, a blob at its centre), and write DIR/metrics.csv and DIR/report.html.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``evaluate`` command's options."""
    inputs = parser.add_mutually_exclusive_group(required=True)
    inputs.add_argument("--image", metavar="PATH", help="NRRD, NIfTI, or a DICOM series folder")
    inputs.add_argument("--cases", metavar="CSV|DIR",
                        help="a cohort instead of one image: a CSV table as for 'seghirescam batch' (columns image, "
                        "image_2..., roi, roi_label, case, class) or a folder of images; DIR then gets one report per "
                        "case, metrics.csv and report.html across the cases, and a rerun resumes")
    parser.add_argument("--model", required=True, metavar="PATH", help="model file or folder (as for explain)")
    parser.add_argument("--class", dest="target_class", required=True, metavar="C", help="class index or class name")
    parser.add_argument("--roi", metavar="PATH", help="label file of the region (default: the model's own prediction of C)")
    parser.add_argument("--roi-label", metavar="L", help="label value or segment name in --roi (default: its only label)")
    parser.add_argument("--layer", action="append", metavar="NAME",
                        help="layer to explain, each evaluated on its own; repeat for several (default: the card's)")
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), metavar="M",
                        help=f"methods to compare (default: {' '.join(DEFAULT_METHODS)}; also kernel-weighted-contribution)")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="report folder to create (must be new or empty; with --cases, or this evaluation's own)")
    parser.add_argument("--baseline", default="blur", metavar="B",
                        help="what replaces removed voxels: blur (default), mean, zero, noise, impute (3D harmonic fill)")
    parser.add_argument("--steps", type=int, default=20, help="deletion/insertion steps (default 20)")
    parser.add_argument("--block", type=int, default=4, help="edge of the removed blocks in voxels (default 4)")
    parser.add_argument("--score", default="logits", metavar="S",
                        help="the region's score: logits (the explained target, default), probability, soft-dice")
    parser.add_argument("--band-mm", type=float, default=10.0, help="band around the region for localisation (mm)")
    parser.add_argument("--randomisation-points", type=int, default=4,
                        help="points of the model-randomisation cascade (0 skips it; default 4)")
    parser.add_argument("--random-labels-model", metavar="PATH",
                        help="a model of the same network trained on permuted labels (data randomisation check)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every random choice (default 0)")
    parser.add_argument("--no-viewer", action="store_true", help="leave the interactive 3D view out of the report")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                        help="where to compute (default: auto = GPU if any)")
    parser.add_argument("--trust-code", action="store_true",
                        help="allow running code that comes with the model (only for models you trust)")
    window_options.add_arguments(parser)


def settings_from(args: argparse.Namespace):
    """The :class:`suite.EvaluationSettings` of a parsed command line, checked before any long work."""
    from ..engine.device import resolve_device
    from ..engine.explain import METHOD_NAMES
    from ..errors import InputError
    from .perturbation import BASELINES
    from .scoring import SCORES
    from .suite import EvaluationSettings

    unknown = [m for m in args.methods if m not in METHOD_NAMES]
    if unknown:
        raise InputError(f"method {unknown[0]!r} is unknown; choose from: {', '.join(METHOD_NAMES)}")
    if args.baseline not in BASELINES:
        raise InputError(f"baseline {args.baseline!r} is unknown; choose one of: {', '.join(BASELINES)}")
    if args.score not in SCORES:
        raise InputError(f"score {args.score!r} is unknown; choose one of: {', '.join(SCORES)}")
    for name, value in (("--steps", args.steps), ("--block", args.block)):
        if value < 1:
            raise InputError(f"{name} must be at least 1, got {value}")
    if args.randomisation_points < 0:
        raise InputError(f"--randomisation-points must be 0 or more, got {args.randomisation_points}")
    return EvaluationSettings(methods=tuple(dict.fromkeys(args.methods)), steps=args.steps, baseline=args.baseline,
                              block=args.block, score=args.score, band_mm=args.band_mm,
                              randomisation_points=args.randomisation_points, seed=args.seed,
                              device=str(resolve_device(args.device)),
                              sliding_window=window_options.window_choice(args))  # "auto" decided once, for the cost too


def run(args: argparse.Namespace) -> int:
    """Run ``seghirescam evaluate``; returns the exit status."""
    from ..io.images import read_image, read_mask
    from ..models.loading import load_model
    from ..pictures import region_label
    from ..pipeline import resolve_class
    from .cohort import class_label
    from .report import ReportInfo, check_output_folder, write_report
    from .suite import evaluate_case

    settings = settings_from(args)
    if args.cases is not None:
        return run_cases(args, settings)
    out = check_output_folder(args.out)
    image = read_image(args.image)
    roi_label = args.roi_label
    if isinstance(roi_label, str) and roi_label.lstrip("-").isdigit():
        roi_label = int(roi_label)
    roi = read_mask(args.roi, image, label=roi_label) if args.roi else None
    loaded = load_model(args.model, trust_code=args.trust_code)
    random_labels = load_model(args.random_labels_model, trust_code=args.trust_code) if args.random_labels_model else None
    target = int(args.target_class) if args.target_class.lstrip("-").isdigit() else args.target_class
    class_index = resolve_class(target, loaded.card.class_names)
    layers = _layers(args, loaded)
    class_name = class_label(class_index, loaded.card.class_names)
    region = region_label(args.roi, args.roi_label)
    case = Path(args.image).name
    talk = sys.stderr.isatty()

    def progress(fraction: float, message: str) -> None:
        if talk:
            print(f"\r[{fraction * 100:3.0f}%] {message}".ljust(79)[:79], end="", file=sys.stderr, flush=True)

    result = evaluate_case(loaded, image, case=case, target_class=class_index, layers=layers, roi=roi,
                           settings=settings, random_labels_model=random_labels, progress=progress)
    if talk:
        print(file=sys.stderr)
    info = ReportInfo(model=f"{loaded.card.name} ({Path(args.model).name})", class_name=class_name, region=region,
                      settings=settings)
    page = write_report(out, [result], info, viewer=not args.no_viewer)
    for message in result.warnings:
        print(f"seghirescam: warning: {message}", file=sys.stderr)
    print(f"wrote {page} and {out / 'metrics.csv'} ({len(result.rows)} values: {len(settings.methods)} methods and "
          f"{len(settings.baselines)} baseline maps at {len(layers)} layer(s))", flush=True)
    return 0


def run_cases(args: argparse.Namespace, settings) -> int:
    """``seghirescam evaluate --cases``: every case, then one table and report; 1 when a case failed."""
    from ..cohort.cases import read_cases
    from ..errors import InputError
    from ..models.loading import load_model
    from ..pipeline import resolve_class
    from .cohort import FAILED, STATUS_FILE, CohortEvaluation, check_cohort_folder, evaluate_cohort

    if args.roi or args.roi_label:
        raise InputError("--roi and --roi-label name one image's region; with --cases give each case's in the "
                         "table's roi and roi_label columns")
    cases = read_cases(args.cases)
    loaded = load_model(args.model, trust_code=args.trust_code)
    random_labels = load_model(args.random_labels_model, trust_code=args.trust_code) if args.random_labels_model else None
    target = int(args.target_class) if args.target_class.lstrip("-").isdigit() else args.target_class
    resolve_class(target, loaded.card.class_names)  # the cases' default class, checked before any case
    job = CohortEvaluation(loaded=loaded, model=str(args.model), settings=settings, target_class=target,
                           layers=tuple(_layers(args, loaded)), random_labels=random_labels,
                           random_labels_path=args.random_labels_model)
    out = check_cohort_folder(args.out, job.fingerprint())
    talk = sys.stderr.isatty()

    def progress(fraction: float, message: str) -> None:
        if talk:
            print(f"\r[{fraction * 100:3.0f}%] {message}".ljust(79)[:79], end="", file=sys.stderr, flush=True)

    def on_case(outcome) -> None:
        if talk:
            print(file=sys.stderr)
        if outcome.status == FAILED:
            print(f"seghirescam: warning: case {outcome.case} failed: {outcome.error}", file=sys.stderr, flush=True)
        for message in outcome.warnings:
            print(f"seghirescam: warning: case {outcome.case}: {message}", file=sys.stderr, flush=True)

    outcomes = evaluate_cohort(cases, job, out, viewer=not args.no_viewer, on_case=on_case, progress=progress)
    failed = [o for o in outcomes if o.status == FAILED]
    print(f"{len(outcomes) - len(failed)} of {len(outcomes)} cases evaluated, {len(failed)} failed; wrote "
          f"{out / 'report.html'}, {out / 'metrics.csv'} and {out / STATUS_FILE}", flush=True)
    if failed:
        print(f"seghirescam: error: {len(failed)} of {len(outcomes)} cases failed (see {out / STATUS_FILE}); fix them "
              "and run the same command again to redo only those", file=sys.stderr, flush=True)
        return 1
    return 0


def _layers(args: argparse.Namespace, loaded) -> list[str]:
    """The layers to evaluate: --layer (each once), else the model card's default."""
    from ..errors import InputError

    layers = list(dict.fromkeys(args.layer)) if args.layer else [loaded.card.default_layer]
    if layers == [None]:
        raise InputError(f"the model card of {loaded.card.name!r} names no default layer; choose one with --layer")
    return layers
