"""Offscreen slice-view rendering with slicer-core's vtkMRMLSliceLogic, saved as PNG."""

from __future__ import annotations

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")

from mrml_helpers import add_volume, axis_aligned_ijk_to_ras, oblique_ijk_to_ras  # noqa: E402

from SegHiResCAMLib.errors import InputError  # noqa: E402
from SegHiResCAMLib.mrml.heatmap_display import heat_palette, show_heatmap  # noqa: E402
from SegHiResCAMLib.mrml.render import read_png, render_slice_png, render_slice_rgb  # noqa: E402
from SegHiResCAMLib.mrml.scene import new_scene, node_ids  # noqa: E402
from tolerances import geometry_atol  # noqa: E402

SHAPE = (16, 20, 24)  # K, J, I
BOX_LOW = np.array([6, 5, 4])  # first voxel inside the box, as (i, j, k)
BOX_HIGH = np.array([17, 14, 11])  # last voxel inside the box, as (i, j, k)
SIZE = (96, 80)  # width, height


@pytest.fixture
def scene():
    return new_scene()


def _setup(scene, ijk_to_ras):
    """A grey ramp image (left to right) and a heatmap that is 1 in a box, 0 elsewhere."""
    image = np.tile(np.linspace(0.0, 200.0, SHAPE[2], dtype=np.float32), (SHAPE[0], SHAPE[1], 1))
    reference = add_volume(scene, image, ijk_to_ras, name="CT")
    heat = np.zeros(SHAPE, np.float32)
    heat[BOX_LOW[2] : BOX_HIGH[2] + 1, BOX_LOW[1] : BOX_HIGH[1] + 1, BOX_LOW[0] : BOX_HIGH[0] + 1] = 1.0
    heatmap = show_heatmap(scene, heat, reference, opacity=0.5, lower_threshold=0.2)
    return reference, heatmap


def _pixel_ijk(xy_to_ras, ijk_to_ras, height, width):
    """Continuous (i, j, k) of every picture pixel, row 0 at the top."""
    rows, columns = np.mgrid[0:height, 0:width]
    xy = np.stack([columns, height - 1 - rows, np.zeros_like(rows), np.ones_like(rows)]).reshape(4, -1)
    return (np.linalg.inv(ijk_to_ras) @ xy_to_ras @ xy)[:3].T.reshape(height, width, 3)


@pytest.mark.parametrize("orientation", ["Axial", "Sagittal", "Coronal"])
@pytest.mark.parametrize("geometry", [axis_aligned_ijk_to_ras, oblique_ijk_to_ras], ids=["aligned", "oblique"])
def test_heat_appears_where_the_heatmap_is_high_and_nowhere_else(scene, tmp_path, orientation, geometry):
    reference, heatmap = _setup(scene, geometry())
    xy_to_ras = np.zeros((4, 4))
    render_slice_rgb(scene, reference, heatmap, orientation, size=SIZE, xy_to_ras=xy_to_ras)
    path = render_slice_png(scene, reference, heatmap, tmp_path / "with_heat.png", orientation, size=SIZE)
    plain = read_png(render_slice_png(scene, reference, None, tmp_path / "plain.png", orientation, size=SIZE))
    picture = read_png(path)
    assert picture.shape == (SIZE[1], SIZE[0], 3)

    ijk = _pixel_ijk(xy_to_ras, geometry(), SIZE[1], SIZE[0])
    # Linear interpolation reaches one voxel beyond the box; classify only the sure pixels.
    inside = np.all((ijk >= BOX_LOW) & (ijk <= BOX_HIGH), axis=-1)
    outside = np.any((ijk < BOX_LOW - 1) | (ijk > BOX_HIGH + 1), axis=-1)
    assert inside.sum() > 100 and outside.sum() > 100
    changed = np.any(picture != plain, axis=-1)
    assert changed[inside].all()
    assert not changed[outside].any()
    # Heat colour = the table's top colour blended at opacity 0.5 over the grey image. In 8-bit steps: the
    # table colour and the grey value are each quantised (up to 1 step if truncated), halved by the blend,
    # and the blend is quantised again (1 step): 2 steps; 2.5 allows the opacity's own rounding.
    expected = 0.5 * plain[inside].astype(float) + 0.5 * 255 * heat_palette()[-1]
    np.testing.assert_allclose(picture[inside], expected, rtol=0, atol=2.5)
    # The plain image is grey; heat pixels are not.
    grey_pixels = plain[inside | outside]
    assert (grey_pixels.max(axis=1) == grey_pixels.min(axis=1)).all()
    assert (picture[inside, 0] > picture[inside, 2] + 20).all()


