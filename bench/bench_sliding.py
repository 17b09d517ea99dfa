"""Sliding-window explanations: time against inference on the same tiles, memory, and the per-window-normalised peer.

Prints, never asserts. Run from the repository root (CPU; `--device cuda` on a GPU):

    PYTHONPATH=SegHiResCAM python bench/bench_sliding.py [--patch 96] [--volume 144,144,96] [--skip-demo]

1. An nnU-Net-default 3D U-Net for its patch (PlainConvUNet, features 32..320, InstanceNorm,
   LeakyReLU, random weights) over a volume of several windows: the fused-prediction
   explanation (default region: a prediction pass plus the explanation pass), the same with
   the region given (one pass), a sparse region inside one window, and the approach of
   nnunetv2-cam (each window's own target and map, normalised to [0, 1] per window, averaged
   uniformly), each over the time of sliding-window inference on the same tiles; how far the
   peer's map is from the exact one.
2. Memory (each in a fresh process, peak RSS above the process before the work): one window's
   forward, the windowed explanation, against ``engine.memory``'s estimates made before the work;
   the demo 3D model one pass over the whole volume (estimate vs measured), and over 512x512x400
   by sliding windows (the case that was killed past 16.8 GB).
3. bf16 autocast against float32 maps on CPU (the demo model).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "SegHiResCAM" / "SegHiResCAMLib" / "data" / "demo_unet3d.pt"


def nnunet_default_unet(patch: int, classes: int = 3) -> nn.Module:
    """nnU-Net's default 3d_fullres network for an isotropic patch: stages down to >= 4 voxels, 32..320 features."""
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    stages = 1
    while patch // 2**stages >= 4 and stages < 6:
        stages += 1
    features = [min(32 * 2**i, 320) for i in range(stages)]
    torch.manual_seed(0)
    return PlainConvUNet(1, stages, features, nn.Conv3d, 3, [1] + [2] * (stages - 1), [2] * stages, classes, [2] * (stages - 1),
                         True, nn.InstanceNorm3d, {"eps": 1e-5, "affine": True}, None, None, nn.LeakyReLU,
                         {"inplace": False}, deep_supervision=False).eval()


def ct_like(shape, seed: int = 0) -> np.ndarray:
    """Smooth structures plus noise, so that every class is predicted somewhere."""
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    image = np.sin(3 * grids[0]) * np.cos(2 * grids[1]) + np.exp(-4 * sum(g**2 for g in grids))
    return (image + 0.2 * rng.standard_normal(shape)).astype(np.float32)[None]


def peer_per_window_normalised(model, image, window, layer, class_index, device="cpu"):
    """nnunetv2-cam's stitching: each window's own region and target, its map ReLU'd and scaled to [0, 1]
    on its own, then the windows averaged uniformly (written from the issue's description)."""
    from SegHiResCAMLib.engine.capture import forward_with_activations
    from SegHiResCAMLib.engine.methods import METHODS
    from SegHiResCAMLib.engine.resize import upsample_to
    from SegHiResCAMLib.engine.tiling import window_corners

    x = torch.from_numpy(image)
    total = torch.zeros(image.shape[1:])
    count = torch.zeros(image.shape[1:])
    for corner in window_corners(image.shape[1:], window.patch_size, window.step):
        place = tuple(slice(s, s + p) for s, p in zip(corner, window.patch_size))
        output, (activation,) = forward_with_activations(model, x[(slice(None), *place)][None].to(device), [layer])
        region = (output.argmax(1) == class_index).float()
        score = (output[:, class_index] * region).sum()
        if score.requires_grad and region.any():
            (gradient,) = torch.autograd.grad(score, [activation])
            heat = torch.relu(upsample_to(METHODS["seg-hires-grad-cam"](activation.detach(), gradient),
                                          tuple(window.patch_size)))[0]
            peak = heat.max()
            total[place] += (heat / peak if peak > 0 else heat).cpu()
        count[place] += 1
    return (total / count).numpy()


def timed(function, *args, **kwargs):
    """The result and the CPU seconds of this process (on a shared machine, wall time mostly measures the
    neighbours' load; CPU time counts the work done)."""
    started = time.process_time()
    result = function(*args, **kwargs)
    return result, time.process_time() - started


