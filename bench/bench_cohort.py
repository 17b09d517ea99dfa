"""Benchmark cohorts: cases per minute in one process and on 1 or 2 local Dask workers, and the
scheduler's cost per case compared with a plain loop.

Prints numbers measured side by side in one run; asserts nothing (machines are noisy, and this one
may be shared: the load average before and after is printed with them).

The cohort: ``--cases`` crops of ``--size`` voxels per axis of the bundled MNI152 T1 (each its own
case, at its own place and geometry), explained with the bundled 3D demo U-Net (white matter, where
the model predicts it; Seg-HiRes-Grad CAM and Seg-Grad CAM). Per round, in turn:

- ``loop``: the cases one after another in this process (``run_cohort`` with ``InProcess``), torch
  on every core: what ``seghirescam batch`` does without Dask;
- ``dask 1x{cores}``: a local cluster of one worker using every core;
- ``dask 2x{cores/2}``: two workers sharing the cores.

"start" is the one-time cost: the local cluster's start and close, and in each worker (or this
process) importing torch and loading the model; "run" is the cases alone. The scheduler's cost per
case is ``(run of dask 1xN - run of loop) / cases``: the same torch threads, the same allocator
(this script re-runs itself under the workers' ``FAST_ALLOCATOR``). "CPU s/case" is the CPU time of
everything (this process with the scheduler, and the workers) per case: on a shared, loaded machine
it is steadier than the wall times. "in-worker s/case" is the mean time a case took inside its
worker (reading, explaining, writing: the results table's ``seconds``); the wall time per case beyond
it is what scheduling and recording cost. Medians over ``--rounds``.

    python bench/bench_cohort.py                # 8 cases of 32^3, 2 rounds
    python bench/bench_cohort.py --cases 16 --size 48
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import SimpleITK as sitk

from SegHiResCAMLib.cohort.cases import Case
from SegHiResCAMLib.cohort.cluster import LocalPlan, cpu_count, local_client
from SegHiResCAMLib.cohort.job import CohortJob
from SegHiResCAMLib.cohort.runner import InProcess, OnDask, prepare_job, run_cohort
from SegHiResCAMLib.cohort.work import cached_model
from SegHiResCAMLib.settings import ExplainSettings
from SegHiResCAMLib.worker.launcher import FAST_ALLOCATOR

DATA = Path(__file__).resolve().parents[1] / "SegHiResCAM" / "SegHiResCAMLib" / "data"
SETTINGS = ExplainSettings(target_class=2, methods=("seg-hires-grad-cam", "seg-grad-cam"), device="cpu")


def write_cases(folder: Path, count: int, size: int) -> list[Case]:
    image = sitk.ReadImage(str(DATA / "mni152_t1_2mm.nii.gz"))
    cases = []
    for index in range(count):
        start = [8 + (3 * index + 5 * axis) % max(1, extent - size - 16) for axis, extent in enumerate(image.GetSize())]
        path = folder / f"case{index:03d}.nrrd"
        sitk.WriteImage(image[tuple(slice(s, s + size) for s in start)], str(path))
        cases.append(Case(f"case{index:03d}", (str(path),)))
    return cases


def warm(job: CohortJob) -> None:
    """Import torch and load the model, as a worker's first case does: a one-time cost, timed with the start."""
    cached_model(job, job.settings.device)


def cpu_seconds() -> float:
    """CPU time of this process and of its children that have ended (the Dask workers, once closed)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def measured(run, cases: list[Case], out: Path) -> tuple[float, float, float, float]:
    """(start s, run s, CPU s of everything, mean seconds a case took inside its worker) of one configuration."""
    before = cpu_seconds()
    start, ran, results = run(cases, out)
    return start, ran, cpu_seconds() - before, statistics.mean(row.seconds for row in results)


def run_loop(cases: list[Case], out: Path) -> tuple[float, float, Any]:
    import torch

    torch.set_num_threads(cpu_count())
    job = prepare_job(DATA / "demo_unet3d.pt", SETTINGS, out)
    started = time.perf_counter()
    warm(job)
    ready = time.perf_counter()
    results = _check(run_cohort(cases, job, InProcess()))
    return ready - started, time.perf_counter() - ready, results


def run_dask(cases: list[Case], out: Path, workers: int) -> tuple[float, float, Any]:
    plan = LocalPlan(workers=workers, threads=max(1, cpu_count() // workers), gpus=0)
    job = dataclasses.replace(prepare_job(DATA / "demo_unet3d.pt", SETTINGS, out), threads=plan.threads)
    started = time.perf_counter()
    with local_client(plan) as client:
        client.wait_for_workers(workers)
        client.run(warm, job)
        ready = time.perf_counter()
        results = run_cohort(cases, job, OnDask(client))
        ran = time.perf_counter() - ready
        closing = time.perf_counter()
    return ready - started + time.perf_counter() - closing, ran, _check(results)


def _check(results: Any) -> Any:
    failed = [row for row in results if row.status != "ok"]
    if failed:
        raise SystemExit(f"benchmark case failed: {failed[0].case}: {failed[0].error}")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=8)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    if any(os.environ.get(name) != value for name, value in FAST_ALLOCATOR.items()):
        # The loop runs in this process: give it the allocator the Dask workers get.
        sys.exit(subprocess.call([sys.executable, *sys.argv], env={**os.environ, **FAST_ALLOCATOR}))
    cores = cpu_count()
    configurations = {"loop": run_loop, f"dask 1x{cores}": lambda c, o: run_dask(c, o, 1)}
    if cores >= 2:
        configurations[f"dask 2x{cores // 2}"] = lambda c, o: run_dask(c, o, 2)
    load_before = os.getloadavg()
    times: dict[str, list[tuple[float, float, float, float]]] = {name: [] for name in configurations}
    with tempfile.TemporaryDirectory(prefix="seghirescam-bench-") as folder:
        cases = write_cases(Path(folder), args.cases, args.size)
        for round_index in range(args.rounds):
            for name, run in configurations.items():
                times[name].append(measured(run, cases, Path(folder) / f"out-{name.replace(' ', '')}-{round_index}"))
    load_after = os.getloadavg()
    print(f"{args.cases} cases of {args.size}^3, demo 3D U-Net, 2 methods, {cores} cores, median of {args.rounds} "
          f"rounds; load average before {load_before[0]:.1f}, after {load_after[0]:.1f}")
    print(f"{'configuration':<16} {'start s':>8} {'run s':>8} {'cases/min':>10} {'with start':>11} {'CPU s/case':>11} "
          f"{'in-worker s/case':>17}")
    median = {name: [statistics.median(values) for values in zip(*measured_times)]
              for name, measured_times in times.items()}
    for name, (start, ran, cpu, inside) in median.items():
        print(f"{name:<16} {start:8.2f} {ran:8.2f} {60 * args.cases / ran:10.1f} {60 * args.cases / (start + ran):11.1f} "
              f"{cpu / args.cases:11.2f} {inside:17.2f}")
    loop, one = median["loop"], median[f"dask 1x{cores}"]
    print(f"scheduler cost per case (dask 1x{cores} run - loop run) / cases: {(one[1] - loop[1]) / args.cases:+.3f} s "
          f"({(one[1] - loop[1]) / loop[1] * 100:+.1f} % of the loop); CPU s per case, all included (start, workers, "
          f"scheduler): {(one[2] - loop[2]) / args.cases:+.3f} s; wall per case beyond the case's own time: loop "
          f"{loop[1] / args.cases - loop[3]:+.3f} s, dask 1x{cores} {one[1] / args.cases - one[3]:+.3f} s")


if __name__ == "__main__":
    main()
