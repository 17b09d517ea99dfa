"""The region of a point: the predicted component that holds it, or a sphere around it.

Oracles: scipy.ndimage.label (computed here, independently of SimpleITK) for the component, the
voxel centres of the whole grid in float64 for the sphere, and the explanation of the component
given as an ordinary region for the pipeline.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.ndimage as ndi
import torch

from SegHiResCAMLib.errors import InputError
from SegHiResCAMLib.models.loading import load_model
from SegHiResCAMLib.pipeline import explain_volume, predicted_region_on_volume
from SegHiResCAMLib.point_region import point_region, point_voxel, predicted_component, sphere_around
from SegHiResCAMLib.settings import ExplainSettings, RegionPoint
from SegHiResCAMLib.volume import Volume

MODEL = Path(__file__).resolve().parents[1] / "SegHiResCAM" / "Resources" / "Models" / "SelfTestBallUNet.pt"
IJK_TO_RAS = np.array([[-1.2, 0, 0, 20.0], [0, -1.2, 0, -5.0], [0, 0, 2.0, 7.0], [0, 0, 0, 1]])
# Two bright balls (k, j, i centres and radii): the self-test model predicts each as one component.
BALLS = ((np.array([10.0, 10.0, 10.0]), 4.0), (np.array([21.0, 22.0, 20.0]), 5.0))


def oblique() -> np.ndarray:
    rotation, _ = np.linalg.qr(np.array([[0.2, -1.0, 0.3], [1.0, 0.1, -0.2], [0.1, 0.3, 1.0]]))
    matrix = np.eye(4)
    matrix[:3, :3] = rotation * np.array([0.9, 1.7, 3.1])
    matrix[:3, 3] = (-31.5, 12.25, 80.125)
    return matrix


def ras_of(matrix: np.ndarray, kji) -> np.ndarray:
    """The RAS position of a (possibly fractional) voxel index (k, j, i)."""
    k, j, i = (float(v) for v in kji)
    return (matrix @ np.array([i, j, k, 1.0]))[:3]


def centres_ras(matrix: np.ndarray, shape) -> np.ndarray:
    """(K, J, I, 3) RAS positions of every voxel centre, float64."""
    k, j, i = np.indices(shape, dtype=float)
    return np.einsum("ab,kjib->kjia", matrix[:3, :3], np.stack([i, j, k], axis=-1)) + matrix[:3, 3]


# -- the voxel that holds a point ------------------------------------------------------------


def test_a_voxel_centre_and_points_within_half_a_voxel_find_that_voxel():
    matrix, shape = oblique(), (7, 9, 11)
    for kji in [(0, 0, 0), (6, 8, 10), (3, 4, 5)]:
        assert point_voxel(matrix, shape, ras_of(matrix, kji)) == kji
        assert point_voxel(matrix, shape, ras_of(matrix, np.add(kji, (0.49, -0.49, 0.3)))) == kji


@pytest.mark.parametrize("kji", [(-0.51, 0, 0), (0, 0, 10.5), (7.2, 4, 4)])
def test_a_point_outside_the_image_is_refused_saying_what_to_do(kji):
    matrix = oblique()
    with pytest.raises(InputError, match=r"lies outside the image .*; place the point inside the image$"):
        point_voxel(matrix, (7, 9, 11), ras_of(matrix, kji))


# -- the predicted component -----------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_component_is_scipys_face_connected_label_at_the_point(seed):
    predicted = np.random.default_rng(seed).random((14, 15, 16)) > 0.62
    labels, count = ndi.label(predicted)  # scipy's default structure: 6-connectivity in 3D
    assert count > 20  # many components, so picking the right one matters
    sizes = np.bincount(labels.ravel())[1:]
    for label in np.argsort(sizes)[-3:] + 1:  # the three largest
        voxel = tuple(np.argwhere(labels == label)[0])
        np.testing.assert_array_equal(predicted_component(predicted, voxel), labels == label)
    background = tuple(np.argwhere(~predicted)[0])
    assert not predicted_component(predicted, background).any()


def test_voxels_touching_only_at_an_edge_or_a_corner_are_separate_regions():
    predicted = np.zeros((3, 3, 3), bool)
    predicted[0, 0, 0] = predicted[1, 1, 0] = predicted[2, 2, 1] = True  # an edge and a corner apart
    assert predicted_component(predicted, (0, 0, 0)).sum() == 1
    assert ndi.label(predicted, structure=np.ones((3, 3, 3)))[1] == 1  # 26-connectivity would join all three


# -- the sphere ------------------------------------------------------------------------------


@pytest.mark.parametrize("radius", [0.4, 2.5, 6.0])
@pytest.mark.parametrize("matrix", [np.diag([0.8, 1.3, 2.5, 1.0]), oblique()], ids=["anisotropic", "oblique"])
def test_the_sphere_holds_exactly_the_voxel_centres_within_the_radius(matrix, radius):
    shape = (12, 13, 14)
    point = ras_of(matrix, (5.3, 6.1, 2.2))  # off-centre, near the I = 0 border
    expected = np.linalg.norm(centres_ras(matrix, shape) - point, axis=-1) <= radius
    expected[point_voxel(matrix, shape, point)] = True  # the voxel holding the point, even for a tiny radius
    sphere = sphere_around(matrix, shape, point, radius)
    np.testing.assert_array_equal(sphere, expected)
    assert sphere.sum() >= 1


def test_the_sphere_has_the_lattice_count_of_its_radius_and_spacing():
    # Isotropic 2 mm voxels, radius 10 mm, centred on a voxel: the integer points with
    # x^2 + y^2 + z^2 <= 25, counted shell by shell (r3(n): points on the sphere x^2+y^2+z^2 = n).
    r3 = [1, 6, 12, 8, 6, 24, 24, 0, 12, 30, 24, 24, 8, 24, 48, 0, 6, 48, 36, 24, 24, 48, 24, 0, 24, 30]
    matrix = np.diag([2.0, 2.0, 2.0, 1.0])
    sphere = sphere_around(matrix, (20, 20, 20), ras_of(matrix, (10, 10, 10)), 10.0)
    assert sphere.sum() == sum(r3) == 515
    # 4/3 pi (r / spacing)^3 = 523.6: the lattice count is within its known error of the volume
    assert abs(sphere.sum() - 4 / 3 * np.pi * 5**3) < 0.05 * 515


def test_point_region_takes_the_component_where_predicted_and_the_sphere_elsewhere():
    matrix, shape = oblique(), (10, 10, 10)
    predicted = np.zeros(shape, bool)
    predicted[2:5, 2:5, 2:5] = True
    predicted[7:9, 7:9, 7:9] = True
    inside = point_region(predicted, matrix, RegionPoint(ras_of(matrix, (3, 3, 3)), 4.0))
    assert inside.predicted and inside.voxel == (3, 3, 3)
    np.testing.assert_array_equal(inside.mask, ndi.label(predicted)[0] == 1)
    outside = point_region(predicted, matrix, RegionPoint(ras_of(matrix, (5.5, 6.2, 0.4)), 4.0))
    assert not outside.predicted
    np.testing.assert_array_equal(outside.mask, sphere_around(matrix, shape, ras_of(matrix, (5.5, 6.2, 0.4)), 4.0))
    assert "sphere of radius 4 mm" in outside.describe(RegionPoint((0, 0, 0), 4.0), 1)


# -- through the pipeline: the model's own prediction -----------------------------------------


@pytest.fixture(scope="module")
def ball_model():
    return load_model(MODEL)


def two_balls(size: int = 32) -> Volume:
    rng = np.random.default_rng(1)
    grid = np.indices((size,) * 3)
    balls = np.zeros((size,) * 3, bool)
    for centre, radius in BALLS:
        balls |= ((grid - centre[:, None, None, None]) ** 2).sum(0) <= radius**2
    return Volume((rng.normal(100.0, 10.0, balls.shape) + 30.0 * balls).astype(np.float32), IJK_TO_RAS)


def model_prediction(ball_model, image: Volume) -> np.ndarray:
    """The model's argmax == 1, computed here: the card's z-score by hand, one forward pass."""
    x = (image.array - image.array.mean()) / image.array.std()
    with torch.no_grad():
        logits = ball_model.module(torch.from_numpy(x.astype(np.float32))[None, None])
    return (logits.argmax(1) == 1)[0].numpy()


def test_the_volume_prediction_is_the_models_argmax(ball_model):
    from SegHiResCAMLib.models.preprocess import prepare_input

    image = two_balls()
    settings = ExplainSettings(target_class=1, device="cpu")
    predicted = predicted_region_on_volume(ball_model, prepare_input(image, ball_model.card), settings, ball_model.card)
    np.testing.assert_array_equal(predicted, model_prediction(ball_model, image))


def test_a_point_on_one_ball_explains_that_ball_alone(ball_model):
    image = two_balls()
    predicted = model_prediction(ball_model, image)
    labels, count = ndi.label(predicted)
    assert count == 2, "the model must see the two balls as two regions for this test to mean anything"
    centre = BALLS[0][0]
    component = labels == labels[tuple(centre.astype(int))]
    point = RegionPoint(ras_of(IJK_TO_RAS, centre), radius_mm=5.0)
    settings = dict(target_class=1, device="cpu", methods=("seg-hires-grad-cam", "seg-grad-cam"))

    maps, explanation = explain_volume(ball_model, image, ExplainSettings(point=point, **settings))
    given, given_explanation = explain_volume(ball_model, image, ExplainSettings(**settings), roi=component)
    whole, _ = explain_volume(ball_model, image, ExplainSettings(**settings))
    assert explanation.roi_voxels == given_explanation.roi_voxels == int(component.sum()) < int(predicted.sum())
    for method in settings["methods"]:
        np.testing.assert_array_equal(maps[method].array, given[method].array)
    assert not np.array_equal(maps["seg-hires-grad-cam"].array, whole["seg-hires-grad-cam"].array)
    # The point is on the prediction, so no note about it; a method whose map ReLU empties says so.
    empty = [method for method in settings["methods"] if maps[method].array.max() == 0]
    assert "seg-hires-grad-cam" not in empty
    assert len(explanation.warnings) == len(empty)
    assert all("no positive evidence" in note for note in explanation.warnings)


def test_a_point_where_nothing_is_predicted_explains_the_sphere_and_says_so(ball_model):
    image = two_balls()
    corner = np.array([2.0, 28.0, 3.0])
    assert not model_prediction(ball_model, image)[tuple(corner.astype(int))]
    point = RegionPoint(ras_of(IJK_TO_RAS, corner), radius_mm=4.0)
    maps, explanation = explain_volume(ball_model, image, ExplainSettings(target_class=1, device="cpu", point=point))
    sphere = sphere_around(IJK_TO_RAS, image.spatial_shape, point.ras, 4.0)
    given, _ = explain_volume(ball_model, image, ExplainSettings(target_class=1, device="cpu"), roi=sphere)
    np.testing.assert_array_equal(maps["seg-hires-grad-cam"].array, given["seg-hires-grad-cam"].array)
    assert explanation.roi_voxels == int(sphere.sum())
    note, *rest = explanation.warnings
    assert note.startswith("the model predicts no voxel of class 1 at the point")
    # ... and, where the sphere holds no positive evidence for the class, that the map is empty for it.
    assert len(rest) == int(maps["seg-hires-grad-cam"].array.max() == 0)
    assert all("no positive evidence" in other for other in rest)
    assert f"({int(sphere.sum())} voxels)" in note


def test_a_point_outside_the_image_is_refused_before_the_model_runs(ball_model):
    image = two_balls()
    calls = []
    handle = ball_model.module.register_forward_hook(lambda *args: calls.append(1))
    try:
        with pytest.raises(InputError, match="lies outside the image"):
            explain_volume(ball_model, image, ExplainSettings(target_class=1, point=RegionPoint((500.0, 0.0, 0.0))))
    finally:
        handle.remove()
    assert calls == []


def test_the_engine_alone_refuses_a_point_it_cannot_place():
    from SegHiResCAMLib.engine.explain import explain_with_settings

    with pytest.raises(InputError, match="pipeline.explain_volume"):
        explain_with_settings(torch.nn.Sequential(torch.nn.Conv3d(1, 2, 1)), np.zeros((1, 4, 4, 4), np.float32),
                              ExplainSettings(target_class=1, layers=("0",), point=RegionPoint((0, 0, 0))))


# -- the command line --------------------------------------------------------------------------


def run_cli(argv, capsys) -> tuple[int, str, str]:
    from SegHiResCAMLib.cli import main

    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_the_command_line_point_explains_the_component_the_library_does(ball_model, tmp_path, capsys):
    from SegHiResCAMLib.io.images import read_image, write_image

    image = two_balls()
    write_image(image, tmp_path / "balls.nrrd")
    image = read_image(tmp_path / "balls.nrrd")  # as the command line reads it
    labels, _ = ndi.label(model_prediction(ball_model, image))
    centre = BALLS[1][0]
    component = labels == labels[tuple(centre.astype(int))]
    r, a, s = ras_of(IJK_TO_RAS, centre + 0.3)  # inside the centre voxel's cell
    code, out, err = run_cli(["explain", "--image", tmp_path / "balls.nrrd", "--model", MODEL, "--class", 1,
                              "--point", r, a, s, "--device", "cpu", "--out", tmp_path / "heat.nrrd"], capsys)
    assert code == 0, err
    assert f"region {int(component.sum())} voxels" in out and "warning" not in err
    expected, _ = explain_volume(ball_model, image, ExplainSettings(target_class=1, device="cpu"), roi=component)
    # exact: the same code on the same values in this process (the same component, counted above)
    np.testing.assert_array_equal(read_image(tmp_path / "heat.nrrd").array, expected["seg-hires-grad-cam"].array)


@pytest.mark.parametrize("flags, words", [
    (["--region", "point"], "the region kind 'point' needs a point"),
    (["--point-radius", "5"], "--point-radius needs --point R A S"),
    (["--point", "500", "0", "0"], "the point (500.0, 0.0, 0.0) lies outside the image balls.nrrd"),
    (["--point", "0", "0", "0", "--roi", "roi.nrrd"], "a region was given, but the region kind 'point'"),
])
def test_the_command_line_refuses_a_point_it_cannot_use_before_reading_the_model(flags, words, tmp_path, capsys):
    from SegHiResCAMLib.io.images import write_image

    image = two_balls()
    write_image(image, tmp_path / "balls.nrrd")
    write_image(image.with_array(np.ones(image.spatial_shape, np.uint8)), tmp_path / "roi.nrrd")
    flags = [tmp_path / flag if flag == "roi.nrrd" else flag for flag in flags]
    code, out, err = run_cli(["explain", "--image", tmp_path / "balls.nrrd", "--model", tmp_path / "absent.pt",
                              "--class", 1, "--out", tmp_path / "heat.nrrd", *flags], capsys)
    assert code == 1 and err.count("\n") == 1 and words in err, err
    assert not (tmp_path / "heat.nrrd").exists()
