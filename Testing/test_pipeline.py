"""explain_volume: the model card is applied, the engine runs, maps come back on the volume's grid."""

from __future__ import annotations

import numpy as np
import pytest
from tiny_models import brain_like_image, save_tiny_unet

from SegHiResCAMLib.engine.explain import explain_detailed
from SegHiResCAMLib.errors import InputError, LayerError
from SegHiResCAMLib.models.loading import load_model
from SegHiResCAMLib.pipeline import _normalised, explain_volume, resolve_class
from SegHiResCAMLib.volume import Volume



def oblique_matrix() -> np.ndarray:
    """Anisotropic spacing, a rotation that mixes all axes, and an origin far from zero."""
    rotation, _ = np.linalg.qr(np.array([[0.2, -1.0, 0.3], [1.0, 0.1, -0.2], [0.1, 0.3, 1.0]]))
    matrix = np.eye(4)
    matrix[:3, :3] = rotation * np.array([0.9, 1.7, 3.1])
    matrix[:3, 3] = (-31.5, 12.25, 80.125)
    return matrix


OBLIQUE = oblique_matrix()


@pytest.fixture(scope="module")
def tiny3d(tmp_path_factory):
    return load_model(save_tiny_unet(tmp_path_factory.mktemp("models")))


@pytest.fixture(scope="module")
def tiny2d(tmp_path_factory):
    return load_model(save_tiny_unet(tmp_path_factory.mktemp("models2d"), "tiny2d", spatial_dims=2))


def volume(shape=(16, 16, 16), seed=0) -> Volume:
    return Volume(brain_like_image(shape, seed), OBLIQUE)


def central_roi(shape=(16, 16, 16)) -> np.ndarray:
    roi = np.zeros(shape, bool)
    roi[6:10, 5:11, 7:9] = True
    return roi


def test_maps_have_the_volume_grid_and_the_engine_values(tiny3d):
    image = volume()
    roi = central_roi()
    maps, explanation = explain_volume(
        tiny3d, image, target_class=2, roi=roi, layers="bottleneck", methods=("seg-hires-grad-cam", "seg-grad-cam")
    )
    # oracle: the engine on the same (identity-preprocessed, intensity "none") array
    direct = explain_detailed(tiny3d.module, image.array[None], layer="bottleneck", target_class=2, roi=roi,
                              methods=("seg-hires-grad-cam", "seg-grad-cam"), spatial_dims=3)
    assert list(maps) == ["seg-hires-grad-cam", "seg-grad-cam"]
    for method, heat in maps.items():
        assert heat.array.shape == image.spatial_shape and heat.array.dtype == np.float32
        np.testing.assert_array_equal(heat.ijk_to_ras, image.ijk_to_ras)
        # exact: the same engine run on the same array; mapping back is the identity here, and numpy's and
        # torch's float32 division by the peak round alike (IEEE division is correctly rounded)
        np.testing.assert_array_equal(heat.array, direct.maps[method])
        assert heat.array.min() >= 0.0 and heat.array.max() == 1.0  # the maximum divided by itself
    assert explanation.roi_voxels == int(roi.sum())


def test_class_can_be_given_by_name(tiny3d):
    image = volume()
    by_index, _ = explain_volume(tiny3d, image, target_class=2, roi=central_roi())
    by_name, _ = explain_volume(tiny3d, image, target_class="White Matter", roi=central_roi())
    np.testing.assert_array_equal(by_index["seg-hires-grad-cam"].array, by_name["seg-hires-grad-cam"].array)


def test_default_layer_is_the_model_cards_first(tiny3d):
    image = volume()
    default, _ = explain_volume(tiny3d, image, target_class=1, roi=central_roi())
    explicit, _ = explain_volume(tiny3d, image, target_class=1, roi=central_roi(), layers=tiny3d.card.layers[0])
    np.testing.assert_array_equal(default["seg-hires-grad-cam"].array, explicit["seg-hires-grad-cam"].array)


def test_class_outside_the_model_is_refused_with_the_class_list():
    with pytest.raises(InputError, match="class 3 does not exist.*0 = background, 1 = grey matter, 2 = white matter"):
        resolve_class(3, ("background", "grey matter", "white matter"))
    with pytest.raises(InputError, match="no class named 'csf'"):
        resolve_class("csf", ("background", "grey matter", "white matter"))
    assert resolve_class("1", ("a", "b")) == 1


