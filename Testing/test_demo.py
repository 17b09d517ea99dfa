"""``seghirescam demo`` end to end (on a reduced block): heatmaps on the T1's grid, pictures, report."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from tolerances import geometry_atol

from SegHiResCAMLib.cli import main
from SegHiResCAMLib.demo_run import DATA_DIR, T1_FILE, central_block, share_inside
from SegHiResCAMLib.io.images import read_image
from SegHiResCAMLib.volume import Volume

LIBRARY_PARENT = Path(__file__).resolve().parents[1] / "SegHiResCAM"
SIZE = 24
METHODS = ("seg-hires-grad-cam", "seg-grad-cam")


@pytest.fixture(scope="module")
def data_dir() -> Path:
    """The bundled demo data (T1, white-matter region, both trained models)."""
    return DATA_DIR


@pytest.fixture(scope="module")
def demo_run(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("demo_out")
    import contextlib
    import io

    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(["demo", "--out", str(out), "--size", str(SIZE), "--data", str(data_dir), "--device", "cpu"])
    return code, out, stdout.getvalue()


def assert_same_geometry(path: Path, reference: sitk.Image) -> None:
    """Exact: the demo writes every file from one IJK-to-RAS matrix, through the same code, as NRRD text."""
    image = sitk.ReadImage(str(path))
    assert image.GetSize() == reference.GetSize()
    assert image.GetOrigin() == reference.GetOrigin() and image.GetSpacing() == reference.GetSpacing()
    assert image.GetDirection() == reference.GetDirection()


def test_demo_writes_a_heatmap_per_model_and_method_on_the_t1_grid(demo_run, data_dir):
    code, out, report = demo_run
    assert code == 0
    t1 = sitk.ReadImage(str(out / "mni152_t1.nrrd"))
    assert t1.GetSize() == (SIZE, SIZE, SIZE)
    # the block is the centre of the bundled T1, voxel for voxel and millimetre for millimetre
    whole = read_image(data_dir / T1_FILE)
    starts = [(n - SIZE) // 2 for n in whole.spatial_shape]
    expected = whole.array[starts[0]:starts[0] + SIZE, starts[1]:starts[1] + SIZE, starts[2]:starts[2] + SIZE]
    np.testing.assert_array_equal(sitk.GetArrayFromImage(t1), expected)
    corner = np.array([*starts[::-1], 1.0])
    corner_ras = whole.ijk_to_ras @ corner
    # the block's matrix is the T1's times a shift (4-term sums in float64), written as NRRD text and read
    np.testing.assert_allclose(np.array(t1.GetOrigin()) * [-1, -1, 1], corner_ras[:3], rtol=0,
                               atol=geometry_atol(np.abs(whole.ijk_to_ras) @ np.abs(corner)))
    for model in ("demo_unet3d", "demo_unet2d"):
        for method in METHODS:
            heat_path = out / f"{model}_{method}.nrrd"
            assert_same_geometry(heat_path, t1)
            heat = sitk.GetArrayFromImage(sitk.ReadImage(str(heat_path)))
            assert heat.dtype == np.float32 and 0.0 <= heat.min() and heat.max() <= 1.0
            assert heat_path.name in report
    assert_same_geometry(out / "white_matter_roi.nrrd", t1)
    assert str(out.resolve()) in report and "What to look at" in report


def test_demo_draws_one_three_plane_picture_per_heatmap_through_one_voxel_per_model(demo_run):
    # Before: three pictures per heatmap from Slicer's slice views, without letters, colour bar or title.
    pytest.importorskip("matplotlib")
    from PIL import Image

    from SegHiResCAMLib.pictures import DPI, FIGURE_SIZE

    _, out, report = demo_run
    for model in ("demo_unet3d", "demo_unet2d"):
        planes = set()
        for method in METHODS:
            picture = out / f"{model}_{method}.png"
            assert picture.name in report
            with Image.open(picture) as png:
                assert png.size == (round(FIGURE_SIZE[0] * DPI), round(FIGURE_SIZE[1] * DPI))
                pixels = np.asarray(png.convert("RGB")).astype(int)
                title, description = png.text["Title"], png.text["Description"]
            assert model in title and method in title and "class 2 (" in title
            assert "region: the bundled white-matter segment" in title
            for name, letters in (("axial", "(R L A P)"), ("coronal", "(R L S I)"), ("sagittal", "(P A S I)")):
                assert f"{name} " in description and letters in description
            # a coloured overlay is present: some pixels are not grey
            assert (np.abs(pixels[..., 0] - pixels[..., 2]) > 30).any()
            # the plane positions, without the letters
            planes.add(tuple(part.split(" (")[0] for part in description.split("; ")))
        assert len(planes) == 1  # every method of a model is shown on the same planes
    assert not list(out.glob("*_axial.png"))  # no leftover pictures of the old layout


@pytest.mark.process
def test_demo_without_matplotlib_still_writes_heatmaps_and_says_why_no_pictures(data_dir, tmp_path):
    code = (
        "import sys\n"
        "sys.modules['matplotlib'] = None  # as if matplotlib were not installed: importing it fails\n"
        "from SegHiResCAMLib.cli import main\n"
        f"sys.exit(main(['demo', '--quick', '--size', '16', '--data', {str(data_dir)!r}, '--out', {str(tmp_path)!r}]))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(LIBRARY_PARENT)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    assert "PNG pictures skipped" in done.stderr and "matplotlib" in done.stderr
    assert (tmp_path / "demo_unet3d_seg-hires-grad-cam.nrrd").is_file()
    assert not list(tmp_path.glob("*.png"))
    assert not (tmp_path / "demo_unet2d_seg-grad-cam.nrrd").exists()  # --quick: the 3D model only


def test_demo_with_missing_data_is_one_line_and_exit_1(tmp_path, capsys):
    assert main(["demo", "--data", str(tmp_path), "--out", str(tmp_path / "out")]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "demo image" in lines[0] and "missing" in lines[0]


def test_central_block_keeps_every_voxel_at_its_ras_position():
    rng = np.random.default_rng(0)
    matrix = np.array([[0.0, 2.0, 0.0, 5.0], [-1.5, 0.0, 0.0, -7.0], [0.0, 0.0, 3.0, 11.0], [0, 0, 0, 1]])
    volume = Volume(rng.random((9, 12, 7)).astype(np.float32), matrix)
    block = central_block(volume, 4)
    assert block.spatial_shape == (4, 4, 4)
    starts = np.array([(9 - 4) // 2, (12 - 4) // 2, (7 - 4) // 2])  # K, J, I
    for k, j, i in [(0, 0, 0), (3, 2, 1), (1, 3, 3)]:
        assert block.array[k, j, i] == volume.array[k + starts[0], j + starts[1], i + starts[2]]
        # exact: dyadic matrix entries times small whole numbers, summed: no rounding anywhere
        np.testing.assert_array_equal(block.ijk_to_ras @ [i, j, k, 1],
                                      volume.ijk_to_ras @ [i + starts[2], j + starts[1], k + starts[0], 1])
    assert central_block(volume, 100).spatial_shape == volume.spatial_shape


def test_share_inside_is_the_fraction_of_the_map_in_the_roi():
    heat = np.array([[[1.0, 3.0], [0.0, 0.0]]], np.float32)
    roi = np.array([[[True, False], [False, False]]])
    assert share_inside(heat, roi) == 0.25  # exact: 1 / (1 + 3)
    assert share_inside(np.zeros_like(heat), roi) is None and share_inside(heat, None) is None
