"""The cohort folder: heatmaps, per-case manifests, the results table, and the resume rule.

Layout of ``DIR``::

    DIR/cohort.json                 the run's fingerprint (settings and model), written first
    DIR/results.csv                 one row per case, rewritten (atomically) as cases finish
    DIR/.cohort.lock                held while a run writes here (a second run is refused)
    DIR/<case>/<method>_<layer>.nrrd  the heatmaps, in the case image's own geometry
    DIR/<case>/manifest.json        written last: the case is complete
    DIR/<case>/attempts.jsonl       one line when a worker starts the case, one when it finished it

Every file is written beside its target and renamed over it (and flushed to disk first), so an
interruption at any moment leaves either the old file or the new one, never half of one.

**The resume rule.** A case is complete when its manifest exists, names the same inputs (the row
of the cases table) and the same cohort fingerprint, and every heatmap it lists exists. A rerun
skips complete cases and redoes every other one (failed, never run, half written, or a row that
changed). A rerun whose fingerprint differs from ``cohort.json`` (other methods, layers, class,
target or model) is refused: mixing two settings in one folder would make a table whose rows
cannot be compared; choose another output folder, or delete this one to start again.
"""

from __future__ import annotations

import csv
import io
import json
import os
import socket
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InputError, StorageError
from .cases import Case
from .job import CohortJob

COHORT_FILE = "cohort.json"
RESULTS_FILE = "results.csv"
LOCK_FILE = ".cohort.lock"
MANIFEST_FILE = "manifest.json"
ATTEMPTS_FILE = "attempts.jsonl"
FORMAT_VERSION = 1

OK, FAILED, SKIPPED = "ok", "failed", "skipped"
NOT_RUN = "not run yet (if the run has stopped, run the same command again to finish)"


@dataclass(frozen=True)
class CaseResult:
    """One row of the results table.

    Attributes:
        case: the case id.
        status: "ok" (heatmaps written, in this run or an earlier one), "failed" (``error`` says
            why; redone by the next run), or "skipped" (not run: the run stopped before it).
        roi_voxels: voxels of the explained region; None unless ok.
        seconds: time the case took (reading, explaining, writing); None unless ok.
        device: where it ran ("cpu", "cuda:0").
        worker: which worker ran it (a Dask worker's address, or "local").
        outputs: method -> heatmap path relative to the cohort folder.
        warnings: what the run warned about (a region resampled, an empty prediction, ...).
        error: why the case failed, in one line.
    """

    case: str
    status: str
    roi_voxels: int | None = None
    seconds: float | None = None
    device: str = ""
    worker: str = ""
    outputs: dict[str, str] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()
    error: str = ""

    def row(self, methods: Sequence[str]) -> dict[str, str]:
        """The row of ``results.csv`` (one output column per method)."""
        row = {"case": self.case, "status": self.status,
               "roi_voxels": "" if self.roi_voxels is None else str(self.roi_voxels),
               "seconds": "" if self.seconds is None else f"{self.seconds:.3f}",
               "device": self.device, "worker": self.worker}
        row.update({output_column(method): self.outputs.get(method, "") for method in methods})
        row.update({"warnings": " | ".join(self.warnings), "error": self.error})
        return row


def output_column(method: str) -> str:
    return f"output_{method}"


def result_columns(methods: Sequence[str]) -> list[str]:
    """The columns of ``results.csv``."""
    return (["case", "status", "roi_voxels", "seconds", "device", "worker"]
            + [output_column(method) for method in methods] + ["warnings", "error"])


@dataclass(frozen=True)
class CohortResults:
    """The results table of a cohort run: one :class:`CaseResult` per case, in the cases' order.

    ``results.path`` is the ``results.csv`` written; ``pandas.read_csv(results.path)`` or
    ``pandas.DataFrame(results.to_dicts())`` make a data frame of it.
    """

    rows: tuple[CaseResult, ...]
    path: Path
    methods: tuple[str, ...]

    def __iter__(self) -> Iterator[CaseResult]:
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    def with_status(self, status: str) -> tuple[CaseResult, ...]:
        return tuple(row for row in self.rows if row.status == status)

    def to_dicts(self) -> list[dict[str, str]]:
        """The rows as ``results.csv`` has them."""
        return [row.row(self.methods) for row in self.rows]


