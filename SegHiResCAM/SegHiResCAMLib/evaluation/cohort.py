"""``seghirescam evaluate --cases``: every case of a cohort scored, one table and one report across them.

The cases come from the same table as ``seghirescam batch`` (:mod:`SegHiResCAMLib.cohort.cases`).
Layout of the output folder ``DIR``::

    DIR/evaluation.json         what decides the values (settings, model, class, layers), written first
    DIR/cases/<case>/           the case's own report: report.html, metrics.csv, pictures, 3D view
    DIR/cases/<case>/case.json  written last: the case is complete
    DIR/metrics.csv             every complete case's rows: case, method, layer, metric, value
    DIR/cases.csv               case, status (ok, failed), error, warnings
    DIR/report.html             the tables across cases with paired comparisons; links to each case's report

**The resume rule** (as ``seghirescam batch``'s): a case is complete when its ``case.json`` names
the same row of the cases table and the same ``evaluation.json``, and its ``metrics.csv`` exists.
Running the same command again skips complete cases and redoes the others (failed, never run,
half written, or a row that changed); other settings for the same ``DIR`` are refused. A case
that fails (a missing file, an empty region, an unknown class) is recorded with its one-line
reason and the others go on. The cases run one after another in this process: each case already
times and measures every map it computes (the cost metrics), which parallel workers would skew.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InputError, InternalError, SegHiResCAMError, internal_error_line, one_line
from .report import ReportInfo, metrics_csv_text, read_metrics_csv, write_report
from .suite import EvaluationSettings

EVALUATION_FILE = "evaluation.json"
CASE_FILE = "case.json"
CASES_FOLDER = "cases"
STATUS_FILE = "cases.csv"
OK, FAILED = "ok", "failed"
FORMAT_VERSION = 1
# Settings that change how a value is computed, not what it is (the cost metrics aside).
HOW_FIELDS = ("device",)
REPORT_ADVICE = "rerun this case alone with 'seghirescam --debug evaluate --image ...' and report the traceback"


@dataclass(frozen=True)
class CohortEvaluation:
    """What every case shares: the model and its facts, the settings, the default class, the layers.

    Attributes:
        loaded: the model (``LoadedModel``), loaded once for the cohort.
        model: the model's path as given.
        settings: the evaluation's settings.
        target_class: the class of cases whose row names none (index or name).
        layers: the layers evaluated, each on its own.
        random_labels: a model trained on permuted labels (data randomisation), or None.
        random_labels_path: its path (part of the fingerprint), or None.
    """

    loaded: Any
    model: str
    settings: EvaluationSettings
    target_class: int | str
    layers: tuple[str, ...]
    random_labels: Any = None
    random_labels_path: str | None = None

    def fingerprint(self) -> dict[str, Any]:
        """What decides the values of every case (JSON): settings without :data:`HOW_FIELDS`, model, class, layers."""
        from ..cohort.job import model_identity

        settings = {key: value for key, value in asdict(self.settings).items() if key not in HOW_FIELDS}
        other = None if self.random_labels_path is None else model_identity(self.random_labels_path)
        return json.loads(json.dumps({"version": FORMAT_VERSION, "settings": settings,
                                      "model": model_identity(self.model), "class": self.target_class,
                                      "layers": list(self.layers), "random_labels_model": other}))


@dataclass
class CaseOutcome:
    """One case of the cohort: its status, rows of the long table, warnings, or why it failed."""

    case: str
    status: str
    rows: list[tuple[str, str, str, str, float]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    error: str = ""
    class_name: str = ""


def check_cohort_folder(out: str | Path, fingerprint: dict[str, Any]) -> Path:
    """The cohort's output folder, checked before any case runs: new, empty, or this evaluation's.

    Raises:
        InputError: a file, a folder holding other files, or an evaluation with other settings.
    """
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise InputError(f"the output {path} is a file; give a folder for the cohort's report")
    if path.is_dir() and any(path.iterdir()):
        before = _read_json(path / EVALUATION_FILE)
        if before is None:
            raise InputError(f"the output folder {path} holds files that are not an evaluation's; choose a new folder "
                             "or empty it")
        if before != fingerprint:
            changed = sorted(key for key in fingerprint if before.get(key) != fingerprint[key])
            raise InputError(f"the output folder {path} holds an evaluation with other {', '.join(changed)}; choose "
                             "another folder, or delete this one to start again (values from two settings cannot be "
                             "compared)")
    try:
        (path / CASES_FOLDER).mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise InputError(f"cannot write the report to {path}: {error.strerror or error}") from error
    _write_text(path / EVALUATION_FILE, json.dumps(fingerprint, indent=1))
    return path


def evaluate_cohort(cases: Sequence, job: CohortEvaluation, out: str | Path, *, viewer: bool = True,
                    on_case: Callable[[CaseOutcome], None] | None = None,
                    progress: Callable[[float, str], None] | None = None) -> list[CaseOutcome]:
    """Evaluate every case not complete yet; write the per-case reports and the cohort's table and report.

    Args:
        cases: the cohort's :class:`~SegHiResCAMLib.cohort.cases.Case` rows (read and checked).
        job: what every case shares.
        out: the cohort folder (checked by :func:`check_cohort_folder`).
        viewer: put the interactive 3D view into each case's report.
        on_case: called with each case's outcome as it finishes (or is found complete).
        progress: ``progress(fraction, message)`` over the cohort.

    Returns:
        One :class:`CaseOutcome` per case, in the table's order.
    """
    out = Path(out)
    fingerprint = job.fingerprint()
    outcomes: list[CaseOutcome] = []
    for index, case in enumerate(cases):
        def case_progress(fraction: float, message: str, index: int = index) -> None:
            if progress is not None:
                progress((index + fraction) / len(cases), message)

        outcome = completed_case(out, case, fingerprint)
        if outcome is None:
            outcome = _run_case(case, job, out, fingerprint, viewer, case_progress)
        outcomes.append(outcome)
        if on_case is not None:
            on_case(outcome)
    write_cohort_files(out, outcomes, job)
    return outcomes


def completed_case(out: Path, case, fingerprint: dict[str, Any]) -> CaseOutcome | None:
    """The case's outcome when it is complete under the resume rule, else None."""
    folder = out / CASES_FOLDER / case.case_id
    record = _read_json(folder / CASE_FILE)
    if record is None or record.get("row") != _row(case) or record.get("evaluation") != fingerprint:
        return None
    if not (folder / "metrics.csv").is_file():
        return None
    return CaseOutcome(case.case_id, OK, read_metrics_csv(folder / "metrics.csv"), list(record.get("warnings", [])),
                       class_name=record.get("class_name", ""))


