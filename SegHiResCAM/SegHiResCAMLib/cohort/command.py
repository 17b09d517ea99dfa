"""``seghirescam batch``: the command line of :func:`~.runner.explain_cohort`.

The command takes the options of ``seghirescam explain`` that are the same for every case (model,
class, layer, method, target, device, ...), copied from that command's parser so the two never
drift apart, and replaces the per-case ones (``--image``, ``--roi``, ``--roi-label``, ``--out``)
with ``--cases`` and a cohort folder. ``cli.py`` registers it and builds its settings.
"""

from __future__ import annotations

import argparse
import copy
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from ..errors import InputError
from ..settings import ExplainSettings
from .store import FAILED, OK, RESULTS_FILE, CaseResult

Say = Callable[[str], None]
# Options of `explain` that describe one case: `batch` takes them from the cases table instead.
PER_CASE_OPTIONS = {"image", "roi", "roi_label", "out", "png", "help"}


def add_batch_parser(commands: argparse._SubParsersAction, explain: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``batch`` subcommand, with ``explain``'s options for what every case shares."""
    batch = commands.add_parser(
        "batch", help="explain every case of a cohort (a CSV table or a folder of images); rerun to resume",
        description="Explain every case listed in CASES with the same model and settings: one folder of heatmaps "
        "per case under DIR, and DIR/results.csv. Runs on Dask workers when Dask is installed (a local cluster, "
        "or --scheduler), else case after case in this process. Running the same command again skips the "
        "complete cases and redoes the others, so an interrupted cohort resumes where it stopped.",
    )
    batch.add_argument("--cases", required=True, metavar="CSV|DIR",
                       help="a CSV table with a column image (paths relative to the table allowed) and optional "
                       "columns image_2, image_3, ... (further channels, in the model card's order), roi, roi_label, "
                       "case (the id and folder name; default: the image's name) and class; or a folder of images "
                       "(one case per image)")
    batch.add_argument("--out", required=True, metavar="DIR",
                       help="the cohort folder: DIR/<case>/<method>_<layer>.nrrd and DIR/results.csv (new, empty, or "
                       "this cohort's from an earlier run)")
    for action in explain._actions:  # argparse's own way of sharing options (as parents= does)
        if action.dest in PER_CASE_OPTIONS:
            continue
        shared = copy.copy(action)
        if action.dest == "target_class":
            shared.help = "class index or class name (a class column in --cases overrides it per case)"
        elif action.help and "--roi" in action.help:
            shared.help = action.help.replace("with --roi", "for cases with a roi").replace("--roi", "a roi")
        batch._add_action(shared)
    batch.add_argument("--methods", dest="method", nargs="+", action="extend", metavar="M",
                       help="several methods at once (the same as repeating --method)")
    batch.add_argument("--workers", type=int, metavar="N",
                       help="worker processes of the local cluster (default: one per GPU, else two sharing the CPU "
                       "cores); needs Dask")
    batch.add_argument("--scheduler", metavar="ADDRESS",
                       help="run on the Dask cluster whose scheduler is at ADDRESS (tcp://host:8786) instead of a "
                       "local one; its workers must see the model, the images and DIR at the same paths")
    return batch


def run_batch_command(args: argparse.Namespace, settings: ExplainSettings, progress: Callable[[float, str], None],
                      end_progress: Callable[[], None], say: Say, warn: Say, fail: Say) -> int:
    """Run ``seghirescam batch``; returns the exit status (0: every case ok, 1: some failed).

    Args:
        args: the parsed command line.
        settings: the settings built from the options shared with ``explain``.
        progress, end_progress: the progress bar's update and close.
        say, warn, fail: print a line of output, a warning, the closing error line.
    """
    from .cluster import require_dask
    from .runner import explain_cohort

    if args.workers is not None and args.scheduler:
        raise InputError("give --workers (a local cluster) or --scheduler (a running cluster), not both")
    if args.scheduler:
        require_dask("--scheduler")

    def on_result(result: CaseResult) -> None:
        if result.status == FAILED:
            end_progress()
            warn(f"case {result.case} failed: {result.error}")

    def notice(message: str) -> None:
        end_progress()
        say(message)

    try:
        with _sigterm_as_interrupt():
            results = explain_cohort(args.cases, args.model, settings, out=args.out, client=args.scheduler,
                                     workers=args.workers, trust_code=args.trust_code, progress=progress,
                                     on_result=on_result, notice=notice)
    except KeyboardInterrupt:
        end_progress()
        say(f"stopped; the complete cases are kept: run the same command again to finish ({args.out}/{RESULTS_FILE} "
            "lists what is done)")
        raise
    finally:
        end_progress()
    failed = results.with_status(FAILED)
    warned = sum(1 for row in results.with_status(OK) if row.warnings)
    say(f"{len(results.with_status(OK))} of {len(results)} cases explained, {len(failed)} failed; results: {results.path}")
    if warned:
        say(f"{warned} case{'s have' if warned != 1 else ' has'} warnings (see the warnings column)")
    if failed:
        fail(f"{len(failed)} of {len(results)} cases failed (see {results.path}); fix them and run the same command "
             "again to redo only those")
        return 1
    return 0


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (a batch system's time limit, ``kill``) stops the run like Ctrl-C: the results table is
    written and the local cluster closed before the process ends."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGTERM"):
        yield
        return

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
