"""The application service behind every door: several images, several methods, layer lists, errors."""

from __future__ import annotations

import io
import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from tiny_models import brain_like_image, save_tiny_unet, write_oblique_image

from SegHiResCAMLib.cli import main
from SegHiResCAMLib.errors import InputError, InternalError
from SegHiResCAMLib.io.channels import read_channels
from SegHiResCAMLib.io.images import read_image
from SegHiResCAMLib.models.loading import load_model
from SegHiResCAMLib.pipeline import explain_volume
from SegHiResCAMLib.service import method_outputs, run_request
from SegHiResCAMLib.settings import ExplainSettings
from SegHiResCAMLib.volume import Volume
from SegHiResCAMLib.worker.main import main as worker_main
from SegHiResCAMLib.worker.protocol import ExplainRequest, LayersRequest, parse_event


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("service")
    save_tiny_unet(folder)
    save_tiny_unet(folder, "tiny2d", spatial_dims=2)
    save_tiny_unet(folder, "two_channels", in_channels=2, seed=3)
    write_oblique_image(folder / "t1.nrrd")
    reference = sitk.ReadImage(str(folder / "t1.nrrd"))
    second = sitk.GetImageFromArray(brain_like_image((16, 16, 16), seed=7)[::-1].copy())  # another contrast
    second.CopyInformation(reference)
    sitk.WriteImage(second, str(folder / "t2.nrrd"))
    return folder


