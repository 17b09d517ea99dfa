"""nnU-Net v2 results folders: network from the plans, weights as tensors, nnU-Net's preprocessing and back."""

from __future__ import annotations

import numpy as np
import pytest

from SegHiResCAMLib import explain
from SegHiResCAMLib.errors import UnsafeModelError
from SegHiResCAMLib.models.loading import load_model
from SegHiResCAMLib.models.preprocess import prepare_input
from SegHiResCAMLib.pipeline import explain_volume
from SegHiResCAMLib.volume import Volume

from model_kinds import blob_image, nnunet_network, write_nnunet_folder
from tolerances import linear_function_resampled

pytest.importorskip("dynamic_network_architectures")

LAYER = "decoder.stages.1"  # the full-resolution decoder stage


def ct_volume(shape=(14, 18, 20), spacing=(0.9, 1.1, 2.5)) -> Volume:
    """An oblique, anisotropic CT-like volume (HU) that is zero (air-free padding) outside a box."""
    direction = np.array([[0.0, 0.0, -1.0], [-1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])  # I->P, J->S, K->L
    ijk_to_ras = np.eye(4)
    ijk_to_ras[:3, :3] = direction * np.asarray(spacing)
    ijk_to_ras[:3, 3] = [-20.0, 15.0, 40.0]
    array = np.zeros(shape, np.float32)
    array[2:12, 3:16, 2:18] = blob_image((10, 13, 16), seed=5)[0] * 400.0 - 50.0
    return Volume(array, ijk_to_ras)


def ras_of_grid(ijk_to_ras, shape):
    kji = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).astype(float)
    return kji[..., ::-1] @ ijk_to_ras[:3, :3].T + ijk_to_ras[:3, 3]


@pytest.mark.parametrize("class_name, old_plans", [("PlainConvUNet", False), ("ResidualEncoderUNet", False),
                                                   ("PlainConvUNet", True)])
def test_folder_loads_the_plans_network_and_explains_identically(tmp_path, class_name, old_plans):
    network = nnunet_network(class_name)
    folder = write_nnunet_folder(tmp_path, network, class_name=class_name, old_plans=old_plans)
    for path in (folder, folder / "fold_0", folder / "fold_0" / "checkpoint_final.pth"):
        loaded = load_model(path)
        assert loaded.kind == "nnunet"
    image = blob_image((8, 16, 16), seed=6)
    for method in ("seg-hires-grad-cam", "seg-grad-cam"):
        expected = explain(network, image, layer=LAYER, target_class=1, method=method, device="cpu")
        got = explain(loaded.module, image, layer=LAYER, target_class=1, method=method, device="cpu")
        assert expected.max() > 0
        # exact: the plans build the same dynamic_network_architectures class with the same weights
        np.testing.assert_array_equal(got, expected)


def test_card_carries_nnunets_preprocessing(tmp_path):
    card = load_model(write_nnunet_folder(tmp_path, nnunet_network())).card
    assert card.class_names == ("background", "liver", "tumour") and card.in_channels == 1
    assert card.transpose == (2, 0, 1) and card.crop_nonzero and card.outputs == "logits"
    # plans spacing (2, 1, 1) is along the transposed axes (I, K, J) -> I, J, K order
    assert card.spacing == (2.0, 1.0, 1.0)
    assert card.divisible_by == 4 and card.default_layer == LAYER
    assert card.intensity["channels"] == [{"scheme": "clip-zscore", "window": [-100.0, 300.0], "mean": 50.0,
                                           "std": 80.0}]


def test_preprocessed_image_is_nnunets_crop_normalise_transpose(tmp_path):
    """At the plans' own spacing nothing is resampled: the model input is exactly nnU-Net's recipe."""
    volume = ct_volume()  # spacing I, J, K = 0.9, 1.1, 2.5 -> transposed (I, K, J) = 0.9, 2.5, 1.1
    loaded = load_model(write_nnunet_folder(tmp_path, nnunet_network(), spacing=(0.9, 2.5, 1.1)))
    prepared = prepare_input(volume, loaded.card)
    cropped = volume.array[2:12, 3:16, 2:18]
    expected = ((np.clip(cropped, -100.0, 300.0) - 50.0) / 80.0).transpose(2, 0, 1)
    shape = expected.shape
    # exact: the same float32 clip, subtraction and division in the same order, then only a transpose
    np.testing.assert_array_equal(prepared.image[0][: shape[0], : shape[1], : shape[2]], expected)
    assert np.all(prepared.image[0][shape[0]:] == 0)  # padding to multiples of 4


def test_heatmap_on_the_preprocessed_grid_maps_back_onto_the_original_geometry(tmp_path):
    loaded = load_model(write_nnunet_folder(tmp_path, nnunet_network()))
    volume = ct_volume()
    prepared = prepare_input(volume, loaded.card)
    weights = np.array([0.2, -0.4, 0.3])
    heat = (ras_of_grid(prepared.model_ijk_to_ras, prepared.image.shape[1:]) @ weights + 5.0).astype(np.float32)
    back = prepared.heatmap_to_volume(heat)
    expected = ras_of_grid(volume.ijk_to_ras, volume.spatial_shape) @ weights + 5.0
    inner = (slice(3, 11), slice(4, 15), slice(3, 17))  # the non-zero box less one voxel
    slope = np.abs(weights @ prepared.model_ijk_to_ras[:3, :3]).max()  # change per model voxel
    np.testing.assert_allclose(back[inner], expected[inner], rtol=0, atol=linear_function_resampled(
        np.abs(heat).max(), slope, max(prepared.image.shape[1:])))
    outside = np.ones(volume.spatial_shape, bool)
    outside[2:12, 3:16, 2:18] = False
    assert np.all(back[outside] == 0)


