"""Dask for a cohort: is it installed, a local cluster on this machine, or a client of a given scheduler.

The local cluster binds to 127.0.0.1 only (nothing outside the machine can reach it) and runs one
worker process per GPU (each sees only its own GPU, and offers the resource ``GPU=1``), or on a
machine without GPUs ``workers`` processes sharing the CPU cores between them. Its scheduler lets
a case run at most three times (two retries) when the worker running it dies; the dashboard is
served (on 127.0.0.1) only when bokeh is installed. Dask (``pip install 'seghirescam[cohort]'``) is
imported only here and in the runner, and only when used.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from ..errors import InputError, MissingDependencyError, one_line
from ..worker.launcher import FAST_ALLOCATOR

logger = logging.getLogger(__name__)

EXTRA_HINT = "pip install 'seghirescam[cohort]'"
#: Retries of a case whose worker died (the scheduler's "allowed failures"): three runs at most.
RETRIES_AFTER_WORKER_DEATH = 2
LOOPBACK = "127.0.0.1"
# Local CPU workers by default. Two beat one on every core: a case also reads and writes files on
# one core, and a Dask worker's own threads stall torch's all-core steps (bench/bench_cohort.py on
# 2 cores: 87 cases/min for 2 workers x 1 thread, 33 for 1 x 2, 45 for a plain loop). Not more, so
# that the memory of large volumes stays that of two cases at a time; --workers asks for others.
CPU_WORKERS = 2
# Variables the nanny sets in its own process before it starts each worker (see _kept_environment).
_THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def dask_available() -> bool:
    """Whether ``dask.distributed`` can be imported (the ``cohort`` extra is installed)."""
    try:
        import distributed  # noqa: F401
    except ImportError:
        return False
    return True


def require_dask(why: str) -> None:
    """Raise MissingDependencyError naming the extra, when Dask is absent.

    Args:
        why: what needs Dask ("--scheduler"), for the message.
    """
    if not dask_available():
        raise MissingDependencyError(f"{why} needs Dask, which is not installed; {EXTRA_HINT}")


def cpu_count() -> int:
    """The CPU cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def gpu_count(device: str) -> int:
    """GPUs the cohort's local workers share out, one each: none for "cpu" or a fixed "cuda:N".

    Raises:
        InputError: a GPU was asked for and torch sees none (refused before any worker starts).
    """
    if device == "cpu":
        return 0
    from ..engine.device import resolve_device  # imports torch; CUDA itself is not initialised here

    resolve_device(device)
    import torch

    return torch.cuda.device_count() if device in ("auto", "cuda") and torch.cuda.is_available() else 0


@dataclass(frozen=True)
class LocalPlan:
    """The shape of a local cluster: ``workers`` processes, ``threads`` torch threads each, and
    ``gpus`` GPUs (0, or one per worker)."""

    workers: int
    threads: int
    gpus: int

    def describe(self) -> str:
        if self.gpus:
            return f"{self.workers} local worker{'s' if self.workers != 1 else ''}, one GPU each"
        return (f"{self.workers} local worker{'s' if self.workers != 1 else ''}, {self.threads} CPU "
                f"thread{'s' if self.threads != 1 else ''} each")