def time_and_compare(args) -> None:
    from SegHiResCAMLib.engine.sliding_window import explain_windows, predict
    from SegHiResCAMLib.windows import SlidingWindow

    torch.set_num_threads(args.threads)
    shape = tuple(int(v) for v in args.volume.split(","))
    image = ct_like(shape)
    window = SlidingWindow((args.patch,) * 3)
    if args.model == "demo":
        from SegHiResCAMLib.models.loading import load_model

        loaded = load_model(DEMO)
        model, layer = loaded.module, args.layer or loaded.card.default_layer
        title = "demo 3D U-Net (features 8, 16, 32)"
    else:
        model = nnunet_default_unet(args.patch)
        layer = args.layer or f"decoder.stages.{len(model.decoder.stages) - 1}"
        title = f"nnU-Net-default U-Net (PlainConvUNet, features {model.encoder.output_channels})"
    print(f"## 1. {title}, patch {args.patch}^3, volume {shape} ({np.prod(shape) / 1e6:.1f} M voxels; a 512x512x300 "
          f"CT at 1.5 mm is about 273x273x160), layer {layer}, {args.threads} CPU threads")
    with torch.no_grad():
        probe = torch.zeros(1, 1, *window.patch_size)
        _, one = timed(model, probe)
    fused, inference = timed(predict, model, image, sliding_window=window, device=args.device)
    classes = fused.argmax(0)
    target = int(np.bincount(classes.ravel(), minlength=3)[1:].argmax() + 1)
    region = classes == target
    kwargs = dict(layers=[layer], class_index=target, window=window, device=args.device)
    dense_default, t_default = timed(explain_windows, model, image, **kwargs)
    dense_given, t_given = timed(explain_windows, model, image, roi=region, **kwargs)
    sparse_region = np.zeros(shape, bool)
    sparse_region[:6, :6, :6] = True  # in the corner window only (windows overlap by half a patch)
    sparse, t_sparse = timed(explain_windows, model, image, roi=sparse_region, **kwargs)
    peer, t_peer = timed(peer_per_window_normalised, model, image, window, layer, target, args.device)
    exact = dense_default.heatmap
    print(f"one window forward {one:.1f} CPU s; {dense_default.windows} windows")
    print("| run | windows run | CPU seconds | / inference |")
    print("| --- | --- | --- | --- |")
    print(f"| sliding-window inference | {dense_default.windows} | {inference:.1f} | 1.00 |")
    print(f"| exact, default region (prediction pass + explanation pass) | {dense_default.windows} x 2 | "
          f"{t_default:.1f} | {t_default / inference:.2f} |")
    print(f"| exact, region given (one pass) | {dense_given.explained} | {t_given:.1f} | {t_given / inference:.2f} |")
    print(f"| exact, sparse region ({sparse_region.sum()} voxels) | {sparse.explained} of {sparse.windows} | "
          f"{t_sparse:.1f} | {t_sparse / inference:.2f} |")
    print(f"| nnunetv2-cam stitching (per-window [0, 1], uniform mean) | {dense_default.windows} | {t_peer:.1f} | "
          f"{t_peer / inference:.2f} |")
    peer_n = peer / peer.max() if peer.max() > 0 else peer
    r = np.corrcoef(exact.ravel(), peer_n.ravel())[0, 1]
    top = exact >= np.quantile(exact, 0.95)
    top_peer = peer_n >= np.quantile(peer_n, 0.95)
    print(f"peer map vs exact map (both divided by their maximum): max |difference| {np.abs(exact - peer_n).max():.3f}, "
          f"mean |difference| {np.abs(exact - peer_n).mean():.3f}, Pearson r {r:.3f}, "
          f"overlap of the top 5% voxels {(top & top_peer).sum() / top.sum():.2f}")
    print(f"exact maps, default region vs the same region given: max |difference| "
          f"{np.abs(exact - dense_given.heatmap).max():.2e}")


_CHILD = r"""
import json, sys, time
import numpy as np, psutil, torch
sys.path.insert(0, {bench!r})
from bench_sliding import nnunet_default_unet, ct_like
from SegHiResCAMLib.engine.memory import estimate_whole_volume, estimate_windows
from SegHiResCAMLib.engine.sliding_window import explain_windows
from SegHiResCAMLib.engine.explain import explain_detailed
from SegHiResCAMLib.models.loading import load_model
from SegHiResCAMLib.windows import SlidingWindow
torch.set_num_threads({threads})
case = json.loads(sys.argv[1])
if case["model"] == "demo":
    loaded = load_model({demo!r}); model = loaded.module; layer = loaded.card.default_layer; divisible = 4; classes = 3
else:
    model = nnunet_default_unet(case["patch"]); layer = case["layer"]; divisible = 16; classes = 3
shape = tuple(case["shape"])
image = ct_like(shape) if np.prod(shape) < 5e7 else np.random.default_rng(0).standard_normal((1, *shape), dtype=np.float32)
window = SlidingWindow(tuple(case["window"]), step=case.get("step", 0.5)) if case.get("window") else None
estimate = None
if case["mode"] == "windows":
    estimate = estimate_windows(model, image.shape, layers=[layer], classes=classes, window=window,
                                divisible_by=divisible, device="cpu")
elif case["mode"] == "whole":
    estimate = estimate_whole_volume(model, image.shape, layers=[layer], classes=classes, divisible_by=divisible,
                                     device="cpu")
before = psutil.Process().memory_info().rss
started = time.perf_counter()
if case["mode"] == "forward":
    with torch.no_grad():
        model(torch.from_numpy(image)[None])
elif case["mode"] == "windows":
    explain_windows(model, image, layers=[layer], class_index=1, window=window, device="cpu")
else:
    explain_detailed(model, image, layer=layer, target_class=1, device="cpu")
seconds = time.perf_counter() - started
# VmHWM: this process's own peak (ru_maxrss would start from the parent's size at the fork)
peak = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:")) - before
print(json.dumps({{"peak": peak, "seconds": seconds, "estimate": None if estimate is None else estimate.peak_bytes}}))
"""