def case_folder(out: str | Path, case_id: str) -> Path:
    return Path(out) / case_id


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` beside ``path``, flush it to disk, and rename it over ``path``.

    Raises:
        StorageError: the file cannot be written (naming it and why).
    """
    partial = path.with_name(f".{path.name}.partial")
    try:
        with partial.open("w", encoding="utf-8", newline="") as stream:
            stream.write(text)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(partial, path)
    except OSError as error:
        raise StorageError(f"cannot write {path} ({error.strerror or error}); check the folder's space and "
                           "permissions") from error
    finally:
        if partial.exists():
            partial.unlink()


def flush_to_disk(path: Path) -> None:
    """Make sure a file written by another library (a heatmap) is on disk before its manifest is."""
    with path.open("rb") as stream:
        os.fsync(stream.fileno())


def append_attempt(out: str | Path, case_id: str, event: str, job: CohortJob, worker: str, **fields: Any) -> None:
    """Add one line to the case's attempt log: ``event`` ("started" or "finished") with the run,
    the worker, its host and process; one small append per line, so lines from several processes
    never mix."""
    record = {"event": event, "run": job.run_id, "worker": worker, "host": socket.gethostname(), "pid": os.getpid(),
              "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **fields}
    path = case_folder(out, case_id) / ATTEMPTS_FILE
    try:
        with path.open("a", encoding="utf-8") as stream:
            stream.write(json.dumps(record) + "\n")
    except OSError as error:
        raise StorageError(f"cannot write {path} ({error.strerror or error}); check the folder's space and "
                           "permissions") from error


def read_attempts(out: str | Path, case_id: str) -> list[dict[str, Any]]:
    """The case's attempt log, oldest first (empty when it never started). A last line without its
    newline is being written (or was cut by a crash) and is left out."""
    path = case_folder(out, case_id) / ATTEMPTS_FILE
    if not path.exists():
        return []
    complete = path.read_text(encoding="utf-8").split("\n")[:-1]
    return [json.loads(line) for line in complete if line.strip()]


def write_manifest(out: str | Path, case: Case, job: CohortJob, result: CaseResult) -> None:
    """Record ``case`` as complete (its heatmaps must be written already); the last file of a case."""
    folder = case_folder(out, case.case_id)
    for relative in result.outputs.values():
        flush_to_disk(Path(out) / relative)
    manifest = {"version": FORMAT_VERSION, "inputs": case.to_dict(), "cohort": job.fingerprint(), "run": job.run_id,
                "outputs": dict(result.outputs), "roi_voxels": result.roi_voxels, "seconds": result.seconds,
                "device": result.device, "worker": result.worker, "warnings": list(result.warnings)}
    write_atomic(folder / MANIFEST_FILE, json.dumps(manifest, indent=1) + "\n")


def read_manifest(out: str | Path, case_id: str) -> dict[str, Any] | None:
    """The case's manifest, or None when there is none (or it cannot be read: then it is redone)."""
    path = case_folder(out, case_id) / MANIFEST_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def completed_result(out: str | Path, case: Case, job: CohortJob, fingerprint: dict[str, Any] | None = None
                     ) -> CaseResult | None:
    """The case's result when it is complete (see the module's resume rule), else None.

    ``fingerprint``: ``job.fingerprint()`` computed once by a caller checking many cases.
    """
    manifest = read_manifest(out, case.case_id)
    if manifest is None or manifest.get("version") != FORMAT_VERSION:
        return None
    if manifest.get("inputs") != case.to_dict():
        return None
    if manifest.get("cohort") != (fingerprint if fingerprint is not None else job.fingerprint()):
        return None
    outputs = manifest.get("outputs")
    methods = list(job.settings.methods)
    if not isinstance(outputs, dict) or sorted(outputs) != sorted(methods):
        return None
    if not all(isinstance(p, str) and (Path(out) / p).is_file() for p in outputs.values()):
        return None
    return CaseResult(case=case.case_id, status=OK, roi_voxels=manifest.get("roi_voxels"),
                      seconds=manifest.get("seconds"), device=str(manifest.get("device", "")),
                      worker=str(manifest.get("worker", "")), outputs={m: outputs[m] for m in methods},
                      warnings=tuple(manifest.get("warnings") or ()))


class CohortStore:
    """The cohort folder as one run holds it: locked, its fingerprint checked, its table written.

    Use as a context manager (``with CohortStore.open(job) as store:``); leaving it releases the lock.
    """

    def __init__(self, out: Path, lock: io.TextIOBase) -> None:
        self.out = out
        self._lock = lock

    @classmethod
    def open(cls, job: CohortJob) -> CohortStore:
        """Take the folder ``job.out`` for this run.

        Creates it if needed; refuses a folder that is not empty and holds no cohort, one that
        another run is writing to, and one whose cohort was explained with another fingerprint.

        Raises:
            InputError: naming the folder, what is wrong and what to do.
            StorageError: the folder cannot be created or written.
        """
        out = Path(job.out)
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise StorageError(f"cannot create the output folder {out} ({error.strerror or error})") from error
        fingerprint = job.fingerprint()
        recorded = _read_cohort_file(out)
        if recorded is None:
            foreign = sorted(p.name for p in out.iterdir() if p.name not in (LOCK_FILE, f".{COHORT_FILE}.partial"))
            if foreign:
                raise InputError(f"the output folder {out} is not empty and holds no cohort ({', '.join(foreign[:5])}"
                                 f"{', ...' if len(foreign) > 5 else ''}); choose a new or empty folder")
        lock = _take_lock(out)
        try:
            if recorded is not None and recorded.get("cohort") != fingerprint:
                raise InputError(f"the output folder {out} holds a cohort explained with other settings "
                                 f"({_differences(recorded.get('cohort'), fingerprint)}); choose another output "
                                 "folder to keep both, or delete this one to start again")
            if recorded is None:
                write_atomic(out / COHORT_FILE, json.dumps(
                    {"version": FORMAT_VERSION, "cohort": fingerprint}, indent=1) + "\n")
        except BaseException:
            lock.close()
            raise
        return cls(out, lock)

    def write_results(self, rows: Sequence[CaseResult], methods: Sequence[str]) -> Path:
        """Rewrite ``results.csv`` (atomically) with ``rows``."""
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=result_columns(methods), lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow(row.row(methods))
        path = self.out / RESULTS_FILE
        write_atomic(path, buffer.getvalue())
        return path

    def close(self) -> None:
        """Release the folder (another run may take it)."""
        if not self._lock.closed:
            self._lock.close()

    def __enter__(self) -> CohortStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _read_cohort_file(out: Path) -> dict[str, Any] | None:
    path = out / COHORT_FILE
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise InputError(f"cannot read {path} ({error}); delete the folder {out} to start the cohort again") from error
    if not isinstance(data, dict) or data.get("version") != FORMAT_VERSION:
        raise InputError(f"{path} was written by another version of SegHiResCAM; choose a new output folder")
    return data


def _take_lock(out: Path) -> io.TextIOBase:
    """An open lock file that this process holds exclusively (the system releases it if the process dies)."""
    path = out / LOCK_FILE
    handle = path.open("a+", encoding="utf-8")
    try:
        if os.name == "nt":
            import msvcrt

            handle.seek(0)
            msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
        else:
            import fcntl

            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        handle.seek(0)
        holder = handle.read().strip() if os.name != "nt" else ""
        handle.close()
        raise InputError(f"another seghirescam batch is writing to {out}{f' ({holder})' if holder else ''}; wait "
                         "for it to finish, or choose another output folder") from error
    if os.name != "nt":  # on Windows the locked byte cannot be rewritten through this handle
        handle.seek(0)
        handle.truncate()
        handle.write(f"process {os.getpid()} on {socket.gethostname()}\n")
        handle.flush()
    return handle


def _differences(before: Any, now: dict[str, Any]) -> str:
    """What changed between two fingerprints, in words."""
    if not isinstance(before, dict):
        return "unreadable fingerprint"
    changes = []
    old_settings, new_settings = before.get("settings") or {}, now["settings"]
    for key in sorted(set(old_settings) | set(new_settings)):
        if old_settings.get(key) != new_settings.get(key):
            changes.append(f"{key} {old_settings.get(key)!r} before, {new_settings.get(key)!r} now")
    old_model, new_model = before.get("model") or {}, now["model"]
    if old_model.get("path") != new_model["path"]:
        changes.append(f"model {old_model.get('path')} before, {new_model['path']} now")
    elif old_model.get("files") != new_model["files"]:
        changes.append(f"the model's files at {new_model['path']} changed (size or modification time)")
    return "; ".join(changes) or "unknown differences"