def run(argv, capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def heat(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def test_several_methods_in_one_run_write_one_file_each_equal_to_its_own_run(folder, capsys):
    methods = ("seg-hires-grad-cam", "seg-grad-cam", "seg-layer-cam")
    argv = ["explain", "--image", folder / "t1.nrrd", "--model", folder / "tiny3d.pt", "--class", "2",
            "--out", folder / "multi.nii.gz", "--device", "cpu"]
    code, stdout, stderr = run(argv + [arg for m in methods for arg in ("--method", m)], capsys)
    assert code == 0, stderr
    image, loaded = read_image(folder / "t1.nrrd"), load_model(folder / "tiny3d.pt")
    for method in methods:
        written = folder / f"multi_{method}.nii.gz"
        assert f"wrote {written} ({method}," in stdout
        alone, _ = explain_volume(loaded, image, target_class=2, methods=(method,), device="cpu")
        np.testing.assert_array_equal(heat(written), alone[method].array)
    assert not (folder / "multi.nii.gz").exists()


def test_output_names_per_method_keep_the_whole_extension():
    assert method_outputs("a/heat.nrrd", ["seg-grad-cam"]) == (Path("a/heat.nrrd"),)
    assert method_outputs("a/heat.nii.gz", ["seg-grad-cam", "seg-grad-cam++"]) == (
        Path("a/heat_seg-grad-cam.nii.gz"), Path("a/heat_seg-grad-cam++.nii.gz"))
    assert method_outputs("pic.png", ["x", "y"])[1] == Path("pic_y.png")


def test_one_image_per_channel_is_stacked_in_the_order_given(folder, capsys):
    loaded = load_model(folder / "two_channels.pt")
    t1, t2 = read_image(folder / "t1.nrrd"), read_image(folder / "t2.nrrd")
    outputs = {}
    for order, (first, second) in {"12": ("t1", "t2"), "21": ("t2", "t1")}.items():
        outputs[order] = folder / f"two_{order}.nrrd"
        code, _, stderr = run(["explain", "--image", folder / f"{first}.nrrd", "--image", folder / f"{second}.nrrd",
                               "--model", folder / "two_channels.pt", "--class", "1", "--out", outputs[order],
                               "--device", "cpu"], capsys)
        assert code == 0 and stderr == "", stderr
    stacked = Volume(np.stack([t1.array, t2.array]).astype(np.float32), t1.ijk_to_ras)
    expected, _ = explain_volume(loaded, stacked, target_class=1, device="cpu")
    np.testing.assert_array_equal(heat(outputs["12"]), expected["seg-hires-grad-cam"].array)
    assert not np.array_equal(heat(outputs["12"]), heat(outputs["21"]))  # channel order matters


def test_a_later_image_on_another_grid_is_resampled_onto_the_first_with_a_warning(tmp_path):
    rng = np.random.default_rng(0)
    spacing, origin = (1.5, 2.0, 2.5), (10.0, -4.0, 7.0)
    first = sitk.GetImageFromArray(rng.random((5, 6, 7)).astype(np.float32))
    first.SetSpacing(spacing)
    first.SetOrigin(origin)
    values = rng.random((5, 6, 7)).astype(np.float32)
    second = sitk.GetImageFromArray(values)
    second.SetSpacing(spacing)
    second.SetOrigin((origin[0] + 2 * spacing[0], origin[1], origin[2]))  # two voxels further along I
    sitk.WriteImage(first, str(tmp_path / "a.nrrd"))
    sitk.WriteImage(second, str(tmp_path / "b.nrrd"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        volume = read_channels([tmp_path / "a.nrrd", tmp_path / "b.nrrd"])
    assert any("b.nrrd lies on another voxel grid than a.nrrd" in str(w.message) for w in caught)
    assert volume.array.shape == (2, 5, 6, 7) and volume.array.dtype == np.float32
    np.testing.assert_array_equal(volume.array[0], sitk.GetArrayFromImage(first))
    # Voxel centres coincide, so linear interpolation returns the voxels themselves: b's voxel i sits at
    # a's voxel i + 2, and a's first two columns lie outside b (0).
    rounding = 4 * np.finfo(np.float32).eps
    np.testing.assert_allclose(volume.array[1][..., 2:], values[..., :-2], rtol=rounding, atol=rounding)
    np.testing.assert_array_equal(volume.array[1][..., :2], 0.0)


def test_the_wrong_number_of_images_is_refused_naming_the_channels(folder):
    request = ExplainRequest(images=(str(folder / "t1.nrrd"),), model=str(folder / "two_channels.pt"),
                             outputs=(str(folder / "never.nrrd"),), settings=ExplainSettings(target_class=1))
    with pytest.raises(InputError, match="takes 2 image channels but 1 image was given; give one image per channel"):
        run_request(request)
    assert not (folder / "never.nrrd").exists()


@pytest.mark.parametrize("threshold", ["1.5", "nan", "0"])
def test_a_target_threshold_outside_zero_to_one_is_refused_before_the_model_is_read(folder, capsys, threshold):
    code, _, stderr = run(["explain", "--image", folder / "t1.nrrd", "--model", folder / "absent.pt", "--class", "1",
                           "--target", "probability-threshold", "--threshold", threshold,
                           "--out", folder / "thr.nrrd"], capsys)
    lines = stderr.strip().splitlines()
    assert code == 1 and len(lines) == 1 and "target_threshold must be a number strictly between 0 and 1" in lines[0]
    assert not (folder / "thr.nrrd").exists()


def test_the_slice_axis_flag_reaches_the_model_card(folder, capsys):
    out = folder / "axis2.nrrd"
    code, _, stderr = run(["explain", "--image", folder / "t1.nrrd", "--model", folder / "tiny2d.pt", "--class", "1",
                           "--slice-axis", "2", "--region", "whole-image", "--out", out, "--device", "cpu"], capsys)
    assert code == 0, stderr
    image, loaded = read_image(folder / "t1.nrrd"), load_model(folder / "tiny2d.pt")
    expected, _ = explain_volume(loaded, image, target_class=1, slice_axis=2, region="whole-image", device="cpu")
    default, _ = explain_volume(loaded, image, target_class=1, region="whole-image", device="cpu")
    assert heat(out).max() == 1.0  # exact: the maximum divided by itself
    np.testing.assert_array_equal(heat(out), expected["seg-hires-grad-cam"].array)
    assert not np.array_equal(heat(out), default["seg-hires-grad-cam"].array)


def test_the_whole_image_region_counts_every_voxel_and_contradictions_are_refused(folder, capsys):
    base = ["explain", "--image", folder / "t1.nrrd", "--model", folder / "tiny3d.pt", "--class", "2",
            "--device", "cpu"]
    code, stdout, stderr = run([*base, "--region", "whole-image", "--out", folder / "whole.nrrd"], capsys)
    assert code == 0 and "region 4096 voxels" in stdout, stderr
    code, _, stderr = run([*base, "--region", "mask", "--out", folder / "mask.nrrd"], capsys)
    assert code == 1 and "'mask' needs a region" in stderr and not (folder / "mask.nrrd").exists()


def _worker(path: Path) -> tuple[int, list[dict]]:
    stream = io.StringIO()
    code = worker_main([str(path)], stdout=stream)
    return code, [parse_event(line) for line in stream.getvalue().splitlines()]


def test_the_worker_lists_a_models_layers_as_list_layers_does(folder):
    from SegHiResCAMLib import list_layers

    path = folder / "layers.json"
    path.write_text(LayersRequest(model=str(folder / "tiny3d.pt"), size=31).to_json())
    code, events = _worker(path)
    assert code == 0 and [e["event"] for e in events] == ["result"]
    loaded = load_model(folder / "tiny3d.pt")
    expected = list_layers(loaded.module, loaded.card.example_shape(31))
    result = events[0]
    assert result["example_shape"] == [1, 1, 32, 32, 32] and result["default_layers"][0] == "bottleneck"
    assert [(row["name"], row["type"], row["output_shape"]) for row in result["layers"]] == [
        (info.name, info.type, list(info.output_shape) if info.output_shape else None) for info in expected]


def write_broken_builder(folder: Path) -> Path:
    """A trusted Python model whose forward fails with an error that is no SegHiResCAMError."""
    builder = folder / "broken_net.py"
    builder.write_text(
        "from SegHiResCAMLib.models.unet import UNet\n\n\n"
        "class Broken(UNet):\n"
        "    def forward(self, x):\n"
        "        return super().forward(x) / 0 if x.shape[0] > 99 else [][0]\n\n\n"
        "def build_model():\n"
        "    return Broken(spatial_dims=3, in_channels=1, out_channels=3, channels=(4, 8))\n"
    )
    (folder / "broken_net.pth").write_bytes((folder / "tiny3d.pt").read_bytes())
    (folder / "broken_net.json").write_text(json.dumps({"class_names": ["bg", "a", "b"], "layers": ["bottleneck"],
                                                        "divisible_by": 2}))
    return builder


def test_an_internal_error_is_one_line_naming_the_step_and_how_to_report_it(folder, capsys):
    builder = write_broken_builder(folder)
    code, _, stderr = run(["explain", "--image", folder / "t1.nrrd", "--model", builder, "--trust-code",
                           "--class", "1", "--out", folder / "broken.nrrd"], capsys)
    lines = stderr.strip().splitlines()
    assert code == 1 and len(lines) == 1, stderr
    assert lines[0].startswith("seghirescam: error: internal error while explaining (IndexError: list index out")
    assert "--debug" in lines[0] and "unexpected" not in lines[0]
    request = ExplainRequest(images=(str(folder / "t1.nrrd"),), model=str(builder), trust_code=True,
                             outputs=(str(folder / "broken.nrrd"),), settings=ExplainSettings(target_class=1))
    with pytest.raises(InternalError) as raised:
        run_request(request)
    assert raised.value.stage == "explaining" and isinstance(raised.value.__cause__, IndexError)
    path = folder / "broken_request.json"
    path.write_text(request.to_json())
    code, events = _worker(path)
    assert code == 1 and events[-1]["type"] == "InternalError"
    assert events[-1]["message"].startswith("internal error while explaining (IndexError")
    assert "report" in events[-1]["message"] and "unexpected" not in events[-1]["message"]


def test_a_request_survives_its_json_and_a_refused_value_is_exit_1_not_2(folder):
    request = ExplainRequest(images=(str(folder / "t1.nrrd"), str(folder / "t2.nrrd")), model="m.pt",
                             outputs=("a.nrrd", "b.nrrd"), roi="r.nrrd", roi_label="white matter",
                             settings=ExplainSettings(target_class="white matter",
                                                      methods=("seg-grad-cam", "seg-hires-grad-cam")))
    from SegHiResCAMLib.worker.protocol import request_from_json

    assert request_from_json(request.to_json()) == request
    data = request.to_dict()
    data["settings"]["target_threshold"] = math.inf
    path = folder / "bad_value.json"
    path.write_text(json.dumps(data))
    code, events = _worker(path)
    assert code == 1 and "target_threshold" in events[-1]["message"] and events[-1]["type"] == "InputError"
    data["settings"]["threshold"] = 0.5
    path.write_text(json.dumps(data))
    code, events = _worker(path)
    assert code == 2 and "malformed" in events[-1]["message"] and "settings.threshold" in events[-1]["message"]
