"""Run a cohort: skip the complete cases, run the others on Dask or in this process, keep the table.

:func:`explain_cohort` is the entry point for notebooks and the command line (``seghirescam
batch``). It checks the cases and the model before anything starts, then runs every case that is
not complete yet (see :mod:`.store` for the resume rule) through :func:`.work.run_case`:

- on a Dask cluster: a ``distributed.Client`` or a scheduler address given by the caller, or
  else a local cluster started for the run and closed after it (:mod:`.cluster`);
- in this process, one case after another, when Dask is not installed (same outputs, same
  resume rule).

``results.csv`` is rewritten as cases finish (at most once a second, and always at the end, also
when the run is interrupted: the cases it did not reach are "skipped").
"""

from __future__ import annotations

import dataclasses
import logging
import time
import uuid
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InputError, SegHiResCAMWarning, internal_error_line, one_line
from ..progress import ProgressCallback
from ..settings import ExplainSettings
from .cases import Case, read_cases
from .cluster import EXTRA_HINT, dashboard_address, dask_available, local_client, offers_gpus, plan_local, \
    scheduler_client
from .job import CohortJob
from .meter import CohortMeter
from .store import FAILED, NOT_RUN, SKIPPED, CaseResult, CohortResults, CohortStore, completed_result
from .work import REPORT_ADVICE, release_models, run_case

logger = logging.getLogger(__name__)

ResultCallback = Callable[[CaseResult], None]
NoticeCallback = Callable[[str], None]
# results.csv is rewritten at most this often while cases finish (and always at the end).
RESULTS_INTERVAL_SECONDS = 1.0
WORKER_CANNOT_IMPORT = ("a Dask worker could not run the case ({error}); install seghirescam (the same version) in "
                        "the workers' environment, as in this command's")
WORKER_DIED = ("the worker running this case died {runs} times (out of memory, or a crash in a library); it was not "
               "tried again: run it alone with 'seghirescam explain' to see why")


def explain_cohort(
    cases: str | Path | Iterable[Case | Mapping[str, Any]],
    model: str | Path,
    settings: ExplainSettings,
    *,
    out: str | Path,
    client: Any = None,
    workers: int | None = None,
    trust_code: bool = False,
    progress: ProgressCallback | None = None,
    on_result: ResultCallback | None = None,
    notice: NoticeCallback | None = None,
) -> CohortResults:
    """Explain every case of a cohort; write ``out/<case>/<method>_<layer>.nrrd`` and ``out/results.csv``.

    Running it again with the same arguments finishes an interrupted cohort: complete cases are
    skipped, failed and unfinished ones are redone; other settings for the same ``out`` are refused.

    Args:
        cases: a CSV table of cases, a folder of images, or :class:`Case` objects (see :mod:`.cases`).
        model: the model file or folder (as for ``seghirescam explain``); every worker must see it
            at this path, as it must the images and ``out``.
        settings: what to explain; ``target_class`` is the class of cases that name none.
        out: the cohort folder (created; a folder holding anything but this cohort is refused).
        client: a ``distributed.Client``, or a scheduler address ("tcp://host:8786"), to run on;
            None starts a local cluster (bound to 127.0.0.1) for the run and closes it afterwards,
            or runs in this process when Dask is not installed.
        workers: worker processes of the local cluster (None: one per GPU, else two sharing the cores).
        trust_code: allow running code that comes with the model.
        progress: ``progress(fraction, message)`` as cases finish (message: count, rate, time left).
        on_result: called with each case's :class:`~.store.CaseResult` as it finishes.
        notice: receives one-line facts about the run (where it runs, the dashboard's address);
            None: the logger, and a warning when Dask is missing.

    Returns:
        The results table (:class:`~.store.CohortResults`), one row per case in the cases' order.

    Raises:
        InputError: bad cases, a missing model, a model needing ``trust_code``, an output folder
            that is not this cohort's (or is in use), an unreachable scheduler.
        MissingDependencyError: a scheduler address was given but Dask is not installed.
        KeyboardInterrupt: the run was interrupted (``results.csv`` was written first).
    """
    if client is not None and workers is not None:
        raise InputError("give workers (a local cluster) or a client (a running cluster), not both")
    case_list = read_cases(cases)
    job = prepare_job(model, settings, out, trust_code)
    reports = Reports(progress, on_result, notice)
    if client is not None:
        return _on_client(case_list, job, client, reports)
    if not dask_available():
        return _in_this_process(case_list, job, reports)
    return _on_local_cluster(case_list, job, workers, reports)


@dataclass(frozen=True)
class Reports:
    """Where a run reports: ``progress(fraction, message)`` as cases finish, ``on_result(row)`` per
    case, ``notice(line)`` for facts about the run (None: the logger)."""

    progress: ProgressCallback | None = None
    on_result: ResultCallback | None = None
    notice: NoticeCallback | None = None

    def tell(self, message: str) -> None:
        (self.notice or logger.info)(message)

    def finished(self, result: CaseResult, meter: CohortMeter) -> None:
        if self.on_result is not None:
            self.on_result(result)
        self.moved(meter)

    def moved(self, meter: CohortMeter) -> None:
        if self.progress is not None:
            self.progress(meter.fraction, meter.message())


def prepare_job(model: str | Path, settings: ExplainSettings, out: str | Path, trust_code: bool = False) -> CohortJob:
    """The run's :class:`~.job.CohortJob`, after the checks that need no worker.

    Raises:
        InputError: the model does not exist, or it is code and ``trust_code`` is off.
    """
    from ..models.trust import code_to_trust

    source = Path(model).expanduser().resolve()
    if not source.exists():
        raise InputError(f"the model {source} does not exist; check the path")
    if not trust_code:
        reason = code_to_trust(source)
        if reason:
            raise InputError(reason)
    return CohortJob(model=str(source), settings=settings, out=str(Path(out).expanduser().resolve()),
                     trust_code=trust_code, run_id=uuid.uuid4().hex[:12])


