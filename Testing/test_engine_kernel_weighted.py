"""Kernel-Weighted Contribution: channel weights from zeroing ablations, checked against brute force."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from SegHiResCAMLib import kernel_weighted_contribution
from SegHiResCAMLib.engine.kernel_weighted import kernel_weighted_detailed
from SegHiResCAMLib.errors import CancelledError, LayerError, SegHiResCAMWarning
from engine_nets import LocalNet, hooked_output_and_activation, unet
from tolerances import EPS32, reordered_float64


class OneChannelNet(nn.Module):
    """``features`` (3 channels) -> ReLU -> ``head`` (1x1, one sigmoid output) that reads channel 1 only."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Conv2d(1, 3, 3, padding=1)
        self.act = nn.ReLU()
        self.head = nn.Conv2d(3, 1, 1)
        with torch.no_grad():
            self.head.weight.copy_(torch.tensor([0.0, 2.0, 0.0]).view(1, 3, 1, 1))
            self.head.bias.fill_(-1.0)
            self.features.weight[1].fill_(0.3)  # channel 1 sees the (positive) image: a non-empty prediction
            self.features.bias[1] = 0.0

    def forward(self, x):
        return self.head(self.act(self.features(x)))


def _hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _brute_force(model, samples, layer, class_index, roi=None):
    """D_k and I_k by one explicit hook per channel and per sample (softmax / sigmoid as the engine)."""
    module = dict(model.named_modules())[layer]
    model.eval()

    def probabilities(x, mask=None):
        handle = module.register_forward_hook(lambda mod, inp, out: None if mask is None else out * mask)
        try:
            with torch.no_grad():
                out = model(x).double()
        finally:
            handle.remove()
        prob = torch.sigmoid(out) if out.shape[1] == 1 else torch.softmax(out, dim=1)
        return prob[:, class_index]

    dependent = independent = total = 0.0
    for s in range(samples.shape[0]):
        x = samples[s : s + 1]
        base = probabilities(x)
        with torch.no_grad():
            out = model(x)
        m = (out[:, class_index] > 0 if out.shape[1] == 1 else out.argmax(1) == class_index) if roi is None else roi[s : s + 1]
        prediction = base * m.double()
        total += float(prediction.sum())
        K = _channels(model, layer, x)
        d, i = np.zeros(K), np.zeros(K)
        for k in range(K):
            shape = (1, K) + (1,) * (x.ndim - 2)
            without = torch.ones(K)
            without[k] = 0
            only = torch.zeros(K)
            only[k] = 1
            p_without = probabilities(x, without.view(shape)) * m.double()
            p_only = probabilities(x, only.view(shape)) * m.double()
            d[k] = float((prediction - torch.minimum(p_without, prediction)).sum())
            i[k] = float(torch.minimum(p_only, prediction).sum())
        dependent, independent = dependent + d, independent + i
    return dependent, independent, total


def _channels(model, layer, x):
    store = {}

    def keep_channels(module, inputs, output) -> None:
        store["c"] = output.shape[1]

    handle = dict(model.named_modules())[layer].register_forward_hook(keep_channels)
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    return store["c"]


def _reordering_bounds(result, voxels: int) -> tuple[float, float, float]:
    """How far float64 reordering (other batches, chunks, threads) can move S, each D_k and I_k, and the weights.

    S, D_k and I_k are sums over at most ``voxels`` voxels of probabilities (<= 1) or of differences of
    two of them: each probability moves by at most reordered_float64(1), so S by voxels times that and
    D_k, I_k by twice it. The weights w = (r - min r) / (max r - min r) with r = D I / S then move by at
    most 4 dr / (max r - min r), dr being the largest move of r.
    """
    total = reordered_float64(voxels)
    sums = reordered_float64(2 * voxels)
    d, i, s = result.dependent, result.independent, result.prediction_total
    raw = d * i / s
    moved = (sums * i.max() + d.max() * sums) / s + raw.max() * total / s
    return total, sums, 4 * moved / (raw.max() - raw.min())


def test_only_the_channel_that_reaches_the_class_gets_weight_and_the_map_is_its_activation():
    torch.manual_seed(3)
    model = OneChannelNet()
    x = torch.rand(1, 12, 12)
    with torch.no_grad():
        activation = model.features(x[None])[0, 1]
        assert (2 * torch.relu(activation) - 1 > 0).any(), "the oracle needs a non-empty prediction"
    result = kernel_weighted_detailed(model, x.numpy(), layer="features", target_class=0, device="cpu")
    # Zeroing a channel the class ignores changes each float32 probability P(p) by rounding only, a few
    # float32 ulps of P(p) (the batch composition picks the convolution kernel and so the summation order).
    # Summed over the voxels, D_k of an ignored channel is at most that share of S = sum_p P(p), I_1 equals S
    # to that relative precision, and an ignored channel's min-max weight D_k I_k / (D_1 I_1) is at most
    # that share of S / D_1 (with I_k <= S and I_1 = S).
    rounding = 8 * np.finfo(np.float32).eps
    total = result.prediction_total
    np.testing.assert_allclose(result.dependent[[0, 2]], 0.0, atol=rounding * total)
    np.testing.assert_allclose(result.independent[1], total, rtol=rounding)
    np.testing.assert_allclose(result.weights, [0.0, 1.0, 0.0], atol=rounding * total / result.dependent[1])
    expected = torch.relu(activation) / torch.relu(activation).max()
    # the map is ReLU(w_0 ReLU(A_0) + ReLU(A_1) + w_2 ReLU(A_2)) / its maximum: the ignored channels' weights
    # (bounded above) shift numerator and maximum by at most their share of A_1's peak, and the map and
    # the oracle are each rounded to float32 up to three times (sum, division, cast)
    with torch.no_grad():
        peaks = torch.relu(model.features(x[None])[0]).flatten(1).max(1).values.double().numpy()
    others = float(result.weights[0] * peaks[0] + result.weights[2] * peaks[2]) / peaks[1]
    np.testing.assert_allclose(result.heatmap, expected.numpy(), rtol=0, atol=2 * others + 3 * EPS32)


