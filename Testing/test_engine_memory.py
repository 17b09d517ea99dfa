"""Memory estimates before the work (issue 8, section 4): a probe's live tensors, scaled to the volume."""

from __future__ import annotations

import torch
from torch import nn

from SegHiResCAMLib.engine.memory import (RUNTIME_BYTES, MemoryEstimate, auto_window, estimate_whole_volume, estimate_windows,
                                          step_peak_bytes)
from SegHiResCAMLib.windows import SlidingWindow


def wide_net(width: int = 16) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv3d(1, width, 3, padding=1), nn.ReLU(), nn.Conv3d(width, width, 3, padding=1),
                         nn.ReLU(), nn.Conv3d(width, 2, 1)).eval()


def test_the_probe_counts_the_tensors_alive_together():
    model = wide_net()
    probe = torch.zeros(1, 1, 16, 16, 16)
    peak = step_peak_bytes(model, probe, ["2"])
    plane = 16**3 * 4
    # at least: the layer's output (a leaf kept for the gradient), the ReLU's saved output, the gradient
    assert peak >= 3 * 16 * plane
    # and at most every tensor the step creates (five 16-channel planes, outputs, maps) at once
    assert peak <= 8 * 16 * plane
    assert all(p.grad is None for p in model.parameters())


def test_activation_memory_scales_with_the_voxels():
    model = wide_net()
    small = step_peak_bytes(model, torch.zeros(1, 1, 16, 16, 16), ["2"])
    large = step_peak_bytes(model, torch.zeros(1, 1, 32, 32, 32), ["2"])
    assert 7.9 <= large / small <= 8.1  # a fully convolutional network: every tensor grows with the voxels


def test_windows_bound_the_per_sample_memory_and_the_whole_volume_does_not():
    model = wide_net()
    window = SlidingWindow((32, 32, 32))
    kwargs = dict(layers=["2"], classes=2, device="cpu")
    windows_small = estimate_windows(model, (1, 64, 64, 64), window=window, **kwargs)
    windows_large = estimate_windows(model, (1, 128, 128, 128), window=window, **kwargs)
    whole_large = estimate_whole_volume(model, (1, 128, 128, 128), **kwargs)
    assert windows_small.per_sample_bytes == windows_large.per_sample_bytes
    assert windows_large.volume_bytes == 8 * windows_small.volume_bytes
    assert whole_large.per_sample_bytes > 20 * windows_large.per_sample_bytes
    assert whole_large.peak_bytes > 3 * windows_large.peak_bytes


def test_the_estimate_says_whether_it_fits_and_how_much():
    fits = MemoryEstimate(peak_bytes=2_000_000_000, available_bytes=8_000_000_000, device="cpu", per_sample_bytes=1,
                          volume_bytes=1)
    too_big = MemoryEstimate(peak_bytes=17_200_000_000, available_bytes=8_000_000_000, device="cuda:0",
                             per_sample_bytes=1, volume_bytes=1)
    assert fits.fits and not too_big.fits
    assert fits.describe() == "about 2.0 GB of 8.0 GB available on the CPU"
    assert too_big.describe() == "about 17.2 GB of 8.0 GB available on the GPU (cuda:0)"


def test_auto_keeps_the_cards_tiling_else_the_whole_volume_else_the_largest_window_that_fits():
    model = wide_net()
    kwargs = dict(layers=["2"], classes=2, device="cpu")
    card = SlidingWindow((24, 24, 24))
    assert auto_window(model, (1, 64, 64, 64), card_window=card, **kwargs)[0] == card
    window, estimate = auto_window(model, (1, 64, 64, 64), budget_bytes=2**40, **kwargs)
    assert window is None and estimate.per_sample_bytes > 0
    budget = RUNTIME_BYTES + (estimate.peak_bytes - RUNTIME_BYTES) // 2  # half of what one pass needs
    window, estimate = auto_window(model, (1, 64, 64, 64), budget_bytes=budget, **kwargs)
    assert window is not None and window.patch_size in {(32, 32, 32), (16, 16, 16)}
    assert estimate.peak_bytes <= budget
    larger = SlidingWindow(tuple(2 * s for s in window.patch_size))
    if larger.patch_size[0] < 64:  # the next size down from the one that did not fit
        assert estimate_windows(model, (1, 64, 64, 64), window=larger, **kwargs).peak_bytes > budget
