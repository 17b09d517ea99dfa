"""nnU-Net folders run as nnU-Net runs them: every fold, its resampling, its normalisation mask, its patch size."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from SegHiResCAMLib.engine.capture import forward_with_activations
from SegHiResCAMLib.engine.explain import explain_detailed
from SegHiResCAMLib.engine.sliding_window import explain_windows, predict
from SegHiResCAMLib.models.card import ModelCard
from SegHiResCAMLib.models.loading import load_model
from SegHiResCAMLib.models.preprocess import prepare_input
from SegHiResCAMLib.volume import Volume
from SegHiResCAMLib.windows import SlidingWindow, window_for_card

from model_kinds import blob_image, hooked, monai_unet, nnunet_network, write_bundle, write_nnunet_folder
from tolerances import float32_of_reordered_float64, reordered_float64

pytest.importorskip("dynamic_network_architectures")
pytest.importorskip("scipy")

LAYER = "decoder.stages.1"
EPS32 = float(np.finfo(np.float32).eps)


def two_fold_folder(tmp_path):
    first, second = nnunet_network(seed=0), nnunet_network(seed=1)
    folder = write_nnunet_folder(tmp_path, first)
    other = write_nnunet_folder(tmp_path / "b", second)
    (folder / "fold_1").mkdir()
    shutil.copy(other / "fold_0" / "checkpoint_final.pth", folder / "fold_1" / "checkpoint_final.pth")
    return folder, [first, second]


def test_a_results_folder_runs_every_trained_fold_and_a_fold_folder_runs_one(tmp_path):
    folder, networks = two_fold_folder(tmp_path)
    loaded = load_model(folder)
    assert loaded.card.extra["nnunet"]["folds"] == ["fold_0", "fold_1"]
    assert loaded.card.patch_size == (16, 16, 16)
    x = torch.from_numpy(blob_image((8, 16, 16), seed=2))[None]
    with torch.no_grad():
        expected = (networks[0](x) + networks[1](x)) / 2
        # the same two outputs averaged, perhaps in another order: one float32 rounding of the mean
        np.testing.assert_allclose(loaded.module(x).numpy(), expected.numpy(), rtol=0,
                                   atol=EPS32 * float(expected.abs().max()))
        single = load_model(folder / "fold_1").module
        np.testing.assert_array_equal(single(x).numpy(), networks[1](x).numpy())


def test_the_ensembles_map_is_the_sum_of_each_folds_map_for_its_share(tmp_path):
    folder, networks = two_fold_folder(tmp_path)
    ensemble = load_model(folder).module.double()  # float64: the ensemble and the folds sum in other orders
    networks = [network.double() for network in networks]
    image = blob_image((8, 16, 16), seed=3).astype(np.float64)
    roi = np.zeros((8, 16, 16), bool)
    roi[2:6, 4:12, 3:13] = True
    methods = ("seg-hires-grad-cam", "seg-grad-cam", "seg-grad-cam++", "seg-xgrad-cam", "seg-layer-cam")
    signed = dict(relu=False, normalize=False, device="cpu")
    got = explain_detailed(ensemble, image, layer=LAYER, target_class=1, roi=roi, methods=methods, **signed).maps
    # each fold's share of y = sum m (z_0 + z_1) / 2 is its own target with the region's weights halved
    shares = [explain_detailed(n, image, layer=LAYER, target_class=1, roi=roi.astype(np.float32) / 2,
                               methods=methods, **signed).maps for n in networks]
    windowed = explain_windows(ensemble, image, layers=[LAYER], class_index=1, roi=roi, methods=methods,
                               window=SlidingWindow((8, 8, 8)), **signed).maps
    windowed_shares = [explain_windows(n, image, layers=[LAYER], class_index=1, roi=roi.astype(np.float32) / 2,
                                       methods=methods, window=SlidingWindow((8, 8, 8)), **signed).maps
                       for n in networks]
    for method in methods:
        expected = shares[0][method] + shares[1][method]
        assert np.abs(expected).max() > 0
        # float32 maps of float64 runs; the sum of the two shares adds one float32 rounding more
        tolerance = float32_of_reordered_float64(expected)
        tolerance["atol"] += EPS32 * np.abs(expected).max()
        np.testing.assert_allclose(got[method], expected, err_msg=method, **tolerance)
        expected = windowed_shares[0][method] + windowed_shares[1][method]
        tolerance = float32_of_reordered_float64(expected)
        tolerance["atol"] += EPS32 * np.abs(expected).max()
        np.testing.assert_allclose(windowed[method], expected, err_msg=method, **tolerance)


def test_the_ensembles_later_layers_keep_their_total_derivative(tmp_path):
    folder, networks = two_fold_folder(tmp_path)
    ensemble = load_model(folder).module
    x = torch.from_numpy(blob_image((8, 16, 16), seed=4))[None].double()
    ensemble.double()
    layers = ["decoder.stages.1", "decoder.stages.0"]  # given out of execution order on purpose
    output, activations = forward_with_activations(ensemble, x, layers)
    gradients = torch.autograd.grad(output[:, 1].sum(), activations)
    for index, network in enumerate(networks):
        network.double()
        out, acts = hooked(network, x.clone().requires_grad_(), layers)
        expected = torch.autograd.grad(out[:, 1].sum() / 2, acts)
        for act, grad, ref_act, ref_grad in zip(activations, gradients, acts, expected):
            width = ref_act.shape[1]
            part = slice(index * width, (index + 1) * width)
            # float64: the ensemble runs each fold's layers on the same values, perhaps in other orders
            torch.testing.assert_close(act[:, part], ref_act, rtol=0, atol=reordered_float64(ref_act.abs().max()))
            torch.testing.assert_close(grad[:, part], ref_grad, rtol=0, atol=reordered_float64(ref_grad.abs().max()))


def test_the_normalisation_mask_is_nnunets_hole_filled_nonzero_region(tmp_path):
    """A zero-valued hole inside the body is inside nnU-Net's mask: it is z-scored with the rest."""
    folder = write_nnunet_folder(tmp_path, nnunet_network(), spacing=(1.0, 1.0, 1.0))
    plans = json.loads((folder / "plans.json").read_text())
    plans["configurations"]["3d_fullres"].update(normalization_schemes=["ZScoreNormalization"],
                                                 use_mask_for_norm=[True])
    (folder / "plans.json").write_text(json.dumps(plans))
    card = load_model(folder).card
    array = np.zeros((12, 14, 16), np.float32)
    body = (slice(2, 10), slice(2, 12), slice(3, 13))
    array[body] = 100.0 + blob_image((8, 10, 10), seed=5)[0] * 50.0
    array[5:7, 6:8, 7:9] = 0.0  # a hole of 8 zero voxels, enclosed
    prepared = prepare_input(Volume(array, np.eye(4)), card)
    inside = array[body].astype(np.float64)
    mask = np.ones(inside.shape, bool)  # the whole box: non-zero voxels and the filled hole
    expected = (inside - inside[mask].mean()) / inside[mask].std()  # float64
    got = prepared.image[0][: inside.shape[2], : inside.shape[0], : inside.shape[1]]  # transposed (2, 0, 1)
    # The model input is computed in float32: a mean and a standard deviation of n voxels (pairwise sums,
    # within ceil(log2 n) eps32 of their magnitudes), a subtraction and a division; relative to the std,
    # and scaled by 1 + |z| for the error in the std itself.
    n = inside.size
    bound = (2 * np.ceil(np.log2(n)) + 2) * EPS32 * np.abs(inside).max() / inside.std() * (1 + np.abs(expected).max())
    np.testing.assert_allclose(got, expected.transpose(2, 0, 1), rtol=0, atol=bound)
    assert got.transpose(1, 2, 0)[3:5, 4:6, 4:6].max() < -1  # the hole is normalised, not left at 0