def run_cohort(cases: Sequence[Case], job: CohortJob, executor: Any, reports: Reports | None = None) -> CohortResults:
    """Run the cases that are not complete on ``executor`` (:class:`InProcess` or :class:`OnDask`)
    and keep ``results.csv`` up to date; the store's lock is held throughout."""
    methods = job.settings.methods
    with CohortStore.open(job) as store:
        fingerprint = job.fingerprint()
        rows: dict[str, CaseResult] = {}
        todo = []
        for case in cases:
            done = completed_result(job.out, case, job, fingerprint)
            rows[case.case_id] = done or CaseResult(case=case.case_id, status=SKIPPED, error=NOT_RUN)
            if done is None:
                todo.append(case)
        meter = CohortMeter(total=len(cases), done_before=len(cases) - len(todo))
        last_write = time.monotonic()
        store.write_results([rows[case.case_id] for case in cases], methods)
        reports = reports or Reports()
        reports.moved(meter)

        def deliver(result: CaseResult) -> None:
            nonlocal last_write
            rows[result.case] = result
            meter.add(result)
            if time.monotonic() - last_write >= RESULTS_INTERVAL_SECONDS:
                store.write_results([rows[case.case_id] for case in cases], methods)
                last_write = time.monotonic()
            reports.finished(result, meter)

        try:
            executor.run(todo, job, deliver)
        finally:
            path = store.write_results([rows[case.case_id] for case in cases], methods)
        return CohortResults(tuple(rows[case.case_id] for case in cases), path, methods)


class InProcess:
    """Run the cases one after another in this process (the model loaded once)."""

    def run(self, todo: Sequence[Case], job: CohortJob, deliver: ResultCallback) -> None:
        try:
            for case in todo:
                try:
                    result = run_case(case, job)
                except Exception as error:  # noqa: BLE001 - a bug in one case is that case's failure, recorded
                    result = _failed(case, internal_error_line(error, REPORT_ADVICE, "explaining the case"))
                deliver(result)
        finally:
            release_models()  # this process goes on after the cohort: give its memory back


class OnDask:
    """Run each case as one Dask task (GPU=1 where the workers offer GPUs and the device is not the CPU).

    A worker that dies mid-case has its case run again elsewhere, as often as the scheduler allows
    (the local cluster: twice); after that the case is recorded as failed.
    """

    def __init__(self, client: Any) -> None:
        self.client = client

    def run(self, todo: Sequence[Case], job: CohortJob, deliver: ResultCallback) -> None:
        from distributed import as_completed
        from distributed.scheduler import KilledWorker

        resources = {"GPU": 1} if job.settings.device != "cpu" and offers_gpus(self.client) else None
        futures = {self.client.submit(run_case, case, job, key=f"seghirescam-{job.run_id}-{case.case_id}",
                                      pure=False, retries=0, resources=resources): case for case in todo}
        try:
            for future in as_completed(futures, loop=self.client.loop):
                case = futures[future]
                try:
                    result = future.result()
                except KilledWorker as error:
                    runs = getattr(error, "allowed_failures", 2) + 1
                    result = _failed(case, WORKER_DIED.format(runs=runs))
                except ImportError as error:  # the worker could not unpickle the task: its environment lacks us
                    result = _failed(case, WORKER_CANNOT_IMPORT.format(error=one_line(error)))
                except Exception as error:  # noqa: BLE001 - a bug in one case is that case's failure, recorded
                    result = _failed(case, internal_error_line(error, REPORT_ADVICE, "explaining the case"))
                deliver(result)
        finally:
            pending = [future for future in futures if not future.done()]
            if pending:
                self.client.cancel(pending)


def _on_client(cases: Sequence[Case], job: CohortJob, client: Any, reports: Reports) -> CohortResults:
    if isinstance(client, str):
        with scheduler_client(client) as connected:
            return _on_dask(cases, job, connected, reports, where=f"the scheduler {client}")
    return _on_dask(cases, job, client, reports, where="the given Dask cluster")


def _in_this_process(cases: Sequence[Case], job: CohortJob, reports: Reports) -> CohortResults:
    message = f"Dask is not installed, so the cases run one after another in this process; for parallel workers: {EXTRA_HINT}"
    if reports.notice is None:
        warnings.warn(message, SegHiResCAMWarning, stacklevel=3)
    else:
        reports.notice(message)
    if job.settings.device.startswith("cuda"):
        from ..engine.device import resolve_device

        resolve_device(job.settings.device)  # no GPU here: refused now, not once per case
    return run_cohort(cases, job, InProcess(), reports)


def _on_local_cluster(cases: Sequence[Case], job: CohortJob, workers: int | None, reports: Reports) -> CohortResults:
    plan = plan_local(workers, job.settings.device)
    reports.tell(f"starting {plan.describe()}")
    with local_client(plan) as local:
        return _on_dask(cases, dataclasses.replace(job, threads=plan.threads), local, reports, local=True)


def _on_dask(cases: Sequence[Case], job: CohortJob, client: Any, reports: Reports, where: str | None = None,
             local: bool = False) -> CohortResults:
    if where:
        reports.tell(f"running on {where}")
    dashboard = dashboard_address(client, local)
    if dashboard:
        reports.tell(f"Dask dashboard: {dashboard}")
    if not client.scheduler_info().get("workers"):
        reports.tell("the scheduler has no workers yet; the cases wait for workers to join")
    return run_cohort(cases, job, OnDask(client), reports)


def _failed(case: Case, error: str) -> CaseResult:
    return CaseResult(case=case.case_id, status=FAILED, error=error)
