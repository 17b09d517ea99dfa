"""Preprocessing from the model card, and the exact way back onto the volume's grid."""

from __future__ import annotations

import numpy as np
import pytest

from SegHiResCAMLib.errors import InputError, ModelError
from SegHiResCAMLib.models.card import ModelCard
from SegHiResCAMLib.models.preprocess import normalize_intensity, prepare_input
from SegHiResCAMLib.volume import Volume
from tolerances import EPS32, linear_function_resampled


def oblique_volume(shape=(12, 20, 24), spacing=(0.8, 1.5, 3.0), seed=0) -> Volume:
    """A volume whose I, J, K point to P, S, L, anisotropic spacing, non-zero only in a box."""
    direction = np.array([[0.0, 0.0, -1.0], [-1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    ijk_to_ras = np.eye(4)
    ijk_to_ras[:3, :3] = direction * np.asarray(spacing)
    ijk_to_ras[:3, 3] = [10.0, -5.0, 3.0]
    array = np.zeros(shape, np.float32)
    box = tuple(slice(min(lo, s - 1), s - hi) for lo, hi, s in zip((2, 3, 4), (2, 2, 3), shape))
    inner = array[box]
    inner[...] = np.random.default_rng(seed).random(inner.shape) + 1.0
    return Volume(array, ijk_to_ras)


def ras_of_grid(ijk_to_ras: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """RAS position of every voxel of an array of ``shape`` read as (K, J, I)."""
    kji = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).astype(float)
    return kji[..., ::-1] @ ijk_to_ras[:3, :3].T + ijk_to_ras[:3, 3]


def test_identity_card_keeps_grid_and_maps_back_exactly():
    volume = oblique_volume()
    prepared = prepare_input(volume, ModelCard())
    np.testing.assert_array_equal(prepared.image[0], volume.array)
    heat = np.random.default_rng(1).random(volume.spatial_shape).astype(np.float32)
    np.testing.assert_array_equal(prepared.heatmap_to_volume(heat), heat)
    # exact: with nothing to reorient, crop, resample or transpose, the model grid's matrix is the volume's
    # times permutation and identity matrices, which only move entries and add zeros
    np.testing.assert_array_equal(prepared.model_ijk_to_ras, volume.ijk_to_ras)


def test_reorientation_is_a_lossless_axis_permutation_with_the_right_geometry():
    volume = oblique_volume()
    prepared = prepare_input(volume, ModelCard(orientation="RAS"))
    model = prepared.model_ijk_to_ras
    # I, J, K of the model grid point to R, A, S with positive steps
    assert np.all(np.diag(model[:3, :3]) > 0) and np.count_nonzero(model[:3, :3]) == 3
    # every model voxel holds the volume's value at the same RAS position
    ras = ras_of_grid(model, prepared.image.shape[1:])
    back_index = (ras - volume.ijk_to_ras[:3, 3]) @ np.linalg.inv(volume.ijk_to_ras[:3, :3]).T
    kji = np.rint(back_index[..., ::-1]).astype(int)
    np.testing.assert_array_equal(prepared.image[0], volume.array[kji[..., 0], kji[..., 1], kji[..., 2]])
    heat = prepared.image[0] * 2
    np.testing.assert_array_equal(prepared.heatmap_to_volume(heat), volume.array * 2)


def test_heatmap_on_nnunet_style_grid_maps_back_onto_the_original_geometry():
    """Anisotropic spacing, non-identity direction, crop, resampling, transpose and padding:
    a map that is a linear function of the RAS position on the model grid comes back as the
    same function of position on the volume grid (linear interpolation reproduces it exactly)."""
    volume = oblique_volume()
    card = ModelCard(spacing=(1.0, 1.0, 2.0), transpose=(2, 0, 1), crop_nonzero=True, divisible_by=4,
                     intensity={"scheme": "zscore", "nonzero_only": True})
    prepared = prepare_input(volume, card)
    shape = prepared.image.shape[1:]
    assert all(size % 4 == 0 for size in shape)
    weights = np.array([0.3, -0.2, 0.5])
    heat = (ras_of_grid(prepared.model_ijk_to_ras, shape) @ weights + 7.0).astype(np.float32)
    back = prepared.heatmap_to_volume(heat)
    expected = ras_of_grid(volume.ijk_to_ras, volume.spatial_shape) @ weights + 7.0
    inside = np.zeros(volume.spatial_shape, bool)
    inside[3:9, 4:17, 5:20] = True  # the crop box minus one voxel (edge voxels are clamped)
    slope = np.abs(weights @ prepared.model_ijk_to_ras[:3, :3]).max()  # change per model voxel
    np.testing.assert_allclose(back[inside], expected[inside], rtol=0,
                               atol=linear_function_resampled(np.abs(heat).max(), slope, max(shape)))
    assert np.all(back[volume.array == 0][:10] == 0) and back[0].max() == 0  # outside the crop: 0


def test_reorient_plus_resample_round_trips_the_geometry():
    volume = oblique_volume()
    card = ModelCard(orientation="LPS", spacing=(1.2, 0.7, 2.5), transpose=(2, 1, 0), divisible_by=8)
    prepared = prepare_input(volume, card)
    weights = np.array([-0.1, 0.4, 0.25])
    heat = (ras_of_grid(prepared.model_ijk_to_ras, prepared.image.shape[1:]) @ weights).astype(np.float32)
    back = prepared.heatmap_to_volume(heat)
    expected = ras_of_grid(volume.ijk_to_ras, volume.spatial_shape) @ weights
    slope = np.abs(weights @ prepared.model_ijk_to_ras[:3, :3]).max()  # change per model voxel
    bound = linear_function_resampled(np.abs(heat).max(), slope, max(prepared.image.shape[1:]))
    np.testing.assert_allclose(back[1:-1, 1:-1, 1:-1], expected[1:-1, 1:-1, 1:-1], rtol=0, atol=bound)


def test_roi_follows_the_image_onto_the_model_grid():
    volume = oblique_volume()
    # after reorientation to RAS, I, J, K are the old K, I, J: the spacing below is the volume's own
    card = ModelCard(orientation="RAS", spacing=(3.0, 0.8, 1.5), transpose=(2, 1, 0), crop_nonzero=True, divisible_by=4)
    prepared = prepare_input(volume, card)
    roi = volume.array > 1.5
    moved = prepared.roi_to_model(roi)
    assert moved.dtype == bool and moved.shape == prepared.image.shape[1:]
    # same spacing: the ROI lands exactly on the voxels of the image it selected
    np.testing.assert_array_equal(moved, prepared.image[0] > 1.5)


def test_2d_model_pads_only_in_plane():
    volume = oblique_volume(shape=(5, 18, 22))
    prepared = prepare_input(volume, ModelCard(spatial_dims=2, slice_axis=0, divisible_by=8))
    assert prepared.image.shape == (1, 5, 24, 24)
    assert prepared.heatmap_to_volume(np.ones((5, 24, 24), np.float32)).shape == (5, 18, 22)


@pytest.mark.parametrize(
    "intensity, expected",
    [
        ({"scheme": "ct-window", "window": [-100, 300]}, [0.0, 0.25, 0.75, 1.0]),
        ({"scheme": "ct-window", "window": [-100, 300], "range": [-1, 1]}, [-1.0, -0.5, 0.5, 1.0]),
        ({"scheme": "clip-zscore", "window": [-100, 300], "mean": 100, "std": 50}, [-4.0, -2.0, 2.0, 4.0]),
        ({"scheme": "minmax"}, [0.0, 200 / 1200, 400 / 1200, 1.0]),
    ],
)
def test_intensity_schemes(intensity, expected):
    image = np.array([[-200.0, 0.0, 200.0, 1000.0]], np.float32)
    # at most four float32 operations (clip, shift, scale by a factor rounded to float32, shift), each within
    # eps32 / 2 of its result; none of the intermediate values here exceeds 1 + |result| in size after scaling
    np.testing.assert_allclose(normalize_intensity(image, intensity)[0], expected, rtol=0,
                               atol=4 * EPS32 * (1.0 + np.abs(expected)).max())


def test_zscore_inside_the_nonzero_region_leaves_the_background_at_zero():
    image = np.array([[0.0, 0.0, 1.0, 3.0]], np.float32)
    out = normalize_intensity(image, {"scheme": "zscore", "nonzero_only": True})[0]
    np.testing.assert_array_equal(out, [0.0, 0.0, -1.0, 1.0])  # exact: 1 and 3 have mean 2 and std 1


def test_per_channel_schemes_apply_to_their_own_channel():
    image = np.array([[0.0, 10.0], [0.0, 10.0]], np.float32)
    out = normalize_intensity(image, {"scheme": "per-channel", "channels": [{"scheme": "minmax"}, {"scheme": "none"}]})
    np.testing.assert_array_equal(out, [[0.0, 1.0], [0.0, 10.0]])  # exact: (x - 0) / 10 and x itself


def test_card_rejects_bad_geometry_fields():
    with pytest.raises(ModelError, match="orientation"):
        ModelCard(orientation="RAR")
    with pytest.raises(ModelError, match="transpose"):
        ModelCard(transpose=(0, 0, 1))
    with pytest.raises(ModelError, match="spacing"):
        ModelCard(spacing=(1.0, 1.0))


def test_wrong_channel_count_is_an_input_error():
    with pytest.raises(InputError, match="2 image channel"):
        prepare_input(oblique_volume(), ModelCard(in_channels=2))


def test_card_round_trips_through_json(tmp_path):
    card = ModelCard(spacing=(1.0, None, 2.0), transpose=(2, 1, 0), crop_nonzero=True, orientation="lps")
    card.save(tmp_path / "card.json")
    assert ModelCard.load(tmp_path / "card.json") == card