def test_unknown_layer_fails_before_any_work_naming_close_layers(tiny3d):
    calls = []
    with pytest.raises(LayerError, match="'decoder.9' does not exist; nearest names: .*decoder.0"):
        explain_volume(tiny3d, volume(), target_class=2, layers="decoder.9", progress=lambda f, m: calls.append(f))
    assert calls == []


def test_roi_of_another_shape_is_refused(tiny3d):
    with pytest.raises(InputError, match=r"ROI has shape \(8, 8, 8\) but the image has \(16, 16, 16\)"):
        explain_volume(tiny3d, volume(), target_class=2, roi=np.ones((8, 8, 8), bool))


def test_model_without_default_layer_needs_a_layer(tmp_path):
    loaded = load_model(save_tiny_unet(tmp_path, layers=()))
    with pytest.raises(InputError, match="names no default layer.*--layer"):
        explain_volume(loaded, volume(), target_class=2)


def test_empty_roi_gives_zero_maps_and_a_warning(tiny3d):
    maps, explanation = explain_volume(tiny3d, volume(), target_class=2, roi=np.zeros((16, 16, 16), bool))
    assert not np.any(maps["seg-hires-grad-cam"].array)
    assert explanation.warnings


def test_progress_runs_from_zero_to_one_without_going_back(tiny2d):
    fractions = []
    explain_volume(tiny2d, volume(), target_class=2, roi=central_roi(),
                   progress=lambda fraction, message: fractions.append(fraction))
    assert fractions[0] == 0.0 and fractions[-1] == 1.0
    assert all(b >= a for a, b in zip(fractions, fractions[1:]))
    assert len(fractions) > 3


def test_2d_model_runs_slice_by_slice_on_a_volume(tiny2d):
    image = volume()
    roi = central_roi()
    maps, _ = explain_volume(tiny2d, image, target_class=1, roi=roi, layers="decoder.0")
    heat = maps["seg-hires-grad-cam"].array
    assert heat.shape == image.spatial_shape
    # HiRes-CAM is local: slices along the slice axis with no ROI get no map at all
    rows = np.flatnonzero(roi.any(axis=(1, 2)))
    outside = np.setdiff1d(np.arange(16), rows)
    assert np.all(heat[outside] == 0) and heat[rows].max() == 1.0  # exact: the maximum divided by itself


def test_model_wanting_another_spacing_still_gives_maps_on_the_volume_grid(tmp_path):
    loaded = load_model(save_tiny_unet(tmp_path, spacing=(2.0, 2.0, 2.0), orientation="RAS",
                                       intensity={"scheme": "zscore"}))
    image = volume(shape=(16, 20, 24))
    roi = np.zeros(image.spatial_shape, bool)
    roi[5:11, 6:14, 8:16] = True
    maps, _ = explain_volume(loaded, image, target_class=2, roi=roi, methods=("seg-hires-grad-cam", "seg-grad-cam"))
    for heat in maps.values():
        assert heat.array.shape == image.spatial_shape
        np.testing.assert_array_equal(heat.ijk_to_ras, image.ijk_to_ras)
        assert 0.0 <= heat.array.min() and heat.array.max() == 1.0  # exact: the maximum divided by itself


def test_normalisation_is_over_the_whole_volume_and_zero_stays_zero():
    heat = np.zeros((2, 3, 4), np.float32)
    np.testing.assert_array_equal(_normalised(heat), heat)
    heat[0, 0, 0], heat[1, 2, 3], heat[1, 1, 1] = 2.0, 4.0, -0.01
    out = _normalised(heat)
    assert out[1, 2, 3] == 1.0 and out[0, 0, 0] == 0.5 and out[1, 1, 1] == 0.0
    assert not np.isnan(_normalised(np.full((2, 2, 2), np.nan, np.float32))).any()


def test_slice_axis_chosen_by_the_user_overrides_the_model_cards(tiny2d):
    image = volume((15, 14, 13))  # odd sizes: the new in-plane axes must be padded for the U-Net
    assert tiny2d.card.divisible_by == 2 and tiny2d.card.slice_axis == 0
    roi = np.zeros(image.spatial_shape, bool)
    roi[4:12, 4:12, 6:9] = True  # present on every K slice, on only three I slices
    maps, _ = explain_volume(tiny2d, image, target_class=1, roi=roi, layers="decoder.0", slice_axis=2)
    heat = maps["seg-hires-grad-cam"].array
    assert np.all(heat[:, :, :6] == 0) and np.all(heat[:, :, 9:] == 0)
    assert heat[:, :, 6:9].max() == 1.0  # exact: the maximum divided by itself
