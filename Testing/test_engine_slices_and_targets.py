"""Slice-by-slice explanation of volumes with 2D models, the threshold target, and the methods' formulas."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from SegHiResCAMLib import METHODS, explain, explain_detailed
from SegHiResCAMLib.engine.methods import seg_grad_cam, seg_hires_grad_cam
from SegHiResCAMLib.errors import SegHiResCAMWarning
from engine_nets import hooked_output_and_activation, unet
from tolerances import (EPS32, assert_within, float32_of_float64, float32_of_reordered_float64, reordered_float64,
                        sum_error)


def _volume(shape=(6, 16, 16), seed=2):
    return np.random.default_rng(seed).normal(size=(1, *shape))


@pytest.mark.parametrize("slice_axis", [0, 1, 2])
def test_slice_wise_map_equals_each_slice_explained_alone(slice_axis):
    model = unet(2, classes=3, dtype=torch.float64)
    shape = [16, 16, 16]
    shape[slice_axis] = 5
    volume = _volume(tuple(shape))
    roi = np.zeros(shape, bool)
    roi[1:4, 2:14, 3:12] = True
    options = dict(layer="bottleneck", target_class=1, normalize=False, device="cpu")
    whole = explain(model, volume, roi=roi, spatial_dims=2, slice_axis=slice_axis, **options)
    for index in range(shape[slice_axis]):
        take = lambda a: np.take(a, index, axis=a.ndim - 3 + slice_axis)  # noqa: E731
        alone = explain(model, take(volume), roi=take(roi), **options)
        # float64 model: a batch of slices may pick another convolution kernel (another order of the
        # sums) than one slice; each map is then rounded to float32
        np.testing.assert_allclose(take(whole), alone, **float32_of_reordered_float64(alone))


def test_a_slice_explained_inside_a_batch_equals_the_slice_explained_alone():
    model = unet(2, classes=3, dtype=torch.float64)
    volume = _volume((8, 16, 16))
    options = dict(layer="decoder.0", target_class=2, spatial_dims=2, normalize=False, device="cpu",
                   methods=("seg-hires-grad-cam", "seg-grad-cam"))
    batched = explain_detailed(model, volume, batch_size=8, **options)
    single = explain_detailed(model, volume, batch_size=1, **options)
    for method in batched.maps:
        # float64 model; the batch size changes only the order of the sums
        np.testing.assert_allclose(batched.maps[method], single.maps[method],
                                   **float32_of_reordered_float64(single.maps[method]))


def test_slices_outside_the_roi_are_skipped_and_zero():
    model = unet(2, classes=3)
    volume = _volume((40, 16, 16)).astype(np.float32)
    roi = np.zeros((40, 16, 16), bool)
    roi[[3, 17], 4:10, 4:10] = True
    messages = []
    result = explain_detailed(model, volume, layer="bottleneck", target_class=1, roi=roi, spatial_dims=2,
                              device="cpu", progress=lambda fraction, message: messages.append(message))
    assert messages[-1] == "explained 2 of 2 slices"
    explained = np.flatnonzero(result.heatmap.reshape(40, -1).max(1))
    assert set(explained) <= {3, 17} and len(explained) > 0


def test_slice_wise_normalisation_is_over_the_whole_volume_not_per_slice():
    model = unet(2, classes=3)
    volume = _volume((4, 16, 16)).astype(np.float32)
    heat = explain(model, volume, layer="bottleneck", target_class=1, roi=np.ones((4, 16, 16), bool),
                   spatial_dims=2, device="cpu")
    per_slice_max = heat.reshape(4, -1).max(1)
    assert per_slice_max.max() == 1.0  # exact: the maximum divided by itself
    assert per_slice_max.min() < 0.999


def _reference_gradient(model, image, layer, score_of_output):
    x = torch.from_numpy(image)[None]
    out, activation = hooked_output_and_activation(model, x, layer)
    gradient, = torch.autograd.grad(score_of_output(out), activation)
    return activation.detach(), gradient


def test_probability_threshold_target_sums_class_probabilities_above_the_threshold():
    model = unet(2, classes=3, dtype=torch.float64)
    image = np.random.default_rng(4).normal(size=(1, 16, 16))
    with torch.no_grad():
        t = torch.softmax(model(torch.from_numpy(image)[None]), dim=1)[:, 1].median().item()

    def score(out):
        s = torch.softmax(out, dim=1)[:, 1]
        return (s * (s > t).double()).sum()

    activation, gradient = _reference_gradient(model, image, "bottleneck", score)
    expected = seg_hires_grad_cam(activation, gradient)
    expected = torch.nn.functional.interpolate(expected[:, None], size=(16, 16), mode="bilinear",
                                               align_corners=False)[0, 0].numpy()
    heat = explain(model, image, layer="bottleneck", target_class=1, target="probability-threshold",
                   threshold=t, normalize=False, relu=False, device="cpu")
    assert np.abs(expected).max() > 0
    # float64 model and float64 reference (the same graph with hooks): the map is rounded once to float32
    np.testing.assert_allclose(heat, expected, **float32_of_float64(expected))


def _one_channel_model(image):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.Conv2d(4, 1, 1)).double().eval()
    with torch.no_grad():
        model[2].bias -= model(torch.from_numpy(image)[None]).median()  # about half the logits positive
    return model


def test_probability_threshold_target_of_a_one_channel_model_uses_the_sigmoid():
    image = np.random.default_rng(5).normal(size=(1, 12, 12))
    model = _one_channel_model(image)

    def score(out):
        s = torch.sigmoid(out)[:, 0]
        return (s * (s > 0.5).double()).sum()

    activation, gradient = _reference_gradient(model, image, "1", score)
    expected = seg_grad_cam(activation, gradient)[0].numpy()
    assert np.abs(expected).max() > 0
    heat = explain(model, image, layer="1", target_class=0, target="probability-threshold", method="seg-grad-cam",
                   normalize=False, relu=False, device="cpu")
    np.testing.assert_allclose(heat, expected, **float32_of_float64(expected))  # as above


def test_logit_target_of_a_one_channel_model_explains_where_the_logit_is_positive():
    image = np.random.default_rng(6).normal(size=(1, 12, 12))
    model = _one_channel_model(image)
    with torch.no_grad():
        positive = (model(torch.from_numpy(image)[None])[0, 0] > 0).numpy()
    implicit = explain(model, image, layer="1", target_class=0, normalize=False, device="cpu")
    explicit = explain(model, image, layer="1", target_class=0, roi=positive, normalize=False, device="cpu")
    assert 0 < positive.sum() < positive.size and implicit.max() > 0
    np.testing.assert_array_equal(implicit, explicit)


def _random_pair(shape=(2, 5, 6, 7), seed=7):
    generator = torch.Generator().manual_seed(seed)
    activation = torch.rand(shape, generator=generator, dtype=torch.float64)
    gradient = torch.randn(shape, generator=generator, dtype=torch.float64)
    return activation, gradient


def _definitions(an: np.ndarray, gn: np.ndarray) -> dict:
    """The methods' formulas in numpy, written out from their papers."""
    spatial = (2, 3)
    alpha = gn**2 / (2 * gn**2 + an.sum(spatial, keepdims=True) * gn**3)
    return {
        "seg-hires-grad-cam": (gn * an).sum(1),
        "seg-grad-cam": (gn.mean(spatial, keepdims=True) * an).sum(1),
        "seg-grad-cam++": ((alpha * np.maximum(gn, 0)).sum(spatial, keepdims=True) * an).sum(1),
        "seg-xgrad-cam": (((gn * an).sum(spatial, keepdims=True) / an.sum(spatial, keepdims=True)) * an).sum(1),
        "seg-layer-cam": (np.maximum(gn, 0) * an).sum(1),
    }