def test_slice_through_a_point_away_from_the_box_shows_no_heat(scene, tmp_path):
    ijk_to_ras = axis_aligned_ijk_to_ras()
    reference, heatmap = _setup(scene, ijk_to_ras)
    below_box = ijk_to_ras @ np.array([10.0, 10.0, 1.0, 1.0])  # k = 1 < box's first slice 4
    through_box = ijk_to_ras @ np.array([10.0, 10.0, 7.0, 1.0])
    for point, expect_heat in [(below_box[:3], False), (through_box[:3], True)]:
        picture = render_slice_rgb(scene, reference, heatmap, "Axial", offset_ras=point, size=SIZE)
        plain = render_slice_rgb(scene, reference, None, "Axial", offset_ras=point, size=SIZE)
        assert np.any(picture != plain) == expect_heat


def test_numeric_offset_moves_the_slice_along_its_normal(scene):
    ijk_to_ras = axis_aligned_ijk_to_ras()
    reference, heatmap = _setup(scene, ijk_to_ras)
    s_of_k1 = (ijk_to_ras @ np.array([0.0, 0.0, 1.0, 1.0]))[2]
    xy_to_ras = np.zeros((4, 4))
    picture = render_slice_rgb(scene, reference, heatmap, "Axial", offset_ras=s_of_k1, size=SIZE, xy_to_ras=xy_to_ras)
    assert xy_to_ras[2, 3] == pytest.approx(s_of_k1, rel=0, abs=geometry_atol(s_of_k1))  # float64 matrices
    assert np.array_equal(picture, render_slice_rgb(scene, reference, None, "Axial", offset_ras=s_of_k1, size=SIZE))


def test_opacity_zero_shows_only_the_image(scene):
    reference, heatmap = _setup(scene, axis_aligned_ijk_to_ras())
    hidden = render_slice_rgb(scene, reference, heatmap, "Axial", size=SIZE, opacity=0.0)
    assert np.array_equal(hidden, render_slice_rgb(scene, reference, None, "Axial", size=SIZE))


def test_rendering_leaves_the_scene_and_its_views_as_they_were(scene, tmp_path):
    reference, heatmap = _setup(scene, axis_aligned_ijk_to_ras())
    ids = node_ids(scene)
    views = [
        (c.GetLayoutName(), c.GetBackgroundVolumeID(), c.GetForegroundVolumeID(), c.GetForegroundOpacity())
        for c in (
            scene.GetNthNodeByClass(i, "vtkMRMLSliceCompositeNode")
            for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode"))
        )
    ]
    render_slice_png(scene, reference, heatmap, tmp_path / "a.png", "Coronal", size=(32, 32), opacity=0.9)
    assert node_ids(scene) == ids
    after = [
        (c.GetLayoutName(), c.GetBackgroundVolumeID(), c.GetForegroundVolumeID(), c.GetForegroundOpacity())
        for c in (
            scene.GetNthNodeByClass(i, "vtkMRMLSliceCompositeNode")
            for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode"))
        )
    ]
    assert after == views


def test_works_in_a_bare_scene_without_slice_views(tmp_path):
    scene = slicer.vtkMRMLScene()
    from SegHiResCAMLib.mrml.scene import add_default_color_nodes

    add_default_color_nodes(scene)
    reference, heatmap = _setup(scene, axis_aligned_ijk_to_ras())
    picture = read_png(render_slice_png(scene, reference, heatmap, tmp_path / "bare.png", "Sagittal", size=(40, 30)))
    assert picture.shape == (30, 40, 3)
    assert (picture[..., 0] > picture[..., 2] + 20).any()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"orientation": "Oblique"}, "orientation must be one of"),
        ({"size": (0, 10)}, "size must be"),
        ({"opacity": 2.0}, "opacity must be between"),
        ({"offset_ras": (1.0, 2.0)}, "offset_ras must be"),
    ],
)
def test_bad_options_raise_input_error_and_add_nothing(scene, tmp_path, kwargs, message):
    reference, heatmap = _setup(scene, axis_aligned_ijk_to_ras())
    ids = node_ids(scene)
    with pytest.raises(InputError, match=message):
        render_slice_png(scene, reference, heatmap, tmp_path / "x.png", **kwargs)
    assert node_ids(scene) == ids
    assert not (tmp_path / "x.png").exists()


def test_volume_without_display_node_raises_input_error(scene, tmp_path):
    node = slicer.vtkMRMLScalarVolumeNode()
    node.SetName("raw")
    scene.AddNode(node)
    from SegHiResCAMLib.mrml.volumes import update_node_from_volume
    from SegHiResCAMLib.volume import Volume

    update_node_from_volume(node, Volume(np.zeros(SHAPE, np.float32), np.eye(4)))
    with pytest.raises(InputError, match="'raw' has no display settings"):
        render_slice_png(scene, node, None, tmp_path / "x.png")


def test_png_goes_into_new_folders_and_reads_back_identical(scene, tmp_path):
    reference, heatmap = _setup(scene, axis_aligned_ijk_to_ras())
    picture = render_slice_rgb(scene, reference, heatmap, "Coronal", size=(33, 21))
    path = render_slice_png(scene, reference, heatmap, tmp_path / "new" / "dir" / "c.png", "Coronal", size=(33, 21))
    assert path.endswith("c.png")
    np.testing.assert_array_equal(read_png(path), picture)
