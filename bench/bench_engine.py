"""Benchmark the CAM engine against the inference-mode forward pass and against peer approaches.

Prints ratios measured side by side in one run; asserts nothing (machines are noisy).

Cases (issue 2): a 3D U-Net at 96^3 and 128^3 explained at the bottleneck and at the last
decoder stage; a 2D U-Net over a 64-slice 256^2 volume; and the sparse case, an ROI on 4
of those 64 slices. Per case: median inference-mode forward time, median explain time
(>= 5 interleaved rounds), their ratio, and peak memory (VmHWM of a fresh process) of one
forward and of one explanation. For the 2D volume the forward floor is the fastest of
several slice chunkings (one batch of 64 large slices is slower than chunks: page faults),
and the peers run in that same chunking. Peers on the same model, input and ROI: "full
backward" (forward hook + tensor hook + ``loss.backward(retain_graph=True)`` over all
parameters, the pattern of pytorch-grad-cam, MONAI and M3d-CAM) and captum's
``LayerGradientXActivation`` when captum is installed (``pip install -c constraints.txt captum``).

Each runner is timed in a fresh process, interleaved with its own forward passes (ratios are
taken against that forward), so one runner's heap cannot slow another's. Runs under the same
glibc allocator setting as the Slicer worker (``worker.launcher.FAST_ALLOCATOR``:
large blocks are not handed back to the system after each tensor); ``--default-allocator``
measures without it, where page faults roughly double CPU times at 128^3.

    python bench/bench_engine.py                 # CPU, all cases
    python bench/bench_engine.py --device cuda   # on a GPU
    python bench/bench_engine.py --quick         # small sizes, a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

from SegHiResCAMLib import explain_detailed
from SegHiResCAMLib.models.unet import UNet
from SegHiResCAMLib.worker.launcher import FAST_ALLOCATOR


@dataclass(frozen=True)
class Case:
    name: str
    spatial_dims: int
    shape: tuple[int, ...]  # image (C, *spatial)
    layer: str
    roi_slices: int | None = None  # 2D over a volume: ROI on this many slices (None = all)


def cases(quick: bool) -> list[Case]:
    if quick:
        return [Case("3D 32^3 bottleneck", 3, (1, 32, 32, 32), "bottleneck"),
                Case("2D 8x64^2 sparse 2", 2, (1, 8, 64, 64), "bottleneck", 2)]
    return [
        Case("3D 96^3 bottleneck", 3, (1, 96, 96, 96), "bottleneck"),
        Case("3D 96^3 last decoder", 3, (1, 96, 96, 96), "decoder.2"),
        Case("3D 128^3 bottleneck", 3, (1, 128, 128, 128), "bottleneck"),
        Case("3D 128^3 last decoder", 3, (1, 128, 128, 128), "decoder.2"),
        Case("2D 64x256^2 bottleneck", 2, (1, 64, 256, 256), "bottleneck"),
        Case("2D 64x256^2 last decoder", 2, (1, 64, 256, 256), "decoder.2"),
        Case("2D 64x256^2 sparse 4/64", 2, (1, 64, 256, 256), "bottleneck", 4),
    ]


def build(case: Case, device: torch.device):
    torch.manual_seed(0)
    model = UNet(case.spatial_dims, 1, 3, channels=(8, 16, 32, 64)).to(device).eval()
    image = torch.from_numpy(np.random.default_rng(0).random(case.shape, dtype=np.float32)).to(device)
    spatial = case.shape[1:]
    roi = torch.zeros(spatial, dtype=torch.bool, device=device)
    if case.roi_slices is None and case.spatial_dims == 3:
        box = tuple(slice(s // 4, s // 4 + s // 2) for s in spatial)  # an eighth of the volume
        roi[box] = True
    elif case.roi_slices is None:  # dense 2D: a region on every slice
        roi[:, spatial[1] // 4: 3 * spatial[1] // 4, spatial[2] // 4: 3 * spatial[2] // 4] = True
    else:
        picks = np.linspace(spatial[0] // 8, spatial[0] - 1 - spatial[0] // 8, case.roi_slices).astype(int)
        roi[picks, spatial[1] // 4: 3 * spatial[1] // 4, spatial[2] // 4: 3 * spatial[2] // 4] = True
    return model, image, roi


def batches(case: Case, image: torch.Tensor, roi: torch.Tensor, chunk: int):
    """(model input, ROI with a channel axis) chunks: slices of a volume for 2D, the volume for 3D."""
    if case.spatial_dims == 3:
        yield image[None], roi[None, None]
        return
    slices, rois = image.movedim(1, 0), roi[:, None]
    for start in range(0, slices.shape[0], chunk):
        yield slices[start:start + chunk], rois[start:start + chunk]


def run_forward(model, case, image, roi, chunk=64):
    with torch.inference_mode():
        for x, _ in batches(case, image, roi, chunk):
            model(x)


def run_ours(model, case, image, roi, chunk=None):
    explain_detailed(model, image, layer=case.layer, target_class=1, roi=roi, spatial_dims=case.spatial_dims,
                     methods=("seg-hires-grad-cam", "seg-grad-cam"), device=str(image.device))


def run_full_backward(model, case, image, roi, chunk=64):
    for x, rois in batches(case, image, roi, chunk):
        _full_backward_batch(model, case, x, rois)


def _full_backward_batch(model, case, x, rois):
    """The common peer pattern: hooks, backward over all parameters, graph retained, numpy maps."""
    store = {}
    module = dict(model.named_modules())[case.layer]

    def forward_hook(m, inputs, output):
        store["a"] = output
        output.register_hook(lambda grad: store.__setitem__("g", grad))

    handle = module.register_forward_hook(forward_hook)
    try:
        out = model(x)
        loss = (out[:, 1:2] * rois).sum()
        model.zero_grad()
        loss.backward(retain_graph=True)
        a, g = store["a"].detach().cpu().numpy(), store["g"].cpu().numpy()
        maps = np.maximum((a * g).sum(1), 0)
        weights = g.mean(axis=tuple(range(2, g.ndim)), keepdims=True)
        maps2 = np.maximum((a * weights).sum(1), 0)
        up = torch.nn.functional.interpolate(torch.from_numpy(np.stack([maps, maps2], 1)), size=x.shape[2:],
                                             mode="bilinear" if case.spatial_dims == 2 else "trilinear")
        up.numpy()
    finally:
        handle.remove()
        for parameter in model.parameters():
            parameter.grad = None


def run_captum(model, case, image, roi, chunk=64):
    from captum.attr import LayerGradientXActivation

    module = dict(model.named_modules())[case.layer]
    for x, rois in batches(case, image, roi, chunk):

        def masked_sum(inputs, rois=rois):
            return (model(inputs)[:, 1:2] * rois).flatten(1).sum(1)

        attribution = LayerGradientXActivation(masked_sum, module).attribute(x)
        maps = torch.relu(attribution.sum(1, keepdim=True))
        torch.nn.functional.interpolate(maps, size=x.shape[2:],
                                        mode="bilinear" if case.spatial_dims == 2 else "trilinear")


RUNNERS = {"forward": run_forward, "ours": run_ours, "full-backward": run_full_backward, "captum": run_captum}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, *args) -> float:
    synchronize(args[2].device)
    start = time.perf_counter()
    fn(*args)
    synchronize(args[2].device)
    return time.perf_counter() - start


def fastest_chunk(case: Case, model, image, roi) -> int:
    """Slices per inference forward that give the fastest whole-volume forward (1 for 3D)."""
    if case.spatial_dims == 3:
        return 1
    run_forward(model, case, image, roi, 8)  # warm-up
    times = {chunk: timed(run_forward, model, case, image, roi, chunk) for chunk in (4, 8, 16, 32, 64)}
    return min(times, key=times.get)


def time_case(case: Case, device: torch.device, rounds: int, runner: str,
              chunk: int | None = None) -> tuple[dict[str, float], int]:
    """Medians of ``runner`` and of the forward pass, interleaved, in this process."""
    model, image, roi = build(case, device)
    chunk = chunk or fastest_chunk(case, model, image, roi)
    args = (model, case, image, roi, chunk)
    names = ["forward", runner]
    for name in names:  # warm-up
        RUNNERS[name](*args)
    samples = {name: [] for name in names}
    for _ in range(rounds):  # interleaved, so slow bursts of a shared machine hit every runner
        for name in names:
            samples[name].append(timed(RUNNERS[name], *args))
    return {name: statistics.median(values) for name, values in samples.items()}, chunk


def peak_memory(case: Case, device: torch.device, runner: str, chunk: int) -> float:
    """MiB above the baseline that one call adds at its peak (a fresh process on CPU)."""
    if device.type == "cuda":
        model, image, roi = build(case, device)
        RUNNERS[runner](model, case, image, roi, chunk)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        RUNNERS[runner](model, case, image, roi, chunk)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    command = [sys.executable, __file__, "--memory-probe", json.dumps(case.__dict__), runner, str(chunk)]
    return float(subprocess.run(command, check=True, capture_output=True, text=True).stdout.strip())


def high_water_mib() -> float:
    """This process's peak resident memory. Not ru_maxrss: Linux carries that across exec
    from the parent, which would hide the child's own peak."""
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 1024