@pytest.mark.parametrize("with_roi", [False, True])
def test_batched_ablations_equal_brute_force_channel_by_channel(with_roi):
    torch.manual_seed(1)
    model = LocalNet(2, classes=3).double()  # float64: the two sides sum in other orders (batches of 5 vs 1)
    x = torch.randn(1, 10, 10, dtype=torch.float64)
    roi = torch.zeros(10, 10, dtype=torch.bool)
    roi[2:6, 3:8] = True
    result = kernel_weighted_detailed(model, x, layer="features", target_class=1, roi=roi if with_roi else None,
                                      device="cpu", batch_size=5)
    d, i, total = _brute_force(model, x[None], "features", 1, roi[None] if with_roi else None)
    assert total > 0
    total_bound, sums_bound, weights_bound = _reordering_bounds(result, voxels=100)
    np.testing.assert_allclose(result.prediction_total, total, rtol=0, atol=total_bound)
    np.testing.assert_allclose(result.dependent, d, rtol=0, atol=sums_bound)
    np.testing.assert_allclose(result.independent, i, rtol=0, atol=sums_bound)
    raw = d * i / total
    np.testing.assert_allclose(result.weights, (raw - raw.min()) / (raw.max() - raw.min()), rtol=0,
                               atol=weights_bound)


def test_2d_model_over_a_volume_uses_one_weight_set_from_the_slices_with_a_region():
    torch.manual_seed(2)
    model = LocalNet(2, classes=2).double()  # float64: the brute force sums in another order
    volume = torch.randn(1, 8, 9, 4, dtype=torch.float64)  # sliced along the last axis: 4 slices of 8 x 9
    roi = torch.zeros(8, 9, 4, dtype=torch.bool)
    roi[1:5, 2:6, 1] = True
    roi[3:7, 0:4, 3] = True
    result = kernel_weighted_detailed(model, volume, layer="features", target_class=1, roi=roi, spatial_dims=2,
                                      slice_axis=2, device="cpu")
    assert result.heatmap.shape == (8, 9, 4) and result.heatmap.dtype == np.float32
    assert not result.heatmap[..., [0, 2]].any(), "slices with an empty region have a zero map"
    assert result.heatmap.max() == 1.0  # exact: the maximum divided by itself
    samples = volume.movedim(3, 0)
    d, i, total = _brute_force(model, samples[[1, 3]], "features", 1, roi.movedim(2, 0)[[1, 3]])
    _, sums_bound, _ = _reordering_bounds(result, voxels=2 * 8 * 9)
    np.testing.assert_allclose(result.dependent, d, rtol=0, atol=sums_bound)
    np.testing.assert_allclose(result.independent, i, rtol=0, atol=sums_bound)
    assert result.roi_voxels == int(roi.sum())


def test_3d_unet_bottleneck_map_has_the_image_shape_and_chunking_does_not_change_it():
    # float64: D_k subtracts nearly equal sums, which chunks of other sizes add in other orders; in float32
    # the maps differed by 1.4e-5 on one thread (the old tolerance, 1e-5, failed there)
    model = unet(3, classes=3, dtype=torch.float64)
    image = np.random.default_rng(0).random((1, 16, 16, 16))
    whole = kernel_weighted_detailed(model, image, layer="bottleneck", target_class=1, device="cpu")
    single = kernel_weighted_detailed(model, image, layer="bottleneck", target_class=1, device="cpu", batch_size=1)
    assert whole.heatmap.shape == (16, 16, 16) and whole.heatmap.dtype == np.float32
    assert whole.heatmap.min() >= 0 and whole.heatmap.max() == 1.0  # exact: the maximum divided by itself
    assert whole.weights.min() == 0 and whole.weights.max() == 1 and len(whole.weights) == 16
    _, sums_bound, weights_bound = _reordering_bounds(whole, voxels=16**3)
    np.testing.assert_allclose(single.dependent, whole.dependent, rtol=0, atol=sums_bound)
    np.testing.assert_allclose(single.weights, whole.weights, rtol=0, atol=weights_bound)
    # The map ReLU(sum_k w_k ReLU(A_k)) / its peak moves by at most 2 sum_k dw_k max ReLU(A_k) / peak with the
    # weights, plus reordering of A itself, plus each map's roundings to float32 (cast, division): 2 eps32.
    _, activation = hooked_output_and_activation(model, torch.from_numpy(image)[None], "bottleneck")
    relu = torch.relu(activation.detach())[0]
    peak = float(torch.relu(torch.einsum("k...,k->...", relu, torch.from_numpy(whole.weights))).max())
    moved = 2 * weights_bound * float(relu.flatten(1).max(1).values.sum()) / peak
    np.testing.assert_allclose(single.heatmap, whole.heatmap, rtol=0,
                               atol=moved + reordered_float64(1.0) + 2 * EPS32)