def test_thick_slices_are_resampled_on_their_own_axis_with_nearest_neighbours(tmp_path):
    """nnU-Net: spacing ratio above 3 -> in-plane spline per slice, nearest along the thick axis."""
    folder = write_nnunet_folder(tmp_path, nnunet_network(), transpose=(0, 1, 2), spacing=(1.0, 1.0, 1.0))
    card = load_model(folder).card
    array = blob_image((6, 16, 16), seed=6)[0] * 100.0 + 200.0
    ijk_to_ras = np.diag([1.0, 1.0, 5.0, 1.0])  # K (the array's first axis) is 5 mm thick
    prepared = prepare_input(Volume(array, ijk_to_ras), card)
    model = prepared.image[0][:30]  # 6 slices * 5 mm -> 30 slices of 1 mm (then padding to multiples of 4)
    clip = np.clip(array, -100.0, 300.0)  # the folder's CT normalisation
    expected = (clip - 50.0) / 80.0
    for k in range(30):
        source = min(int(np.floor((k + 0.5) / 5.0)), 5)
        # nearest along K copies slices; the cubic spline in-plane at the same grid reproduces them up to
        # float64 rounding, then rounds to float32 (eps32 / 2 of each value): 2 eps32 of the largest
        np.testing.assert_allclose(model[k], expected[source], rtol=0, atol=2 * EPS32 * np.abs(expected).max())