def test_method_formulas_match_their_definitions_elementwise():
    a, g = _random_pair()
    expected = _definitions(a.numpy(), g.numpy())
    # The magnitudes the sums add up: the same formulas with |g| (a >= 0), so nothing cancels. numpy and
    # torch sum in other orders: each value is a spatial sum of 42 terms and a channel sum of 5 of
    # products and quotients (alpha's denominator 2 g^2 + sum(a) g^3 > 0 wherever ReLU(g) keeps a term),
    # within (42 + 5 + 8 elementwise operations) * eps64 of those magnitudes, in float64.
    magnitudes = _definitions(a.numpy(), np.abs(g.numpy()))
    assert set(expected) == set(METHODS)
    for name, method in METHODS.items():
        assert_within(method(a, g).numpy(), expected[name], sum_error(42 + 5 + 8, magnitudes[name], np.float64), name)


def test_hires_equals_grad_cam_when_the_gradient_is_spatially_constant():
    a, g = _random_pair()
    g = g.mean(dim=(2, 3), keepdim=True).expand_as(a)
    # the mean of 42 equal values is that value within 42 * eps64 of it; then a channel sum of 5 products
    magnitude = (g.abs() * a).sum(1).numpy()
    assert_within(seg_hires_grad_cam(a, g).numpy(), seg_grad_cam(a, g).numpy(),
                  sum_error(42 + 5 + 1, magnitude, np.float64))