def child(case: dict, threads: int) -> dict:
    code = _CHILD.format(bench=str(Path(__file__).resolve().parent), demo=str(DEMO), threads=threads)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    done = subprocess.run([sys.executable, "-c", code, json.dumps(case)], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def memory(args) -> None:
    gb = 2**30
    print("\n## 2. Peak memory (fresh process each; peak RSS above the process before the work) and the estimate")
    print("| case | seconds | measured peak | estimate (made before) | estimate / measured |")
    print("| --- | --- | --- | --- | --- |")
    shape = [int(v) for v in args.volume.split(",")]
    layer = args.layer or "decoder.stages.3"
    cases = [
        ("nnU-Net U-Net, one window forward (no grad)", dict(model="nnunet", patch=args.patch, layer=layer,
                                                             shape=[args.patch] * 3, mode="forward")),
        (f"nnU-Net U-Net, sliding explanation of {tuple(shape)}", dict(model="nnunet", patch=args.patch, layer=layer,
                                                                       shape=shape, window=[args.patch] * 3,
                                                                       mode="windows")),
        ("demo 3D U-Net, one pass over 160^3", dict(model="demo", shape=[160, 160, 160], mode="whole")),
        ("demo 3D U-Net, windows 128^3 (step 1) over 256x256x200", dict(model="demo", shape=[256, 256, 200],
                                                                         window=[128] * 3, step=1.0, mode="windows")),
    ]
    if not args.skip_demo:
        cases.append(("demo 3D U-Net, windows 128^3 (step 1) over 512x512x400",
                      dict(model="demo", shape=[512, 512, 400], window=[128] * 3, step=1.0, mode="windows")))
    for name, case in cases:
        result = child(case, args.threads)
        if "error" in result:
            print(f"| {name} | - | failed: {result['error']} | - | - |")
            continue
        estimate = result["estimate"]
        ratio = f"{estimate / result['peak']:.2f}" if estimate else "-"
        print(f"| {name} | {result['seconds']:.0f} | {result['peak'] / gb:.2f} GiB | "
              f"{'-' if estimate is None else f'{estimate / gb:.2f} GiB'} | {ratio} |")
    from SegHiResCAMLib.engine.memory import estimate_whole_volume
    from SegHiResCAMLib.models.loading import load_model

    loaded = load_model(DEMO)
    whole = estimate_whole_volume(loaded.module, (1, 512, 512, 400), layers=[loaded.card.default_layer], classes=3,
                                  divisible_by=4, device="cpu")
    print(f"estimate for the demo model in one pass over 512x512x400: {whole.describe()} (fits: {whole.fits})")


def mixed_precision(args) -> None:
    from SegHiResCAMLib.engine.sliding_window import explain_windows
    from SegHiResCAMLib.models.loading import load_model
    from SegHiResCAMLib.windows import SlidingWindow

    loaded = load_model(DEMO)
    image = ct_like((128, 128, 128), seed=2)
    kwargs = dict(layers=[loaded.card.default_layer], class_index=2, window=SlidingWindow((96, 96, 96)), device="cpu")
    exact, t32 = timed(explain_windows, loaded.module, image, **kwargs)
    mixed, t16 = timed(explain_windows, loaded.module, image, mixed_precision=True, **kwargs)
    a, b = exact.heatmap, mixed.heatmap
    print("\n## 3. bf16 autocast vs float32 on CPU (demo 3D U-Net, 128^3, windows 96^3, maps divided by their maximum)")
    print(f"max |difference| {np.abs(a - b).max():.4f}, mean |difference| {np.abs(a - b).mean():.5f}, "
          f"Pearson r {np.corrcoef(a.ravel(), b.ravel())[0, 1]:.5f}; seconds float32 {t32:.1f}, bf16 {t16:.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("nnunet", "demo"), default="nnunet", help="the network of section 1")
    parser.add_argument("--patch", type=int, default=96)
    parser.add_argument("--volume", default="144,144,96", help="K,J,I of the volume for section 1")
    parser.add_argument("--layer", default=None, help="default: the last decoder stage (nnU-Net cards' default)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--skip-demo", action="store_true", help="skip the 512x512x400 case")
    parser.add_argument("--sections", default="1,2,3")
    args = parser.parse_args()
    sections = set(args.sections.split(","))
    if "1" in sections:
        time_and_compare(args)
    if "2" in sections:
        memory(args)
    if "3" in sections:
        mixed_precision(args)


if __name__ == "__main__":
    main()