def _run_case(case, job: CohortEvaluation, out: Path, fingerprint: dict[str, Any], viewer: bool,
              progress: Callable[[float, str], None]) -> CaseOutcome:
    """Evaluate one case into ``out/cases/<case>/``; a problem with the case is its failure, not the cohort's."""
    folder = out / CASES_FOLDER / case.case_id
    try:
        if folder.exists():  # a case half done by an interrupted run, or a failed one: ours to redo
            shutil.rmtree(folder)
        outcome = _evaluate(case, job, folder, viewer, progress)
        _write_text(folder / CASE_FILE, json.dumps({"row": _row(case), "evaluation": fingerprint,
                                                    "warnings": outcome.warnings,
                                                    "class_name": outcome.class_name}, indent=1))
        return outcome
    except InternalError as error:
        return CaseOutcome(case.case_id, FAILED, error=internal_error_line(error, REPORT_ADVICE))
    except SegHiResCAMError as error:
        return CaseOutcome(case.case_id, FAILED, error=one_line(error))


def _evaluate(case, job: CohortEvaluation, folder: Path, viewer: bool,
              progress: Callable[[float, str], None]) -> CaseOutcome:
    from ..io.channels import read_channels
    from ..io.images import read_mask
    from ..pictures import region_label
    from ..pipeline import resolve_class
    from .suite import evaluate_case

    target = job.target_class if case.target_class is None else case.target_class
    class_index = resolve_class(target, job.loaded.card.class_names)
    image = read_channels(case.images)
    roi = None if case.roi is None else read_mask(case.roi, image, label=case.roi_label)
    result = evaluate_case(job.loaded, image, case=case.case_id, target_class=class_index, layers=job.layers,
                           roi=roi, settings=job.settings, random_labels_model=job.random_labels, progress=progress)
    class_name = class_label(class_index, job.loaded.card.class_names)
    info = ReportInfo(model=model_label(job), class_name=class_name,
                      region=region_label(case.roi, case.roi_label), settings=job.settings)
    write_report(folder, [result], info, viewer=viewer)
    return CaseOutcome(case.case_id, OK, list(result.rows), list(result.warnings), class_name=class_name)


def write_cohort_files(out: Path, outcomes: Sequence[CaseOutcome], job: CohortEvaluation) -> Path:
    """Write ``metrics.csv``, ``cases.csv`` and ``report.html`` of the cohort (each replaced whole); returns the report."""
    from .report import cohort_page

    done = [o for o in outcomes if o.status == OK]
    rows = [row for outcome in done for row in outcome.rows]
    _write_text(out / "metrics.csv", metrics_csv_text(rows))
    status = io.StringIO()
    writer = csv.writer(status)
    writer.writerow(["case", "status", "error", "warnings"])
    for outcome in outcomes:
        writer.writerow([outcome.case, outcome.status, outcome.error, " | ".join(outcome.warnings)])
    _write_text(out / STATUS_FILE, status.getvalue())
    classes = sorted({o.class_name for o in done}) or [str(job.target_class)]
    info = ReportInfo(model=model_label(job), class_name=", ".join(classes),
                      region="each case's own (see its report)", settings=job.settings)
    failed = {o.case: o.error for o in outcomes if o.status == FAILED}
    page = cohort_page([o.case for o in done], sorted({w for o in done for w in o.warnings}), rows, info,
                       {o.case: f"{CASES_FOLDER}/{o.case}/report.html" for o in done}, failed)
    _write_text(out / "report.html", page)
    return out / "report.html"


def model_label(job: CohortEvaluation) -> str:
    """The model as the report names it: the card's name and the file."""
    return f"{job.loaded.card.name} ({Path(job.model).name})"


def class_label(index: int, names: Sequence[str]) -> str:
    """``2 (white matter)``, or ``2`` when the card names no class."""
    return f"{index} ({names[index]})" if index < len(names) else str(index)


def _row(case) -> dict[str, Any]:
    return json.loads(json.dumps(case.to_dict()))


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _write_text(path: Path, text: str) -> None:
    from ..cohort.store import write_atomic

    write_atomic(path, text)
