"""Only SegHiResCAM's own warnings reach the user; other libraries' go to the debug log."""

from __future__ import annotations

import io
import shutil
import warnings

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from tiny_models import save_tiny_unet, write_oblique_image

from SegHiResCAMLib.cli import main
from SegHiResCAMLib.models.loading import load_model


@pytest.fixture(scope="module")
def scripted(tmp_path_factory):
    """A TorchScript model (torch 2.13's torch.jit.load warns that it is deprecated), an image, and a
    region on a coarser grid, which SegHiResCAM warns about (resampled onto the image's grid)."""
    folder = tmp_path_factory.mktemp("scripted")
    weights = save_tiny_unet(folder, intensity={"scheme": "zscore"})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scripting warns too; not what is tested
        torch.jit.save(torch.jit.script(load_model(weights).module), str(folder / "tiny.ts"))
    shutil.copy(folder / "tiny3d.json", folder / "tiny.json")
    reference = write_oblique_image(folder / "t1.nrrd")
    coarse = sitk.Image(8, 8, 8, sitk.sitkUInt8)
    coarse.SetSpacing(tuple(2 * s for s in reference.GetSpacing()))
    coarse.SetDirection(reference.GetDirection())
    coarse.SetOrigin(reference.GetOrigin())
    coarse[3:6, 3:6, 2:5] = 1
    sitk.WriteImage(coarse, str(folder / "coarse_roi.nrrd"))
    return folder


def explain(folder, capsys, *extra, image="t1.nrrd"):
    code = main([*extra, "explain", "--image", str(folder / image), "--model", str(folder / "tiny.ts"), "--class", "2",
                 "--roi", str(folder / "coarse_roi.nrrd"), "--out", str(folder / "heat.nrrd"), "--device", "cpu"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_torch_deprecation_is_not_relayed_but_our_warning_is(scripted, capsys):
    # Before: "seghirescam: warning: `torch.jit.load` is deprecated. Please switch to `torch.export`."
    code, _, stderr = explain(scripted, capsys)
    assert code == 0, stderr
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("seghirescam: warning: label 1 of coarse_roi.nrrd lies on another")
    assert "resampled onto the image's grid (nearest neighbour)" in lines[0]
    assert "deprecat" not in stderr and "torch" not in stderr


def test_debug_shows_other_libraries_warnings_apart_from_ours(scripted, capsys):
    code, _, stderr = explain(scripted, capsys, "--debug")
    assert code == 0, stderr
    ours = [line for line in stderr.splitlines() if line.startswith("seghirescam: warning:")]
    assert len(ours) == 1 and "resampled" in ours[0]
    debug = [line for line in stderr.splitlines() if line.startswith("seghirescam: SegHiResCAMLib")]
    assert any("torch.jit.load" in line and "deprecated" in line for line in debug), stderr


def test_worker_events_carry_only_our_warnings(scripted):
    from SegHiResCAMLib.settings import ExplainSettings
    from SegHiResCAMLib.worker.main import main as worker_main
    from SegHiResCAMLib.worker.protocol import ExplainRequest, parse_event

    request = ExplainRequest(images=(str(scripted / "t1.nrrd"),), model=str(scripted / "tiny.ts"),
                             outputs=(str(scripted / "heat_worker.nrrd"),),
                             settings=ExplainSettings(target_class=2, device="cpu"),
                             roi=str(scripted / "coarse_roi.nrrd"), roi_label=1)
    path = scripted / "request.json"
    path.write_text(request.to_json(), encoding="utf-8")
    stream = io.StringIO()
    assert worker_main([str(path)], stdout=stream) == 0
    events = [parse_event(line) for line in stream.getvalue().splitlines()]
    messages = [event["message"] for event in events if event["event"] == "warning"]
    assert len(messages) == 1 and "resampled" in messages[0]


def test_infinite_voxels_are_refused_without_a_numpy_warning(scripted, capsys):
    # Before: "seghirescam: warning: invalid value encountered in subtract" (z-scoring inf), then the error.
    image = sitk.ReadImage(str(scripted / "t1.nrrd"))
    array = sitk.GetArrayFromImage(image)
    array[3, 3, 3] = np.inf
    broken = sitk.GetImageFromArray(array)
    broken.CopyInformation(image)
    sitk.WriteImage(broken, str(scripted / "inf.nrrd"))
    # --debug prints every warning of every library: the root cause is gone, not merely hidden
    code, _, stderr = explain(scripted, capsys, "--debug", image="inf.nrrd")
    assert code == 1
    lines = stderr.splitlines()
    assert lines[-1] == ("seghirescam: error: the image contains NaN or infinite values; "
                         "fix or mask them before explaining")
    assert not any("invalid value" in line for line in lines), stderr