def case_from_json(text: str) -> Case:
    data = json.loads(text)
    return Case(**{**data, "shape": tuple(data["shape"])})


def time_case_in_fresh_process(case: Case, device: torch.device, rounds: int, runner: str,
                                chunk: int = 0) -> tuple[dict[str, float], int]:
    """time_case in a process of its own: the heap left by one runner (the peers retain whole
    graphs) must not slow the next, so each runner is timed against its own interleaved forward."""
    command = [sys.executable, __file__, "--time-case", json.dumps(case.__dict__), runner, str(chunk),
               "--device", str(device), "--rounds", str(rounds)]
    lines = subprocess.run(command, check=True, capture_output=True, text=True).stdout.strip().splitlines()
    times, chunk = json.loads(lines[-1])
    return times, chunk


def memory_probe(case_json: str, runner: str, chunk: str) -> None:
    case = case_from_json(case_json)
    model, image, roi = build(case, torch.device("cpu"))
    # No warm-up: a forward would already raise the process's peak; both runners pay the same start-up.
    base = high_water_mib()
    RUNNERS[runner](model, case, image, roi, int(chunk))
    print(high_water_mib() - base)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--memory-probe", nargs=3, metavar=("CASE", "RUNNER", "CHUNK"))
    parser.add_argument("--time-case", nargs=3, metavar=("CASE", "RUNNER", "CHUNK"), help=argparse.SUPPRESS)
    parser.add_argument("--cases", default="", help="only the cases whose name contains this text")
    parser.add_argument("--default-allocator", action="store_true",
                        help="keep glibc's default malloc settings (the worker's are used otherwise)")
    args = parser.parse_args()
    if not args.default_allocator and not args.memory_probe and any(k not in os.environ for k in FAST_ALLOCATOR):
        os.execve(sys.executable, [sys.executable, __file__, *sys.argv[1:]], {**FAST_ALLOCATOR, **os.environ})
    if args.memory_probe:
        memory_probe(*args.memory_probe)
        return
    device = torch.device(args.device)
    peers = ["full-backward"]
    try:
        import captum  # noqa: F401

        peers.append("captum")
    except ImportError:
        print("(captum not installed: pip install -c constraints.txt captum to compare with it)")
    if args.time_case:
        case_json, runner, chunk = args.time_case
        print(json.dumps(time_case(case_from_json(case_json), device, args.rounds, runner, int(chunk) or None)))
        return
    allocator = "default" if args.default_allocator else "worker's (large blocks kept)"
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"median of {args.rounds} interleaved rounds, malloc {allocator}")
    header = ["case", "forward s", "explain s", "explain/forward", *[f"{p}/forward" for p in peers],
              *[f"us/{p}" for p in peers]]
    if not args.no_memory:
        header += ["fwd +MiB", "explain +MiB", "explain/fwd memory"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    dense_forward = {}
    for case in [c for c in cases(args.quick) if args.cases in c.name]:
        times, chunk = time_case_in_fresh_process(case, device, args.rounds, "ours")
        for peer in peers:
            peer_times, _ = time_case_in_fresh_process(case, device, args.rounds, peer, chunk)
            # the peer relative to the forward timed beside it, scaled to this row's forward
            times[peer] = peer_times[peer] / peer_times["forward"] * times["forward"]
        if case.roi_slices is None:
            dense_forward[case.shape] = times["forward"]
        if case.spatial_dims == 2:
            print(f"({case.name}: forward floor and peers in chunks of {chunk} slices)", flush=True)
        forward = dense_forward.get(case.shape, times["forward"])
        row = [case.name, f"{forward:.3f}", f"{times['ours']:.3f}", f"{times['ours'] / forward:.2f}",
               *[f"{times[p] / forward:.2f}" for p in peers], *[f"{times['ours'] / times[p]:.2f}" for p in peers]]
        if not args.no_memory:
            fwd_mib, ours_mib = peak_memory(case, device, "forward", chunk), peak_memory(case, device, "ours", chunk)
            row += [f"{fwd_mib:.0f}", f"{ours_mib:.0f}", f"{ours_mib / max(fwd_mib, 1):.2f}"]
        print("| " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
