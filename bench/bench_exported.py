"""What a ``.pt2`` program costs against its eager module: export, load, and explain time.

Prints numbers measured side by side in one run; asserts nothing (machines are noisy).

Per network: ``export_model`` time; in a fresh process (torch already imported), the wall-clock
and CPU time of loading the ``.pt2``, split into the archive check, ``torch.export.load``, and
making the graph functional plus building the stand-ins, against ``load_model`` of the same
network as a state dict with its card; then the
median of interleaved rounds of ``explain_detailed`` (Seg-HiRes-Grad CAM and Seg-Grad CAM from one
backward) on the eager module and on the loaded program, and their ratio.

    python bench/bench_exported.py            # CPU
    python bench/bench_exported.py --quick    # small sizes, a smoke run
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from SegHiResCAMLib import explain_detailed
from SegHiResCAMLib.models.card import ModelCard
from SegHiResCAMLib.models.exporting import export_model
from SegHiResCAMLib.models.loading import load_model
from SegHiResCAMLib.models.unet import UNet

LOAD_TIMER = r"""
import json, sys, time
import torch
from pathlib import Path
from SegHiResCAMLib.models import exported_archive
from SegHiResCAMLib.models.exported import ExportedModel
from SegHiResCAMLib.models.loading import load_model
clock = time.process_time if sys.argv[2] == "cpu" else time.perf_counter
path = Path(sys.argv[1])
t1 = clock()
if path.suffix == ".pt2":
    exported_archive.check_archive(path)
    t2 = clock()
    program = torch.export.load(str(path))
    t3 = clock()
    ExportedModel(program)
    t4 = clock()
    print(json.dumps({"check": t2 - t1, "torch_load": t3 - t2, "functional": t4 - t3}))
else:
    load_model(path)
    print(json.dumps({"load": clock() - t1}))
"""


def networks(quick: bool):
    size = 32 if quick else 64
    yield "U-Net 3D (8,16,32,64)", UNet(3, 1, 3, (8, 16, 32, 64)), (1, size, size, size), ("bottleneck", "decoder.2")
    try:
        from dynamic_network_architectures.architectures.unet import PlainConvUNet
    except ImportError:
        return
    stages = 4 if quick else 6
    network = PlainConvUNet(input_channels=1, n_stages=stages,
                            features_per_stage=[min(32 * 2 ** i, 320) for i in range(stages)],
                            conv_op=torch.nn.Conv3d, kernel_sizes=3, strides=[1] + [2] * (stages - 1),
                            n_conv_per_stage=2, num_classes=3, n_conv_per_stage_decoder=2, conv_bias=True,
                            norm_op=torch.nn.InstanceNorm3d, norm_op_kwargs={"eps": 1e-5, "affine": True},
                            nonlin=torch.nn.LeakyReLU, nonlin_kwargs={"inplace": True})
    yield (f"nnU-Net PlainConvUNet 3D, {stages} stages", network, (1, size, size, size),
           ("encoder.stages.3", f"decoder.stages.{stages - 2}"))


def fresh_load(path: Path, clock: str) -> dict:
    done = subprocess.run([sys.executable, "-c", LOAD_TIMER, str(path), clock], capture_output=True, text=True,
                          check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def median_explain(models: dict, image: np.ndarray, layer: str, rounds: int) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(rounds):
        for name, model in models.items():
            started = time.perf_counter()
            explain_detailed(model, image, layer=layer, target_class=1, device="cpu",
                             methods=("seg-hires-grad-cam", "seg-grad-cam"))
            times[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--skip-explain", action="store_true", help="only export and load")
    parser.add_argument("--clocks", nargs="+", default=["wall", "cpu"], choices=["wall", "cpu"],
                        help="wall-clock and/or process CPU time for loading (CPU time is steadier on a busy machine)")
    args = parser.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as folder:
        for name, network, shape, layers in networks(args.quick):
            network.eval()
            started = time.perf_counter()
            path = export_model(network, torch.zeros(1, *shape), Path(folder) / "net.pt2")
            exported_s = time.perf_counter() - started
            line = f"{name}: export {exported_s:.1f} s; fresh-process load of the .pt2"
            for clock in args.clocks:
                pt2 = fresh_load(path, clock)
                line += (f" [{clock} s] check {pt2['check']:.2f}, torch.export.load {pt2['torch_load']:.2f}, "
                         f"functional graph + stand-ins {pt2['functional']:.2f}")
            if isinstance(network, UNet):
                weights = Path(folder) / "net.pt"
                torch.save(network.state_dict(), weights)
                card = ModelCard(name="bench", spatial_dims=3, class_names=("a", "b", "c"),
                                 network={"name": "SegHiResCAM.UNet",
                                          "args": {"spatial_dims": 3, "in_channels": 1, "out_channels": 3,
                                                   "channels": [8, 16, 32, 64]}})
                card.save(weights.with_suffix(".json"))
                line += "; state dict + card:" + "".join(f" [{c} s] {fresh_load(weights, c)['load']:.2f}"
                                                          for c in args.clocks)
            print(line, flush=True)
            if args.skip_explain:
                continue
            loaded = load_model(path).module
            image = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
            for layer in layers:
                medians = median_explain({"eager": network, "pt2": loaded}, image, layer, args.rounds)
                print(f"  explain at {layer} ({'x'.join(map(str, shape[1:]))}): eager {medians['eager']:.3f} s, "
                      f".pt2 {medians['pt2']:.3f} s, ratio {medians['pt2'] / medians['eager']:.2f}", flush=True)


if __name__ == "__main__":
    main()