def test_empty_region_gives_zeros_and_a_warning():
    model = LocalNet(2, classes=2)
    with pytest.warns(SegHiResCAMWarning, match="empty"):
        heat = kernel_weighted_contribution(model, np.ones((1, 8, 8), np.float32), layer="features", target_class=1,
                                            roi=np.zeros((8, 8), bool), device="cpu")
    assert heat.shape == (8, 8) and not heat.any() and np.isfinite(heat).all()


def test_hooks_removed_and_modes_restored_after_a_run_and_after_a_cancel():
    model = unet(2, classes=3).train()
    model.decoder[0].eval()
    modes = {name: m.training for name, m in model.named_modules()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    image = np.random.default_rng(1).random((1, 16, 16), dtype=np.float32)
    seen = []
    kernel_weighted_contribution(model, image, layer="decoder.0", target_class=0, device="cpu", batch_size=4,
                                 progress=lambda fraction, message: seen.append(fraction))
    assert seen == sorted(seen) and seen[-1] == 1.0 and len(seen) == 2 * 8 // 4  # 16 of 16 passes: exactly 1

    def cancel(fraction, message):
        raise CancelledError("cancelled by the user")

    with pytest.raises(CancelledError):
        kernel_weighted_contribution(model, image, layer="decoder.0", target_class=0, device="cpu", batch_size=4,
                                     progress=cancel)
    assert _hook_count(model) == 0
    assert {name: m.training for name, m in model.named_modules()} == modes
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), f"{key} changed"


def test_unknown_layer_names_close_matches():
    with pytest.raises(LayerError, match="features"):
        kernel_weighted_contribution(LocalNet(2), np.ones((1, 8, 8), np.float32), layer="feature", target_class=0,
                                     device="cpu")


def test_explain_offers_kernel_weighted_contribution_beside_the_gradient_methods():
    from SegHiResCAMLib import explain_detailed

    model = unet(3, classes=3)
    image = np.random.default_rng(3).random((1, 8, 8, 8), dtype=np.float32)
    options = dict(layer="bottleneck", target_class=1, roi=np.ones((8, 8, 8), bool), device="cpu")
    fractions = []
    both = explain_detailed(model, image, methods=("seg-hires-grad-cam", "kernel-weighted-contribution"),
                            progress=lambda fraction, message: fractions.append(fraction), **options)
    assert list(both.maps) == ["seg-hires-grad-cam", "kernel-weighted-contribution"]
    # exact: both run kernel_weighted_detailed with the same arguments, which puts all 2K = 32 ablation
    # passes of this 8^3 volume in one chunk (a few MB, inside any memory budget), then divide the float32
    # map by its peak
    np.testing.assert_array_equal(both.maps["kernel-weighted-contribution"],
                                  kernel_weighted_contribution(model, image, **options))
    assert fractions == sorted(fractions) and fractions[-1] == 1.0  # the last stage's start + share * 1


@pytest.mark.parametrize("options", [dict(target="probability-threshold"), dict(relu=False)])
def test_kernel_weighted_contribution_refuses_options_it_cannot_honour(options):
    from SegHiResCAMLib import explain
    from SegHiResCAMLib.errors import InputError

    with pytest.raises(InputError, match="Kernel-Weighted Contribution"):
        explain(unet(3), np.ones((1, 8, 8, 8), np.float32), layer="bottleneck", target_class=1,
                method="kernel-weighted-contribution", device="cpu", **options)


def test_multi_layer_kernel_weighted_map_is_the_mean_of_the_normalised_layer_maps():
    from SegHiResCAMLib import explain

    model = unet(3, classes=3)
    image = np.random.default_rng(5).random((1, 8, 8, 8), dtype=np.float32)
    options = dict(target_class=1, roi=np.ones((8, 8, 8), bool), method="kernel-weighted-contribution",
                   device="cpu")
    parts = [explain(model, image, layer=name, **options) for name in ("bottleneck", "decoder.0")]
    combined = explain(model, image, layer=["bottleneck", "decoder.0"], **options)
    mean = np.mean(parts, axis=0)
    assert mean.max() > 0
    # exact: each layer's run is the same as alone (one chunk of passes, as above), and the engine divides
    # each float32 map by its peak, halves the sum of the two (exact) and divides by the peak, as here
    np.testing.assert_array_equal(combined, mean / mean.max())
