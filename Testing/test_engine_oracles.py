"""The exact properties of DESIGN.md that any correct Seg-(HiRes-)Grad CAM must satisfy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from SegHiResCAMLib import explain, explain_detailed
from SegHiResCAMLib.errors import SegHiResCAMWarning
from engine_nets import LocalNet, unet
from tolerances import EPS32, float32_of_float64


def _image(shape, seed=1, dtype=np.float64):
    return np.random.default_rng(seed).normal(size=(1, *shape)).astype(dtype)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_hires_on_layer_feeding_1x1_head_equals_roi_times_logit_minus_bias(spatial_dims):
    shape = (16, 16) if spatial_dims == 2 else (8, 12, 16)
    model = unet(spatial_dims, classes=3, dtype=torch.float64)
    image = _image(shape)
    roi = np.zeros(shape, bool)
    roi[..., 2:9, 3:11] = True
    c = 2
    last = f"decoder.{len(model.decoder) - 1}"
    heat = explain(model, image, layer=last, target_class=c, roi=roi, relu=False, normalize=False, device="cpu")
    with torch.no_grad():
        z = model(torch.from_numpy(image)[None])[0, c].numpy()
    expected = roi * (z - model.head.bias[c].item())
    # float64 model: the map is its float64 value rounded once to float32 (the engine's output dtype)
    np.testing.assert_allclose(heat, expected, **float32_of_float64(expected))


def test_seg_grad_cam_on_layer_feeding_1x1_head_is_proportional_to_logit_minus_bias():
    model = unet(2, classes=3, dtype=torch.float64)
    image = _image((16, 16))
    roi = np.zeros((16, 16), bool)
    roi[4:7, 5:12] = True
    heat = explain(model, image, layer="decoder.1", target_class=1, roi=roi, method="seg-grad-cam",
                   relu=False, normalize=False, device="cpu")
    with torch.no_grad():
        z = model(torch.from_numpy(image)[None])[0, 1].numpy()
    expected = roi.mean() * (z - model.head.bias[1].item())  # a count over 256 pixels: exact
    np.testing.assert_allclose(heat, expected, **float32_of_float64(expected))


def test_with_whole_image_roi_hires_and_seg_grad_cam_coincide_at_the_head_input():
    model = unet(2, classes=3, dtype=torch.float64)
    image = _image((16, 16))
    result = explain_detailed(model, image, layer="decoder.1", target_class=1, roi=np.ones((16, 16), bool),
                              methods=("seg-hires-grad-cam", "seg-grad-cam"), relu=False, normalize=False,
                              device="cpu")
    hires, grad = result.maps["seg-hires-grad-cam"], result.maps["seg-grad-cam"]
    assert np.abs(hires).max() > 0
    # the same float64 map up to the rounding of one 256-term mean, then each rounded to float32
    np.testing.assert_allclose(hires, grad, **float32_of_float64(grad))


@pytest.mark.parametrize("method", ["seg-hires-grad-cam", "seg-grad-cam"])
@pytest.mark.parametrize("layer", ["bottleneck", "decoder.0", "encoder.1"])
def test_pre_relu_map_of_disjoint_rois_is_the_sum_of_their_maps(method, layer):
    model = unet(3, classes=3, dtype=torch.float64)
    image = _image((8, 8, 8))
    first = np.zeros((8, 8, 8), bool)
    second = np.zeros((8, 8, 8), bool)
    first[1:4, 1:4, 1:4] = True
    second[5:8, 2:7, 4:8] = True
    options = dict(layer=layer, target_class=1, method=method, relu=False, normalize=False, device="cpu")
    union = explain(model, image, roi=first | second, **options)
    first_map, second_map = (explain(model, image, roi=r, **options).astype(np.float64) for r in (first, second))
    # float64 maps, each returned rounded to float32 (within eps32 / 2 of itself): the three roundings of
    # the union and its parts stay within eps32 * (|first| + |second|)
    np.testing.assert_allclose(union, first_map + second_map, rtol=0,
                               atol=EPS32 * float(np.max(np.abs(first_map) + np.abs(second_map))))


def test_hires_is_zero_outside_the_rois_receptive_field_and_seg_grad_cam_is_not():
    torch.manual_seed(3)
    model = LocalNet(2).double().eval()
    image = _image((20, 20))
    roi = np.zeros((20, 20), bool)
    roi[9:11, 9:11] = True
    options = dict(layer="features", target_class=1, roi=roi, relu=False, normalize=False, device="cpu")
    hires = explain(model, image, method="seg-hires-grad-cam", **options)
    grad = explain(model, image, method="seg-grad-cam", **options)
    reach = np.zeros((20, 20), bool)
    reach[8:12, 8:12] = True  # the ROI dilated by the one 3x3 convolution downstream of the layer
    assert np.all(hires[~reach] == 0)
    assert np.count_nonzero(hires[reach]) > 0
    assert np.count_nonzero(grad[~reach]) > 100


@pytest.mark.parametrize("method", ["seg-hires-grad-cam", "seg-grad-cam", "seg-grad-cam++", "seg-xgrad-cam",
                                    "seg-layer-cam"])
def test_adding_a_constant_to_all_output_biases_changes_no_map(method):
    model = unet(3, classes=3, dtype=torch.float64)
    image = _image((8, 8, 8))
    roi = np.zeros((8, 8, 8), bool)
    roi[2:6, 2:6, 2:6] = True
    options = dict(layer="bottleneck", target_class=2, roi=roi, method=method, normalize=False, device="cpu")
    before = explain(model, image, **options)
    with torch.no_grad():
        model.head.bias += 7.5
    after = explain(model, image, **options)
    # exact: the output bias enters no operation between the layer and its gradient (y is linear in the
    # logits), so the forward up to the layer and the backward from the logits run on identical values
    np.testing.assert_array_equal(before, after)


@pytest.mark.parametrize("roi", [None, "empty"])
def test_empty_roi_gives_an_all_zero_finite_map_and_a_warning(roi):
    model = unet(3, classes=3)
    image = _image((8, 8, 8), dtype=np.float32)
    if roi == "empty":
        region = np.zeros((8, 8, 8), bool)
    else:
        region = None
        with torch.no_grad():
            model.head.bias[:] = torch.tensor([100.0, -100.0, -100.0])  # predicts only class 0
    with pytest.warns(SegHiResCAMWarning, match="all zeros"):
        heat = explain(model, image, layer="bottleneck", target_class=1, roi=region, device="cpu")
    assert heat.shape == (8, 8, 8) and heat.dtype == np.float32
    assert np.all(heat == 0) and np.all(np.isfinite(heat))


def test_background_class_uses_its_own_predicted_mask():
    model = unet(2, classes=3, dtype=torch.float64)
    image = _image((16, 16))
    with torch.no_grad():
        logits = model(torch.from_numpy(image)[None])[0]
        margin = logits[1:].max(0).values - logits[0]
        model.head.bias[0] += margin.median()  # about half of the pixels become background
        prediction = model(torch.from_numpy(image)[None]).argmax(1)[0].numpy()
    assert 0 < (prediction == 0).sum() < prediction.size, "the test needs a partial background"
    implicit = explain(model, image, layer="decoder.1", target_class=0, normalize=False, device="cpu")
    explicit = explain(model, image, layer="decoder.1", target_class=0, roi=prediction == 0, normalize=False,
                       device="cpu")
    np.testing.assert_array_equal(implicit, explicit)
    assert np.all(implicit[prediction != 0] == 0)


def test_normalised_map_peaks_at_one_over_the_whole_volume():
    model = unet(3, classes=3)
    heat = explain(model, _image((8, 8, 8), dtype=np.float32), layer="decoder.0", target_class=1,
                   roi=np.ones((8, 8, 8), bool), device="cpu")
    assert heat.max() == 1.0 and heat.min() >= 0  # exact: the maximum divided by itself