def test_grad_cam_plus_plus_is_finite_for_huge_roi_scores():
    a, g = _random_pair()
    out = METHODS["seg-grad-cam++"](a * 1e6, g * 1e3)
    assert torch.isfinite(out).all()
    zero = METHODS["seg-grad-cam++"](a, torch.zeros_like(g))
    assert torch.count_nonzero(zero) == 0


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_runs_on_3d_and_returns_the_input_shape(method):
    model = unet(3, classes=2)
    heat = explain(model, np.random.default_rng(0).random((1, 8, 12, 16), dtype=np.float32), layer="bottleneck",
                   target_class=1, roi=np.ones((8, 12, 16), bool), method=method, device="cpu")
    assert heat.shape == (8, 12, 16) and np.isfinite(heat).all()
    assert heat.min() >= 0 and heat.max() <= 1


def test_multi_layer_map_is_the_mean_of_the_normalised_layer_maps():
    model = unet(3, classes=3, dtype=torch.float64)
    image = np.random.default_rng(8).random((1, 8, 8, 8))
    options = dict(target_class=1, roi=np.ones((8, 8, 8), bool), device="cpu", normalize=True)
    parts = [explain(model, image, layer=name, **options).astype(np.float64)
             for name in ("bottleneck", "decoder.0", "decoder.1")]
    combined = explain(model, image, layer=["bottleneck", "decoder.0", "decoder.1"], **options)
    mean = np.mean(parts, axis=0)
    # float64 model; each part is a map in [0, 1] rounded to float32 (within eps32 / 2), so their mean is
    # too; dividing by the mean's maximum (>= 1/3: each part peaks at 1) makes that 3 eps32 / 2, and the
    # combined map's own rounding to float32 adds eps32 / 2: 2 eps32 in all, plus float64 reordering
    np.testing.assert_allclose(combined, mean / mean.max(), rtol=0, atol=2 * EPS32 + reordered_float64(1.0))


def test_multilabel_models_explain_where_the_class_sigmoid_exceeds_one_half():
    model = unet(2, classes=3, dtype=torch.float64)
    image = np.random.default_rng(9).normal(size=(1, 16, 16))
    with torch.no_grad():
        logits = model(torch.from_numpy(image)[None])[0]
        model.head.bias[2] -= logits[2].median()  # half the pixels above sigmoid 0.5, overlapping other classes
        positive = (model(torch.from_numpy(image)[None])[0, 2] > 0).numpy()
    options = dict(layer="decoder.1", target_class=2, normalize=False, relu=False, device="cpu")
    implicit = explain(model, image, multilabel=True, **options)
    assert np.count_nonzero(implicit) == positive.sum() > 0
    explicit = explain(model, image, roi=positive, **options)
    argmax = explain(model, image, **options)
    np.testing.assert_array_equal(implicit, explicit)
    assert not np.array_equal(implicit, argmax)


def test_models_that_output_probabilities_are_explained_without_squashing_them_again():
    logits_model = unet(2, classes=3, dtype=torch.float64)
    softmax_model = torch.nn.Sequential(logits_model, torch.nn.Softmax(dim=1)).eval()
    image = np.random.default_rng(10).normal(size=(1, 16, 16))
    with torch.no_grad():
        t = softmax_model(torch.from_numpy(image)[None])[:, 1].median().item()  # half the pixels above
    options = dict(target_class=1, target="probability-threshold", threshold=t, normalize=False, relu=False,
                   device="cpu")
    from_logits = explain(logits_model, image, layer="decoder.1", **options)
    from_probabilities = explain(softmax_model, image, layer="0.decoder.1", probabilities=True, **options)
    assert np.abs(from_logits).max() > 0
    # exact: the engine's softmax of the logits and the model's nn.Softmax are the same kernel on the same
    # values, and the threshold, target and backward then run on identical numbers
    np.testing.assert_array_equal(from_probabilities, from_logits)
    # the predicted region of a probability output is its argmax, exactly as for the logits
    implicit = explain(softmax_model, image, layer="0.decoder.1", target_class=1, probabilities=True,
                       normalize=False, device="cpu")
    with torch.no_grad():
        region = (logits_model(torch.from_numpy(image)[None]).argmax(1)[0] == 1).numpy()
    explicit = explain(softmax_model, image, layer="0.decoder.1", target_class=1, roi=region, normalize=False,
                       device="cpu")
    np.testing.assert_array_equal(implicit, explicit)


def test_threshold_target_says_when_no_voxel_passes_the_threshold():
    model = unet(2, classes=3)
    with pytest.warns(SegHiResCAMWarning, match="no voxel inside the region has a class-1 probability above 0.999"):
        explain(model, np.zeros((1, 16, 16), np.float32), layer="bottleneck", target_class=1,
                roi=np.ones((16, 16), bool), target="probability-threshold", threshold=0.999, device="cpu")
