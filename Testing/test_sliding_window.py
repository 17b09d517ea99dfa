"""Sliding windows: nnU-Net's tiling and weights, fused prediction, and explanations exact to the fused target.

Oracles: the whole-volume engine (one window covering the image), a brute-force reference that
runs every window in one autograd graph and differentiates the fused target directly (float64),
an independent float64 implementation of nnU-Net's tiling, and scipy's Gaussian filter.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from SegHiResCAMLib.engine.explain import explain_detailed
from SegHiResCAMLib.engine.methods import METHODS
from SegHiResCAMLib.engine.sliding_window import explain_windows, predict
from SegHiResCAMLib.engine.tiling import gaussian_importance, padding_to_patch, tile_starts
from SegHiResCAMLib.errors import CancelledError, InputError
from SegHiResCAMLib.windows import SlidingWindow

from engine_nets import LocalNet, unet
from model_kinds import blob_image
from tolerances import float32_of_reordered_float64, reordered_float64

EPS32 = float(np.finfo(np.float32).eps)


# ----------------------------------------------------------------------------- independent references


def reference_steps(image_size, tile_size, step):
    """nnU-Net v2's compute_steps_for_sliding_window, written out with numpy as it does."""
    target = [i * step for i in tile_size]
    counts = [int(np.ceil((i - k) / j)) + 1 for i, j, k in zip(image_size, target, tile_size)]
    steps = []
    for dim in range(len(tile_size)):
        highest = image_size[dim] - tile_size[dim]
        actual = highest / (counts[dim] - 1) if counts[dim] > 1 else 99999999999
        steps.append([int(np.round(actual * i)) for i in range(counts[dim])])
    return steps