def test_explaining_a_volume_gives_a_map_on_its_own_grid(tmp_path):
    loaded = load_model(write_nnunet_folder(tmp_path, nnunet_network()))
    volume = ct_volume()
    maps, _ = explain_volume(loaded, volume, target_class="liver", device="cpu")
    heat = maps["seg-hires-grad-cam"]
    assert heat.array.shape == volume.spatial_shape and heat.array.dtype == np.float32
    np.testing.assert_array_equal(heat.ijk_to_ras, volume.ijk_to_ras)
    assert heat.array.max() == 1.0  # exact: the maximum divided by itself


def test_checkpoint_with_pickled_objects_is_refused(tmp_path):
    from fractions import Fraction

    folder = write_nnunet_folder(tmp_path, nnunet_network(), extra_pickle=Fraction(1, 3))
    with pytest.raises(UnsafeModelError, match="arbitrary code"):
        load_model(folder)


def test_plans_may_only_name_network_classes(tmp_path):
    import json

    folder = write_nnunet_folder(tmp_path, nnunet_network())
    plans = json.loads((folder / "plans.json").read_text())
    plans["configurations"]["3d_fullres"]["architecture"]["network_class_name"] = "os.system"
    (folder / "plans.json").write_text(json.dumps(plans))
    with pytest.raises(UnsafeModelError, match="only classes from dynamic_network_architectures"):
        load_model(folder)


def test_checkpoint_written_with_numpy_1_names_loads(tmp_path):
    """nnU-Net checkpoints from numpy 1 name numpy.core.multiarray.scalar in their training logs."""
    import zipfile

    import torch

    from SegHiResCAMLib.models.nnunet import load_checkpoint

    torch.save({"network_weights": {"w": torch.ones(2)}, "logging": {"loss": [np.float64(0.5)]}}, tmp_path / "new.pth")
    with zipfile.ZipFile(tmp_path / "new.pth") as source, zipfile.ZipFile(tmp_path / "old.pth", "w") as target:
        for info in source.infolist():
            data = source.read(info.filename)
            if info.filename.endswith("data.pkl"):
                assert b"numpy._core.multiarray" in data
                data = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
            target.writestr(info.filename, data)
    assert list(load_checkpoint(tmp_path / "old.pth")) == ["w"]


def test_2d_configuration_explains_slice_by_slice_on_the_volume_grid(tmp_path):
    network = nnunet_network(dims=2)
    loaded = load_model(write_nnunet_folder(tmp_path, network, dims=2))
    card = loaded.card
    assert card.spatial_dims == 2 and card.slice_axis == 0 and card.transpose == (2, 0, 1)
    assert card.spacing == (None, 1.0, 1.0)  # in-plane (K, J after transposing) only; I (the slice axis) kept
    image = blob_image((3, 16, 16), seed=9)
    roi = np.zeros((3, 16, 16), bool)
    roi[:, 4:12, 4:12] = True
    expected = explain(network, image, layer=LAYER, target_class=1, roi=roi, spatial_dims=2, device="cpu")
    got = explain(loaded.module, image, layer=LAYER, target_class=1, roi=roi, spatial_dims=2, device="cpu")
    assert expected.max() > 0
    np.testing.assert_array_equal(got, expected)  # exact, as above
    volume = ct_volume()
    box = np.zeros(volume.spatial_shape, bool)
    box[4:10, 5:14, 4:16] = True
    maps, _ = explain_volume(loaded, volume, target_class="liver", roi=box, device="cpu")
    assert maps["seg-hires-grad-cam"].array.shape == volume.spatial_shape
    assert maps["seg-hires-grad-cam"].array.max() == 1.0  # exact: the maximum divided by itself


def test_region_based_model_explains_where_each_regions_sigmoid_exceeds_one_half(tmp_path):
    import torch

    regions = {"background": 0, "whole tumour": [1, 2, 3], "tumour core": [2, 3], "enhancing": 3}
    network = nnunet_network()
    loaded = load_model(write_nnunet_folder(tmp_path, network, labels=regions))
    assert loaded.card.multilabel and loaded.card.class_names == ("whole tumour", "tumour core", "enhancing")
    volume = ct_volume()
    _, explanation = explain_volume(loaded, volume, target_class=1, layers=LAYER, device="cpu")
    # the model runs as nnU-Net runs it (auto: windows of the plans' patch), so the region is the fused logits'
    from SegHiResCAMLib.engine.sliding_window import predict
    from SegHiResCAMLib.windows import window_for_card

    prepared = prepare_input(volume, loaded.card)
    logits = torch.from_numpy(predict(network, prepared.image, sliding_window=window_for_card(loaded.card),
                                      device="cpu"))
    # only the image's voxels count, not the padding the preprocessing adds around it
    inside = torch.from_numpy(np.asarray(prepared.roi_to_model(np.ones(volume.spatial_shape, bool))))
    assert explanation.roi_voxels == int(((logits[1] > 0) & inside).sum()) != int(((logits.argmax(0) == 1) & inside).sum())