def plan_local(workers: int | None, device: str) -> LocalPlan:
    """How many workers and threads a local cluster gets.

    Args:
        workers: worker processes; None = one per GPU, or on a machine without GPUs
            :data:`CPU_WORKERS` (one on a single core), each with its share of the cores.
        device: the settings' device ("auto", "cpu", "cuda", "cuda:N").
    """
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise InputError(f"the number of workers must be a positive number, got {workers!r}")
    gpus = gpu_count(device)
    count = workers if workers is not None else (gpus or min(CPU_WORKERS, cpu_count()))
    if gpus and count > gpus:
        raise InputError(f"{count} workers were asked for but this machine has {gpus} GPU"
                         f"{'s' if gpus != 1 else ''} (one worker each); give --workers {gpus} or fewer, or "
                         "--device cpu")
    return LocalPlan(workers=count, threads=max(1, cpu_count() // count), gpus=count if gpus else 0)


@contextmanager
def local_client(plan: LocalPlan) -> Iterator[Any]:
    """A Dask client of a fresh local cluster, closed (with its workers and scratch folder) on exit."""
    require_dask("a local cluster")
    import dask
    from distributed import Client, Nanny, Scheduler, SpecCluster

    scratch = tempfile.mkdtemp(prefix="seghirescam-dask-")
    # The scheduler's HTTP server (the dashboard when bokeh is installed) on loopback too: without
    # an address it would listen on every interface.
    scheduler = {"cls": Scheduler, "options": {
        "host": LOOPBACK, "port": 0, "dashboard_address": f"{LOOPBACK}:0",
        "allowed_failures": RETRIES_AFTER_WORKER_DEATH}}
    workers = {index: {"cls": Nanny, "options": {
        # One case at a time per worker. No memory limit: the engine sizes its batches to the free
        # memory, and Dask's limit would restart a worker in the middle of a large case instead.
        # Each case records its own problems; Dask's worker logs (a heartbeat racing the shutdown)
        # would only clutter the command's output.
        "host": LOOPBACK, "nthreads": 1, "memory_limit": 0, "dashboard": False, "local_directory": scratch,
        "silence_logs": logging.CRITICAL,
        "env": {"CUDA_VISIBLE_DEVICES": str(index)} if plan.gpus else {},
        "resources": {"GPU": 1} if plan.gpus else None}} for index in range(plan.workers)}
    threads = str(plan.threads)
    spawn_environment = {**FAST_ALLOCATOR, **{name: threads for name in _THREAD_VARIABLES}}
    try:
        # Every Dask server keeps a scratch space (and lock files) in the temporary directory: ours.
        with _kept_environment(spawn_environment), dask.config.set(
                {"distributed.nanny.pre-spawn-environ": spawn_environment, "temporary-directory": scratch}):
            with SpecCluster(scheduler=scheduler, workers=workers, silence_logs=logging.ERROR,
                             name="seghirescam") as cluster, Client(cluster, set_as_default=False) as client:
                yield client
    finally:
        _remove_scratch(scratch)


@contextmanager
def scheduler_client(address: str) -> Iterator[Any]:
    """A Dask client of the scheduler at ``address`` (tcp://host:port), closed on exit (the
    cluster itself is left running)."""
    require_dask("--scheduler")
    from distributed import Client

    try:
        client = Client(address, timeout=30, set_as_default=False)
    except (OSError, TimeoutError, ValueError) as error:
        raise InputError(f"cannot reach the Dask scheduler at {address} ({one_line(error)}); start it "
                         "('dask scheduler') and its workers, or check the address") from error
    try:
        yield client
    finally:
        client.close()


def dashboard_address(client: Any, local: bool) -> str | None:
    """The dashboard's address, or None when there is none.

    A scheduler always serves HTTP (health and metrics); its dashboard needs bokeh. On the local
    cluster bokeh is known to be there or not; a remote scheduler's page says if it lacks it.
    """
    if "dashboard" not in client.scheduler_info().get("services", {}):
        return None
    if local and importlib.util.find_spec("bokeh") is None:
        return None
    return client.dashboard_link


def offers_gpus(client: Any) -> bool:
    """Whether any worker of the cluster offers the resource GPU (``dask worker --resources GPU=1``)."""
    workers = client.scheduler_info().get("workers", {})
    return any((info.get("resources") or {}).get("GPU", 0) > 0 for info in workers.values())


@contextmanager
def _kept_environment(names: dict[str, str]) -> Iterator[None]:
    """Give back this process's values of ``names`` afterwards: Dask's nanny writes the workers'
    spawn variables into its own process (a notebook would keep OMP_NUM_THREADS=1 for good)."""
    saved = {name: os.environ.get(name) for name in names}
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _remove_scratch(folder: str) -> None:
    try:
        shutil.rmtree(folder)
    except FileNotFoundError:
        pass
    except OSError as error:  # a file still open by a worker on Windows: say so, do not fail the cohort
        logger.warning("could not remove Dask's scratch folder %s (%s); delete it by hand", folder, error)