def reference_gaussian(tile_size):
    """nnU-Net's compute_gaussian with scipy (sigma_scale 1/8, value scaling 10, float16, zero floor)."""
    ndimage = pytest.importorskip("scipy.ndimage")
    tmp = np.zeros(tile_size)
    tmp[tuple(i // 2 for i in tile_size)] = 1
    blurred = ndimage.gaussian_filter(tmp, [i / 8 for i in tile_size], 0, mode="constant", cval=0)
    blurred /= np.max(blurred) / 10
    half = torch.from_numpy(blurred).to(torch.float16)
    mask = half == 0
    half[mask] = torch.min(half[~mask])
    return half.to(torch.float64)


def padded_for(image, patch):
    """Zero padding to at least the patch, centred, the odd voxel after (acvl_utils' pad_nd_image)."""
    spatial = image.shape[1:]
    new = [max(s, p) for s, p in zip(spatial, patch)]
    before = [(n - s) // 2 for n, s in zip(new, spatial)]
    out = torch.zeros((image.shape[0], *new), dtype=image.dtype)
    out[(slice(None), *(slice(b, b + s) for b, s in zip(before, spatial)))] = image
    return out, tuple(slice(b, b + s) for b, s in zip(before, spatial))


def windows_of(shape, patch, step):
    return [tuple(slice(s, s + p) for s, p in zip(corner, patch))
            for corner in itertools.product(*reference_steps(shape, patch, step))]


def flips_of(axes):
    return [()] + [c for n in range(1, len(axes) + 1) for c in itertools.combinations(axes, n)]


def capture(model, layer):
    """Forward hook keeping the layer's output (a clone goes on, so in-place ops later cannot touch it)."""
    store = []

    def hook(module, inputs, output):
        store.append(output)
        return output.clone()

    return dict(model.named_modules())[layer].register_forward_hook(hook), store


def brute_force_maps(model, image, *, layer, class_index, patch, step=0.5, gaussian=True, mirror_axes=(), roi=None,
                     method="seg-hires-grad-cam", target="logits", threshold=0.5):
    """Every window (and flip) in ONE graph: Z = sum g z / sum g, y from Z, dy/dA_w for every window at once."""
    x, inside = padded_for(torch.as_tensor(image, dtype=torch.float64), patch)
    x.requires_grad_()
    weight = reference_gaussian(patch) if gaussian else torch.ones(patch, dtype=torch.float64)
    places = windows_of(x.shape[1:], patch, step)
    flips = flips_of(mirror_axes)
    handle, acts = capture(model, layer)
    numerator, denominator, order = 0, torch.zeros(x.shape[1:], dtype=torch.float64), []
    try:
        for place in places:
            window = x[(slice(None), *place)][None]
            total = 0
            for flip in flips:
                dims = [2 + a for a in flip]
                out = model(window.flip(dims) if flip else window)
                total = total + (out.flip(dims) if flip else out)
                order.append((place, flip))
            z = total[0] / len(flips)
            numerator = numerator + F.pad(z * weight, _pad_args(place, x.shape[1:]))
            denominator[place] += weight
    finally:
        handle.remove()
    fused = numerator / denominator
    z_in = fused[(slice(None), *inside)]
    if target == "logits":
        m = (z_in.argmax(0) == class_index).double() if roi is None else torch.as_tensor(roi, dtype=torch.float64)
        y = (m * z_in[class_index]).sum()
    else:
        s = torch.softmax(z_in, 0)[class_index]
        above = (s > threshold).double().detach()
        m = above if roi is None else torch.as_tensor(roi, dtype=torch.float64) * above
        y = (m * s).sum()
    gradients = torch.autograd.grad(y, acts)
    stitched = torch.zeros(x.shape[1:], dtype=torch.float64)
    with torch.no_grad():
        for (place, flip), a, g in zip(order, acts, gradients):
            layer_map = METHODS[method](a.detach(), g)
            up = F.interpolate(layer_map[:, None], size=tuple(patch), mode="bilinear" if len(patch) == 2 else "trilinear",
                               align_corners=False)[0, 0]
            stitched[place] += up.flip(list(flip)) if flip else up
    return stitched[inside].numpy(), int(m.ne(0).sum())


def _pad_args(place, shape):
    args = []
    for sl, size in reversed(list(zip(place, shape))):
        args += [sl.start, size - sl.stop]
    return args


# ----------------------------------------------------------------------------- tiling and weights


def test_tile_starts_and_padding_are_nnunets():
    for size, patch, step in itertools.product([5, 8, 13, 64, 110, 127, 128, 200, 311], [5, 8, 64, 96, 128],
                                               [0.5, 0.25, 1.0, 0.33]):
        if size >= patch:
            assert tile_starts([size], [patch], step) == reference_steps([size], [patch], step)
    assert tile_starts([110], [64], 0.5) == [[0, 23, 46]]  # nnU-Net's own comment
    assert padding_to_patch((10, 64, 3), (16, 32, 8)) == [(3, 3), (0, 0), (2, 3)]


@pytest.mark.parametrize("patch", [(5, 7), (12, 12), (64, 80), (6, 9, 11), (96, 96, 96), (128, 128, 128)])
def test_gaussian_importance_is_nnunets_compute_gaussian(patch):
    ours = gaussian_importance(patch)
    np.testing.assert_array_equal(ours, reference_gaussian(patch).numpy().astype(np.float32))
    assert ours.dtype == np.float32 and ours.min() > 0 and ours.max() == 10.0


def test_sliding_window_validates_and_round_trips_through_json():
    window = SlidingWindow((96, 96, 80), step=0.5, gaussian=False, mirror_axes=(0, 2))
    again = SlidingWindow.from_dict(json.loads(json.dumps(window.to_dict())))
    assert again == window and again.patch_size == (96, 96, 80) and again.mirror_axes == (0, 2)
    for bad in [dict(patch_size=(0, 4)), dict(patch_size=(4, 4, 4, 4)), dict(patch_size=(4,), mirror_axes=(3,)),
                dict(patch_size=(4, 4.5)), dict(patch_size="ab"),
                dict(patch_size=(8, 8), step=0), dict(patch_size=(8, 8), step=1.5),
                dict(patch_size=(8, 8), step=float("nan")), dict(patch_size=(8, 8), mirror_axes=(2,)),
                dict(patch_size=(8, 8), mirror_axes=(0, 0))]:
        with pytest.raises(InputError):
            SlidingWindow(**bad)
    with pytest.raises(InputError, match="unknown keys"):
        SlidingWindow.from_dict({"patch_size": [8, 8], "overlap": 0.5})
    # one number: that size along every axis of the model, expanded once the model is known
    cube = SlidingWindow((16,), step=0.25, mirror_axes=(1,))
    assert cube.for_dims(3) == SlidingWindow((16, 16, 16), step=0.25, mirror_axes=(1,))
    assert cube.for_dims(2) == SlidingWindow((16, 16), step=0.25, mirror_axes=(1,))
    assert window.for_dims(3) is window
    with pytest.raises(InputError, match="model is 2D"):
        window.for_dims(2)
    with pytest.raises(InputError, match="mirror axes"):
        SlidingWindow((16,), mirror_axes=(2,)).for_dims(2)


# ----------------------------------------------------------------------------- prediction


def reference_predict(model, image, patch, step, mirror_axes=()):
    """nnU-Net's sliding-window fusion in float64, with the float16 Gaussian it uses."""
    x, inside = padded_for(torch.as_tensor(image, dtype=torch.float64), patch)
    weight = reference_gaussian(patch)
    numerator = denominator = None
    with torch.no_grad():
        for place in windows_of(x.shape[1:], patch, step):
            window = x[(slice(None), *place)][None]
            z = sum((model(window.flip([2 + a for a in f])).flip([2 + a for a in f]) if f else model(window))
                    for f in flips_of(mirror_axes))[0] / len(flips_of(mirror_axes))
            if numerator is None:
                numerator = torch.zeros((z.shape[0], *x.shape[1:]), dtype=torch.float64)
                denominator = torch.zeros(x.shape[1:], dtype=torch.float64)
            numerator[(slice(None), *place)] += z * weight
            denominator[place] += weight
    return (numerator / denominator)[(slice(None), *inside)].numpy()


@pytest.mark.parametrize("shape, patch, mirror", [((1, 20, 27), (8, 12), ()), ((1, 13, 9, 22), (8, 8, 8), ()),
                                                   ((1, 6, 30), (8, 16), (1,)), ((1, 10, 12, 9), (8, 8, 8), (0, 2))])
def test_predict_equals_nnunets_tiling(shape, patch, mirror):
    model = unet(len(patch), 3, dtype=torch.float64)
    image = blob_image(shape[1:], seed=3)
    got = predict(model, image, sliding_window=SlidingWindow(patch, mirror_axes=mirror), device="cpu", batch_size=3)
    expected = reference_predict(model, image, patch, 0.5, mirror)
    assert got.shape == (3, *shape[1:]) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=4 * EPS32, atol=4 * EPS32 * np.abs(expected).max())


def test_predict_without_a_window_is_the_models_output():
    model = unet(3, 2)
    image = blob_image((8, 16, 8), seed=1)
    with torch.no_grad():
        expected = model(torch.from_numpy(image)[None])[0].numpy()
    np.testing.assert_array_equal(predict(model, image, device="cpu"), expected)


# ----------------------------------------------------------------------------- explanations: oracles

SIGNED = dict(relu=False, normalize=False, device="cpu")


def present_class(model, image, patch=None) -> int:
    """The class the model's (fused) prediction holds most often on the image (so its region is not empty)."""
    window = None if patch is None else SlidingWindow(patch)
    labels = predict(model, image, sliding_window=window, device="cpu").argmax(0)
    return int(np.bincount(labels.ravel()).argmax())


@pytest.mark.parametrize("dims, layer", [(2, "bottleneck"), (3, "bottleneck"), (3, "decoder.1.conv")])
@pytest.mark.parametrize("target", ["logits", "probability-threshold"])
def test_one_window_covering_the_image_equals_the_whole_volume_map(dims, layer, target):
    model = unet(dims, 3, dtype=torch.float64)  # float64: the two runs sum in other orders
    shape = (24, 16) if dims == 2 else (16, 8, 16)
    image = blob_image(shape, seed=2)
    target_class = present_class(model, image)
    for roi in (None, np.pad(np.ones([s // 2 for s in shape], bool), [(s // 4, s - s // 4 - s // 2) for s in shape])):
        methods = tuple(METHODS)
        whole = explain_detailed(model, image, layer=layer, target_class=target_class, roi=roi, methods=methods,
                                 target=target, threshold=0.34, **SIGNED)
        windowed = explain_windows(model, image, layers=[layer], class_index=target_class, roi=roi, methods=methods,
                                   target=target, target_threshold=0.34, window=SlidingWindow(shape), **SIGNED)
        assert windowed.roi_voxels == whole.roi_voxels > 0 and windowed.windows == 1
        for method in methods:
            expected = whole.maps[method]
            # the same operations on a differently shaped batch (other kernels, other orders of the sums), in
            # float64, each map rounded to float32
            np.testing.assert_allclose(windowed.maps[method], expected, err_msg=method,
                                       **float32_of_reordered_float64(expected))


@pytest.mark.parametrize("dims, shape, patch, layer", [
    (2, (20, 11), (12, 12), "bottleneck"),  # padded along the second axis
    (2, (26, 30), (12, 16), "decoder.1.conv"),
    (3, (14, 12, 18), (8, 8, 12), "bottleneck"),
])
@pytest.mark.parametrize("method", ["seg-hires-grad-cam", "seg-grad-cam", "seg-grad-cam++"])
def test_stitched_map_is_the_gradient_of_the_fused_target(dims, shape, patch, layer, method):
    """Additivity: sum over windows of each window's exact share = the fused target's map (one graph)."""
    model = unet(dims, 3, dtype=torch.float64)
    image = blob_image(shape, seed=4)
    target_class = present_class(model, image, patch)
    result = explain_windows(model, image, layers=[layer], class_index=target_class, methods=(method,),
                             window=SlidingWindow(patch), batch_size=2, **SIGNED)
    expected, voxels = brute_force_maps(model, image, layer=layer, class_index=target_class, patch=patch,
                                        method=method)
    assert result.windows >= 3 and result.roi_voxels == voxels > 0
    np.testing.assert_allclose(result.heatmap, expected, rtol=2 * EPS32,  # float64 runs, float32 out
                               atol=reordered_float64(np.abs(expected).max()))


def test_probability_threshold_target_differentiates_the_fused_probabilities():
    model = unet(2, 3, dtype=torch.float64)
    image = blob_image((26, 22), seed=5)
    roi = np.zeros((26, 22), bool)
    roi[4:20, 6:18] = True
    target_class = present_class(model, image, (12, 12))
    for given in (None, roi):
        result = explain_windows(model, image, layers=["decoder.1.conv"], class_index=target_class, roi=given,
                                 target="probability-threshold", target_threshold=0.3,
                                 window=SlidingWindow((12, 12), step=0.33), **SIGNED)
        expected, voxels = brute_force_maps(model, image, layer="decoder.1.conv", class_index=target_class,
                                            patch=(12, 12),
                                            step=0.33, roi=given, target="probability-threshold", threshold=0.3)
        assert result.roi_voxels == voxels > 0
        np.testing.assert_allclose(result.heatmap, expected, rtol=2 * EPS32,  # float64 runs, float32 out
                               atol=reordered_float64(np.abs(expected).max()))


@pytest.mark.parametrize("dims, shape, patch, axes", [(2, (16, 18), (12, 12), (0, 1)),
                                                      (3, (10, 9, 12), (8, 8, 8), (2,))])
def test_mirrored_windows_average_the_flips_and_flip_each_map_back(dims, shape, patch, axes):
    model = unet(dims, 2, dtype=torch.float64)
    image = blob_image(shape, seed=6)
    target_class = present_class(model, image, patch)
    result = explain_windows(model, image, layers=["decoder.1.conv"], class_index=target_class,
                             window=SlidingWindow(patch, mirror_axes=axes), batch_size=3, **SIGNED)
    expected, voxels = brute_force_maps(model, image, layer="decoder.1.conv", class_index=target_class, patch=patch,
                                        mirror_axes=axes)
    unmirrored = explain_windows(model, image, layers=["decoder.1.conv"], class_index=target_class,
                                 window=SlidingWindow(patch), **SIGNED)
    assert result.roi_voxels == voxels > 0
    np.testing.assert_allclose(result.heatmap, expected, rtol=2 * EPS32,  # float64 runs, float32 out
                               atol=reordered_float64(np.abs(expected).max()))
    assert np.abs(unmirrored.heatmap - expected).max() > 1e-3 * np.abs(expected).max()  # the flips matter


def test_windows_without_a_share_of_the_region_are_skipped_and_change_nothing():
    model = unet(2, 2, dtype=torch.float64)
    image = blob_image((40, 40), seed=7)
    roi = np.zeros((40, 40), bool)
    roi[2:5, 3:6] = True  # in the first window only
    calls = []
    handle = model.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    try:
        result = explain_windows(model, image, layers=["bottleneck"], class_index=1, roi=roi,
                                 window=SlidingWindow((12, 12)), batch_size=1, **SIGNED)
    finally:
        handle.remove()
    assert result.windows == 36 and result.explained == 1 and sum(calls) == 1  # a given region needs no prediction
    expected, voxels = brute_force_maps(model, image, layer="bottleneck", class_index=1, patch=(12, 12), roi=roi)
    assert result.roi_voxels == voxels == 9
    np.testing.assert_allclose(result.heatmap, expected, rtol=2 * EPS32,  # float64 runs, float32 out
                               atol=reordered_float64(np.abs(expected).max()))
    assert np.all(result.heatmap[20:, 20:] == 0)


def test_2d_patch_over_a_volume_equals_the_slice_by_slice_engine():
    model = unet(2, 3, dtype=torch.float64)  # float64: the two runs sum in other orders
    image = blob_image((8, 16, 8), seed=8)
    target_class = present_class(model, image[:, 3])
    for axis in (0, 2):
        in_plane = tuple(s for a, s in enumerate(image.shape[1:]) if a != axis)
        whole = explain_detailed(model, image, layer="bottleneck", target_class=target_class, spatial_dims=2,
                                 slice_axis=axis,
                                 methods=("seg-hires-grad-cam", "seg-grad-cam"), **SIGNED)
        windowed = explain_windows(model, image, layers=["bottleneck"], class_index=target_class, slice_axis=axis,
                                   methods=("seg-hires-grad-cam", "seg-grad-cam"), window=SlidingWindow(in_plane),
                                   **SIGNED)
        assert windowed.windows == image.shape[1 + axis] and windowed.roi_voxels == whole.roi_voxels
        for method, expected in whole.maps.items():
            np.testing.assert_allclose(windowed.maps[method], expected, **float32_of_reordered_float64(expected))


def test_relu_and_normalisation_come_once_after_stitching():
    model = unet(2, 2)
    image = blob_image((30, 30), seed=9)
    kwargs = dict(layers=["decoder.1.conv"], class_index=present_class(model, image, (12, 12)),
                  window=SlidingWindow((12, 12)), device="cpu")
    signed = explain_windows(model, image, relu=False, normalize=False, **kwargs).heatmap
    final = explain_windows(model, image, **kwargs).heatmap
    positive = np.maximum(signed, 0)
    np.testing.assert_allclose(final, positive / positive.max(), rtol=0, atol=4 * EPS32)
    assert final.max() == 1.0 and final.min() >= 0  # exact: the maximum divided by itself


def test_empty_region_gives_zeros_and_says_so():
    model = unet(2, 2)
    result = explain_windows(model, blob_image((20, 20)), layers=["bottleneck"], class_index=1,
                             roi=np.zeros((20, 20), bool), window=SlidingWindow((12, 12)), device="cpu")
    assert result.explained == 0 and result.roi_voxels == 0 and not result.heatmap.any()
    assert any("empty" in message for message in result.warnings)


def test_cancel_between_windows_leaves_the_model_as_found():
    model = LocalNet(2, 2).train()
    model.features.train(False)
    flags = {name: module.training for name, module in model.named_modules()}
    seen = []

    def progress(fraction, message):
        seen.append(message)
        if len(seen) == 3:
            raise CancelledError("cancelled")

    with pytest.raises(CancelledError):
        explain_windows(model, blob_image((40, 40)), layers=["features"], class_index=1,
                        window=SlidingWindow((12, 12)), device="cpu", progress=progress, batch_size=2)
    assert len(seen) == 3 and "windows" in seen[0]
    assert {name: module.training for name, module in model.named_modules()} == flags
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert all(p.grad is None for p in model.parameters())


def test_refuses_what_it_cannot_do_before_any_work():
    model = unet(3, 2)
    image = blob_image((8, 8, 8))
    window = SlidingWindow((8, 8, 8))
    with pytest.raises(InputError, match="whole volume"):
        explain_windows(model, image, layers=["bottleneck"], class_index=1, window=window,
                        methods=("kernel-weighted-contribution",))
    with pytest.raises(InputError, match="3D patch"):
        explain_windows(model, image[:, 0], layers=["bottleneck"], class_index=1, window=window)
    with pytest.raises(InputError, match="slice_axis"):
        explain_windows(model, image, layers=["bottleneck"], class_index=1, window=SlidingWindow((8, 8)), slice_axis=3)
    with pytest.raises(InputError, match="region has shape"):
        explain_windows(model, image, layers=["bottleneck"], class_index=1, window=window, roi=np.ones((8, 8), bool))


def test_layer_and_class_errors_name_the_problem():
    from SegHiResCAMLib.errors import LayerError

    model = unet(2, 2)
    with pytest.raises(LayerError, match="does not exist"):
        explain_windows(model, blob_image((12, 12)), layers=["nope"], class_index=1, window=SlidingWindow((12, 12)))
    with pytest.raises(InputError, match="out of range"):
        explain_windows(model, blob_image((12, 12)), layers=["bottleneck"], class_index=5,
                        window=SlidingWindow((12, 12)), device="cpu")


def test_mixed_precision_runs_in_bf16_and_stays_close_on_cpu():
    model = unet(2, 2)
    image = blob_image((24, 24), seed=3)
    kwargs = dict(layers=["decoder.1.conv"], class_index=present_class(model, image, (12, 12)),
                  window=SlidingWindow((12, 12)), device="cpu")
    exact = explain_windows(model, image, **kwargs).heatmap
    mixed = explain_windows(model, image, mixed_precision=True, **kwargs).heatmap
    assert mixed.dtype == np.float32 and not np.array_equal(mixed, exact)
    # bf16 keeps 8 significant bits: a few of its epsilons (2**-8) of the normalised map
    assert np.abs(mixed - exact).max() < 16 * 2.0**-8
    assert mixed.max() == 1.0  # exact: the maximum divided by itself


# ----------------------------------------------------------------------------- bounded memory

_MEMORY_PROBE = r"""
import json, sys
import numpy as np, psutil, torch
from torch import nn
from SegHiResCAMLib.engine.explain import explain_detailed
from SegHiResCAMLib.engine.sliding_window import explain_windows
from SegHiResCAMLib.windows import SlidingWindow

torch.set_num_threads(1)
torch.manual_seed(0)
width = 32
model = nn.Sequential(nn.Conv3d(1, width, 3, padding=1), nn.ReLU(), nn.Conv3d(width, width, 3, padding=1), nn.ReLU(),
                      nn.Conv3d(width, width, 3, padding=1), nn.ReLU(), nn.Conv3d(width, 2, 1)).eval()
edge, mode = int(sys.argv[1]), sys.argv[2]
image = np.random.default_rng(0).standard_normal((1, edge, edge, edge)).astype(np.float32)
roi = np.ones((edge,) * 3, bool)
before = psutil.Process().memory_info().rss
if mode == "windows":
    explain_windows(model, image, layers=["2"], class_index=1, roi=roi, window=SlidingWindow((32, 32, 32)),
                    device="cpu", batch_size=1)
else:
    explain_detailed(model, image, layer="2", target_class=1, roi=roi, device="cpu")
# VmHWM: this process's own peak (ru_maxrss would start from the parent's size at the fork)
peak = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"extra": max(0, peak - before)}))
"""


def _extra_peak_bytes(edge: int, mode: str) -> int:
    import os
    import subprocess
    import sys

    # Large blocks go straight back to the system when freed, so the peak RSS counts live tensors.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, str(edge), mode], capture_output=True, text=True,
                          timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])["extra"]


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="peak memory is read from Linux's /proc")
def test_a_volume_eight_times_the_window_explains_in_about_one_windows_memory():
    one_window = _extra_peak_bytes(32, "windows")
    eight_windows = _extra_peak_bytes(64, "windows")
    whole_volume = _extra_peak_bytes(64, "whole")
    voxels = 64**3
    # What must grow with the volume: the input, the region, the weights' sum, the target's share,
    # the stitched map and the float copies the caller gets, about ten float32 planes.
    volume_planes = 10 * 4 * voxels
    bound = one_window + volume_planes
    assert eight_windows <= bound, (one_window, eight_windows, whole_volume)
    # the bound is far below what one pass over the whole volume needs, so it measures the windowing
    assert whole_volume > 2 * bound, (one_window, eight_windows, whole_volume)


def test_the_sliding_window_settings_import_without_torch_or_numpy():
    import subprocess
    import sys

    code = ("import sys; from SegHiResCAMLib.windows import SlidingWindow, window_for_card; "
            "SlidingWindow((8, 8)).to_dict(); "
            "assert 'torch' not in sys.modules and 'numpy' not in sys.modules, sorted(sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
