"""What a worker does with one case: load the model once per process, explain, record.

:func:`run_case` runs wherever the case is scheduled: in a Dask worker process, or in the
command's own process when Dask is absent. It goes through the same application service as
``seghirescam explain`` (:func:`~SegHiResCAMLib.service.run_request`), with the model taken from a
per-process cache (keyed by the model path, the trust flag and the device), so a worker loads the
model for its first case only. A problem with the case (a missing file, an empty region, a class
the model lacks) becomes a failed :class:`~.store.CaseResult`, never an exception, so the cohort
goes on; an exception leaving this function is a bug, or the worker dying.
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path
from typing import Any

from ..errors import InternalError, SegHiResCAMError, StorageError, internal_error_line, one_line
from .cases import Case
from .job import CohortJob, output_names
from .store import (FAILED, MANIFEST_FILE, OK, CaseResult, append_attempt, case_folder, completed_result,
                    write_manifest)

#: How a user reports an internal error met by one case of a cohort.
REPORT_ADVICE = "rerun this case alone with 'seghirescam --debug explain' and report the traceback it prints"

_MODELS: dict[tuple[str, bool, str, str], Any] = {}
_MODELS_LOCK = threading.Lock()


def cached_model(job: CohortJob, device: str) -> tuple[Any, bool]:
    """The job's model, loaded once per process and kept on the device it runs on.

    The cache is keyed by the model's path, the trust flag, the device and the digest of the model's
    files (a model retrained under the same path is loaded again, never served stale); it keeps
    one model, the last one asked for.

    Returns:
        ``(loaded, was_cached)``: the ``LoadedModel``, and whether an earlier case had loaded it.
    """
    from ..engine.device import resolve_device
    from ..service import load_model_for

    resolved = str(resolve_device(device))
    key = (job.model, job.trust_code, resolved, job.fingerprint()["model"]["files"])
    with _MODELS_LOCK:
        if key in _MODELS:
            return _MODELS[key], True
        _MODELS.clear()  # one cohort at a time per worker: free the previous model first
        loaded = load_model_for(job.model, trust_code=job.trust_code)
        # Kept on its device: the engine then moves nothing per case (it restores what it finds).
        loaded.module.to(resolved)
        _MODELS[key] = loaded
        return loaded, False


def release_models() -> None:
    """Forget the cached model (a process that goes on after its cohort gives the memory back)."""
    with _MODELS_LOCK:
        _MODELS.clear()


def worker_name() -> str:
    """The Dask worker running this code (its address), or "local" outside Dask."""
    if sys.modules.get("distributed") is not None:  # only where Dask is already in use
        try:
            from distributed import get_worker

            return str(get_worker().address)
        except ValueError:  # not inside a Dask worker
            pass
    return "local"


def run_case(case: Case, job: CohortJob) -> CaseResult:
    """Explain one case into ``<job.out>/<case>/`` and record it complete (or failed).

    A case already complete (a worker that died after finishing it, then retried) is not redone.
    The case's attempt log gets a "started" line, then a "finished" or a "failed" one.
    """
    worker = worker_name()
    done = completed_result(job.out, case, job)
    if done is not None:
        return done
    started = False
    try:
        _prepare_folder(case_folder(job.out, case.case_id))
        append_attempt(job.out, case.case_id, "started", job, worker)
        started = True
        record, model_state = _explain_case(case, job, worker)
        write_manifest(job.out, case, job, record)
        append_attempt(job.out, case.case_id, "finished", job, worker, model=model_state, threads=_threads())
        return record
    except InternalError as error:
        failed = CaseResult(case=case.case_id, status=FAILED, worker=worker,
                            error=internal_error_line(error, REPORT_ADVICE))
    except SegHiResCAMError as error:
        failed = CaseResult(case=case.case_id, status=FAILED, worker=worker, error=one_line(error))
    if started:
        append_attempt(job.out, case.case_id, "failed", job, worker, error=failed.error)
    return failed


def _prepare_folder(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / MANIFEST_FILE).unlink(missing_ok=True)  # a stale manifest must not vouch for new files
    except OSError as error:
        raise StorageError(f"cannot prepare the case folder {folder} ({error.strerror or error}); check the "
                           "output folder's space and permissions") from error


def _explain_case(case: Case, job: CohortJob, worker: str) -> tuple[CaseResult, str]:
    """The case explained, and whether its model was "loaded" for it or "cached" from an earlier case."""
    from ..pipeline import settings_for_model
    from ..service import run_request
    from ..worker.protocol import ExplainRequest

    folder = case_folder(job.out, case.case_id)
    settings = job.settings_for(case)
    if job.threads is not None:
        _set_threads(job.threads)
    loaded, cached = cached_model(job, settings.device)
    names = output_names(settings.methods, settings_for_model(settings, loaded.card).layers)
    request = ExplainRequest(images=case.images, model=job.model, settings=settings, roi=case.roi,
                             roi_label=case.roi_label, trust_code=job.trust_code,
                             outputs=tuple(str(folder / names[method]) for method in settings.methods))
    warnings: list[str] = []
    result = run_request(request, warn=warnings.append, model=loaded)
    record = CaseResult(case=case.case_id, status=OK, roi_voxels=result.roi_voxels, seconds=round(result.seconds, 3),
                        device=result.device, worker=worker,
                        outputs={method: f"{case.case_id}/{names[method]}" for method in settings.methods},
                        warnings=tuple(warnings))
    return record, "cached" if cached else "loaded"


def _set_threads(threads: int) -> None:
    import torch

    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def _threads() -> int | None:
    torch = sys.modules.get("torch")
    return torch.get_num_threads() if torch is not None else None