def test_card_patch_size_from_plans_and_from_a_bundles_inferer(tmp_path):
    card = load_model(write_nnunet_folder(tmp_path / "n", nnunet_network())).card
    assert window_for_card(card) == SlidingWindow((16, 16, 16), step=0.5, gaussian=True)
    bundle = write_bundle(tmp_path / "bundle", monai_unet())
    config = json.loads((bundle / "configs" / "inference.json").read_text())
    config["inferer"] = {"_target_": "SlidingWindowInferer", "roi_size": [32, 32, 16], "sw_batch_size": 2,
                         "overlap": 0.25}
    (bundle / "configs" / "inference.json").write_text(json.dumps(config))
    card = load_model(bundle).card
    assert card.patch_size == (32, 32, 16)
    assert window_for_card(card) == SlidingWindow((32, 32, 16), step=0.75, gaussian=False)
    again = ModelCard.from_dict(json.loads(json.dumps(card.to_dict())))
    assert again.patch_size == (32, 32, 16)
    with pytest.raises(Exception, match="patch_size"):
        ModelCard(spatial_dims=3, patch_size=(16, 16))


def test_predict_with_the_cards_window_runs_the_ensemble_over_windows(tmp_path):
    folder, networks = two_fold_folder(tmp_path)
    loaded = load_model(folder)
    image = blob_image((20, 24, 16), seed=7)
    window = window_for_card(loaded.card)
    fused = predict(loaded.module, image, sliding_window=window, device="cpu")
    each = [predict(n, image, sliding_window=window, device="cpu") for n in networks]
    # Fusion is linear: the two orders of averaging folds and windows differ by the rounding of a convex
    # combination of at most 8 overlapping windows, a division and the mean of two: 16 float32 roundings
    np.testing.assert_allclose(fused, (each[0] + each[1]) / 2, rtol=0, atol=16 * EPS32 * np.abs(fused).max())


def test_windows_tile_the_unpadded_image_as_nnunet_does(tmp_path):
    card = load_model(write_nnunet_folder(tmp_path, nnunet_network(), spacing=(1.0, 1.0, 1.0))).card
    volume = Volume(blob_image((13, 18, 10), seed=8)[0] * 100.0 + 50.0, np.eye(4))
    padded = prepare_input(volume, card)
    unpadded = prepare_input(volume, card, pad_to_divisible=False)
    assert unpadded.image.shape == (1, 10, 13, 18)  # transposed (2, 0, 1), nothing added
    assert padded.image.shape == (1, 12, 16, 20)  # multiples of 4
    np.testing.assert_array_equal(padded.image[:, :10, :13, :18], unpadded.image)
    heat = np.arange(unpadded.image[0].size, dtype=np.float32).reshape(unpadded.image.shape[1:])
    np.testing.assert_array_equal(unpadded.heatmap_to_volume(heat), heat.transpose(1, 2, 0))
