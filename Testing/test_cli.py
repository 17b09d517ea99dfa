"""The ``seghirescam`` command line: explain, layers, errors as one line, the progress bar."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from tiny_models import save_tiny_unet, write_oblique_image
from tolerances import geometry_atol

from SegHiResCAMLib.cli import ProgressBar, main
from SegHiResCAMLib.io.images import read_image, read_mask
from SegHiResCAMLib.models.loading import load_model
from SegHiResCAMLib.pipeline import explain_volume

LIBRARY_PARENT = Path(__file__).resolve().parents[1] / "SegHiResCAM"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli")
    model = save_tiny_unet(folder)
    for suffix in (".nrrd", ".nii.gz"):
        write_oblique_image(folder / f"t1{suffix}")
    reference = sitk.ReadImage(str(folder / "t1.nrrd"))
    labels = np.zeros((16, 16, 16), np.uint8)
    labels[5:11, 4:12, 6:10] = 2
    labels[1:3, 1:3, 1:3] = 1
    seg = sitk.GetImageFromArray(labels)
    seg.CopyInformation(reference)
    for index, (name, value) in enumerate([("grey matter", 1), ("white matter", 2)]):
        seg.SetMetaData(f"Segment{index}_Name", name)
        seg.SetMetaData(f"Segment{index}_LabelValue", str(value))
    sitk.WriteImage(seg, str(folder / "brain.seg.nrrd"))
    return folder, model


def run(argv, capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("in_suffix", [".nrrd", ".nii.gz"])
@pytest.mark.parametrize("out_suffix", [".nrrd", ".nii.gz"])
def test_heatmap_read_back_has_the_input_origin_spacing_and_direction(files, capsys, in_suffix, out_suffix):
    folder, model = files
    out = folder / f"heat_{in_suffix.strip('.')}{out_suffix}"
    code, stdout, stderr = run(["explain", "--image", folder / f"t1{in_suffix}", "--model", model, "--class", "2",
                                "--roi", folder / "brain.seg.nrrd", "--roi-label", "2", "--out", out,
                                "--device", "cpu"], capsys)
    assert code == 0, stderr
    assert stderr == ""  # not a terminal: no progress bar, no noise
    assert f"wrote {out}" in stdout
    source, written = sitk.ReadImage(str(folder / f"t1{in_suffix}")), sitk.ReadImage(str(out))
    assert written.GetSize() == source.GetSize()
    stored = np.float32 if ".nii" in in_suffix + out_suffix else np.float64  # NIfTI keeps float32 geometry
    for get in (sitk.Image.GetOrigin, sitk.Image.GetSpacing, sitk.Image.GetDirection):
        np.testing.assert_allclose(get(written), get(source), rtol=0, atol=geometry_atol(get(source), stored))
    heat = sitk.GetArrayFromImage(written)
    assert heat.dtype == np.float32 and heat.min() >= 0 and heat.max() == 1.0  # the maximum divided by itself


def test_roi_segment_by_name_and_class_by_name_give_the_same_map_as_the_library(files, capsys):
    folder, model = files
    out = folder / "heat_named.nrrd"
    code, _, stderr = run(["explain", "--image", folder / "t1.nrrd", "--model", model, "--class", "white matter",
                           "--roi", folder / "brain.seg.nrrd", "--roi-label", "white matter",
                           "--method", "seg-grad-cam", "--out", out], capsys)
    assert code == 0, stderr
    image = read_image(folder / "t1.nrrd")
    maps, _ = explain_volume(load_model(model), image, target_class=2, methods=("seg-grad-cam",),
                             roi=read_mask(folder / "brain.seg.nrrd", image, label=2))
    # exact: the command line runs the same code on the same values in this process, and writes float32
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(out))), maps["seg-grad-cam"].array)


def _display_pixel(axis, cut, row: int, column: int, height: int) -> tuple[int, int]:
    """PNG (row, column) of the centre of a plane's voxel, through the axis' own data transform."""
    left, right, bottom, top = cut.extent
    rows, columns = cut.heat.shape
    x = left + (column + 0.5) * (right - left) / columns
    y = top - (row + 0.5) * (top - bottom) / rows  # imshow's row 0 is at the top
    px, py = axis.transData.transform((x, y))
    return int(height - py), int(px)  # display y grows upwards, PNG rows downwards


def test_png_is_three_planes_with_title_letters_and_heat_where_the_map_is_hot(files, capsys):
    # Before: one axial slice drawn by Slicer's slice views at the centre, with no letters, colour bar or title.
    pytest.importorskip("matplotlib")
    from PIL import Image

    from SegHiResCAMLib.pictures import DPI, FIGURE_SIZE, PLANES, hottest_voxel, plane, three_plane_figure

    folder, model = files
    png, heat_path = folder / "overlay.png", folder / "heat_png.nrrd"
    code, stdout, stderr = run(["explain", "--image", folder / "t1.nrrd", "--model", model, "--class", "2",
                                "--roi", folder / "brain.seg.nrrd", "--roi-label", "2", "--method", "seg-grad-cam",
                                "--out", heat_path, "--png", png], capsys)
    assert code == 0, stderr
    assert f"wrote {png}" in stdout
    with Image.open(png) as picture:
        pixels = np.asarray(picture.convert("RGB")).astype(int)
        text = dict(picture.text)
    height, width = pixels.shape[:2]
    assert (width, height) == (round(FIGURE_SIZE[0] * DPI), round(FIGURE_SIZE[1] * DPI))
    # The title names model, layer, method, class and region; each panel its plane, position and letters.
    title = text["Title"]
    for words in (model.name, "layer bottleneck", "seg-grad-cam", "class 2", "region: brain.seg.nrrd, label 2"):
        assert words in title
    description = text["Description"]
    for name, letters in (("axial", "(R L A P)"), ("coronal", "(R L S I)"), ("sagittal", "(P A S I)")):
        assert f"{name} " in description and f"{letters}" in description
    # The same figure from the files read back gives each panel's place; the heat shows where the map is hot.
    image = read_image(folder / "t1.nrrd")
    heat = sitk.GetArrayFromImage(sitk.ReadImage(str(heat_path)))
    region = read_mask(folder / "brain.seg.nrrd", image, label=2) > 0
    figure = three_plane_figure(image, heat, title=title, region=region)
    figure.set_dpi(DPI)
    figure.canvas.draw()
    voxel = hottest_voxel(heat, region)
    assert region[voxel]  # the planes cross inside the region
    panels = [axis for axis in figure.axes if axis.get_title()]
    assert [axis.get_title().split()[0] for axis in panels] == list(PLANES)
    for axis, name in zip(panels, PLANES):
        cut = plane(image, heat, name, voxel, region)
        grey = np.ptp(pixels, axis=-1) == 0  # R == G == B: the image only
        hot = [_display_pixel(axis, cut, r, c, height) for r, c in np.argwhere(cut.heat >= 0.5)]
        cold = [_display_pixel(axis, cut, r, c, height) for r, c in np.argwhere(cut.heat < 0.1)]
        assert hot, name
        # Contour lines and letters cross a few voxel centres: most, not all, tell the rule.
        assert np.mean([not grey[r, c] for r, c in hot]) > 0.9, name
        if cold:
            assert np.mean([grey[r, c] for r, c in cold]) > 0.8, name
    from matplotlib import pyplot as plt

    plt.close(figure)


@pytest.mark.process
def test_png_without_matplotlib_is_refused_before_the_work(files, tmp_path):
    folder, model = files
    code = (
        "import sys\n"
        "sys.modules['matplotlib'] = None  # as if matplotlib were not installed: importing it fails\n"
        "from SegHiResCAMLib.cli import main\n"
        f"sys.exit(main(['explain', '--image', {str(folder / 't1.nrrd')!r}, '--model', {str(model)!r}, '--class', '2',"
        f" '--out', {str(tmp_path / 'heat.nrrd')!r}, '--png', {str(tmp_path / 'p.png')!r}]))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(LIBRARY_PARENT)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 1, done.stderr
    line = one_error_line(done.stderr)
    assert "--png" in line and "matplotlib" in line and "seghirescam[eval]" in line
    assert not list(tmp_path.iterdir())  # no heatmap either: refused before the work


def test_layers_lists_names_and_output_shapes(files, capsys):
    folder, model = files
    code, stdout, _ = run(["layers", "--model", model, "--size", "31"], capsys)  # rounded up to 32 (divisible by 2)
    assert code == 0
    rows = {line.split()[-3]: line.split()[-1] for line in stdout.splitlines() if not line.startswith("#")}
    assert rows["bottleneck"] == "1x8x16x16x16"  # half resolution, 8 channels in the tiny U-Net
    assert rows["head"] == "1x3x32x32x32"
    assert rows["decoder.0"] == "1x4x32x32x32"
    assert any(line.startswith("* bottleneck") for line in stdout.splitlines())  # the card's default


def one_error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("seghirescam: error: ")
    return lines[0]


def test_missing_image_is_one_line_and_exit_1(files, capsys):
    folder, model = files
    code, _, stderr = run(["explain", "--image", folder / "absent.nrrd", "--model", model, "--class", "2",
                           "--out", folder / "x.nrrd"], capsys)
    assert code == 1 and "absent.nrrd does not exist" in one_error_line(stderr)


def test_wrong_layer_is_one_line_listing_close_names(files, capsys):
    folder, model = files
    code, _, stderr = run(["explain", "--image", folder / "t1.nrrd", "--model", model, "--class", "2",
                           "--layer", "decoder.00", "--out", folder / "x.nrrd"], capsys)
    line = one_error_line(stderr)
    assert code == 1 and "'decoder.00' does not exist" in line and "decoder.0" in line


def test_4d_image_is_one_line_saying_what_to_do(files, capsys):
    folder, model = files
    series = sitk.JoinSeries([sitk.ReadImage(str(folder / "t1.nrrd"))] * 2)
    sitk.WriteImage(series, str(folder / "dynamic.nii.gz"))
    code, _, stderr = run(["explain", "--image", folder / "dynamic.nii.gz", "--model", model, "--class", "2",
                           "--out", folder / "x.nrrd"], capsys)
    line = one_error_line(stderr)
    assert code == 1 and "4D image" in line and "extract" in line


def test_unreadable_model_is_one_line(files, capsys):
    folder, _ = files
    broken = folder / "broken.pt"
    broken.write_bytes(b"\x00garbage, not a torch file")
    (folder / "broken.json").write_text((folder / "tiny3d.json").read_text())
    code, _, stderr = run(["explain", "--image", folder / "t1.nrrd", "--model", broken, "--class", "2",
                           "--out", folder / "x.nrrd"], capsys)
    assert code == 1 and "broken.pt" in one_error_line(stderr)
    code, _, stderr = run(["layers", "--model", folder / "nomodel.pt"], capsys)
    assert code == 1 and "does not exist" in one_error_line(stderr)


def test_unknown_method_and_class_are_one_line_with_the_choices(files, capsys):
    folder, model = files
    base = ["explain", "--image", folder / "t1.nrrd", "--model", model, "--out", folder / "x.nrrd"]
    code, _, stderr = run([*base, "--class", "2", "--method", "gradcam"], capsys)
    assert code == 1 and "seg-hires-grad-cam" in one_error_line(stderr)
    code, _, stderr = run([*base, "--class", "7"], capsys)
    assert code == 1 and "2 = white matter" in one_error_line(stderr)
    assert not (folder / "x.nrrd").exists()


def test_python_builder_model_needs_trust_code(files, capsys):
    folder, model = files
    builder = folder / "mynet.py"
    builder.write_text(
        "from SegHiResCAMLib.models.unet import UNet\n\n\n"
        "def build_model():\n"
        "    return UNet(spatial_dims=3, in_channels=1, out_channels=3, channels=(4, 8))\n"
    )
    (folder / "mynet.pth").write_bytes(model.read_bytes())
    (folder / "mynet.json").write_text('{"class_names": ["background", "grey matter", "white matter"], '
                                       '"layers": ["bottleneck"], "divisible_by": 2}')
    base = ["explain", "--image", folder / "t1.nrrd", "--model", builder, "--class", "2",
            "--out", folder / "heat_builder.nrrd"]
    code, _, stderr = run(base, capsys)
    assert code == 1 and "--trust-code" in one_error_line(stderr)
    code, _, stderr = run([*base, "--trust-code"], capsys)
    assert code == 0, stderr
    # the same weights through the state-dict loader give the same map
    code, _, _ = run(["explain", "--image", folder / "t1.nrrd", "--model", model, "--class", "2",
                      "--out", folder / "heat_statedict.nrrd"], capsys)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "heat_builder.nrrd"))),
                                  sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "heat_statedict.nrrd"))))


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["explain", "--image", "a.nrrd"])
    assert exit_info.value.code == 2
    assert "seghirescam: error: the following arguments are required" in capsys.readouterr().err


@pytest.mark.process
def test_real_process_exit_status_and_single_stderr_line(files):
    folder, model = files
    env = {**os.environ, "PYTHONPATH": str(LIBRARY_PARENT)}
    done = subprocess.run([sys.executable, "-m", "SegHiResCAMLib.cli", "explain", "--image", str(folder / "t1.nrrd"),
                           "--model", str(model), "--class", "2", "--layer", "bottlenek", "--out",
                           str(folder / "y.nrrd")], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 1 and done.stdout == ""
    assert "nearest names: bottleneck" in one_error_line(done.stderr)


def test_progress_bar_draws_on_a_terminal_and_stays_silent_otherwise():
    master, slave = os.openpty()
    try:
        with os.fdopen(slave, "w", closefd=True) as terminal:
            bar = ProgressBar(terminal)
            assert bar.active
            bar.update(0.5, "explaining slices 1-8 of 16")
            bar.update(1.0, "done")
            bar.close()
        chunks = []
        while True:  # the terminal may hand the bytes over in pieces; EIO once the writer is gone
            try:
                chunk = os.read(master, 65536)
            except OSError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        drawn = b"".join(chunks).decode()
    finally:
        os.close(master)
    assert "[###############...............]  50% explaining slices 1-8 of 16" in drawn
    assert "100% done" in drawn and drawn.count("\r") >= 2
    quiet = io.StringIO()
    bar = ProgressBar(quiet)
    bar.update(0.5, "x")
    bar.close()
    assert quiet.getvalue() == ""
