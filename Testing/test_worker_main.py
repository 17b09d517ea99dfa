"""The worker process: request file in, JSON-line events out, heatmap file with the image's geometry."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from tiny_models import save_tiny_unet, write_labels_like, write_oblique_image
from tolerances import EPS32, geometry_atol

from SegHiResCAMLib.io.images import read_image, read_mask
from SegHiResCAMLib.models.loading import load_model
from SegHiResCAMLib.pipeline import explain_volume
from SegHiResCAMLib.settings import ExplainSettings
from SegHiResCAMLib.worker.main import main
from SegHiResCAMLib.worker.protocol import ExplainRequest, parse_event

LIBRARY_PARENT = Path(__file__).resolve().parents[1] / "SegHiResCAM"


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """A tiny 3D model, an oblique NRRD image and a label file with a white-matter label."""
    folder = tmp_path_factory.mktemp("worker")
    model = save_tiny_unet(folder)
    reference = write_oblique_image(folder / "t1.nrrd")
    labels = np.zeros((16, 16, 16), np.uint8)
    labels[5:11, 4:12, 6:10] = 2
    labels[0:2, 0:2, 0:2] = 1
    write_labels_like(folder / "seg.nrrd", reference, labels)
    return folder, model, reference


def request_for(folder: Path, model: Path, *, image=None, output=None, roi=None, roi_label=2,
                **choices) -> ExplainRequest:
    settings = ExplainSettings(**{"layers": "bottleneck", "target_class": 2, **choices})
    return ExplainRequest(images=(str(image or folder / "t1.nrrd"),), model=str(model),
                          outputs=(str(output or folder / "heat.nrrd"),), settings=settings,
                          roi=str(roi or folder / "seg.nrrd"), roi_label=roi_label)


def run_in_process(path: Path) -> tuple[int, list[dict]]:
    stream = io.StringIO()
    code = main([str(path)], stdout=stream)
    lines = stream.getvalue().splitlines()
    events = [parse_event(line) for line in lines]
    assert None not in events, f"non-event line on stdout: {lines}"
    return code, events


def write_request(folder: Path, request: ExplainRequest, name: str = "request.json") -> Path:
    path = folder / name
    path.write_text(request.to_json(), encoding="utf-8")
    return path


@pytest.mark.process
def test_worker_process_streams_progress_then_result_and_writes_the_heatmap(case):
    folder, model, reference = case
    output = folder / "heat_subprocess.nrrd"
    path = write_request(folder, request_for(folder, model, output=str(output), device="cpu"), "sub.json")
    env_path = {"PYTHONPATH": str(LIBRARY_PARENT)}
    done = subprocess.run([sys.executable, "-m", "SegHiResCAMLib.worker", str(path)], capture_output=True,
                          text=True, timeout=120, env={**_clean_env(), **env_path})
    assert done.returncode == 0, done.stderr
    events = [json.loads(line) for line in done.stdout.splitlines()]  # every line is JSON
    kinds = [event["event"] for event in events]
    assert kinds[-1] == "result" and kinds.count("result") == 1 and "error" not in kinds
    fractions = [event["fraction"] for event in events if event["event"] == "progress"]
    assert fractions[0] == 0.0 and fractions[-1] == 1.0 and fractions == sorted(fractions)
    result = events[-1]
    assert result["output"] == str(output) and result["device"] == "cpu" and result["seconds"] > 0
    assert result["roi_voxels"] == 6 * 8 * 4
    written = sitk.ReadImage(str(output))
    for get in (sitk.Image.GetOrigin, sitk.Image.GetSpacing, sitk.Image.GetDirection):  # NRRD: float64 text
        np.testing.assert_allclose(get(written), get(reference), rtol=0, atol=geometry_atol(get(reference)))
    # oracle: the same explanation computed in this process through the library
    image = read_image(folder / "t1.nrrd")
    maps, _ = explain_volume(load_model(model), image, target_class=2, layers="bottleneck",
                             roi=read_mask(folder / "seg.nrrd", image, label=2), device="cpu")
    # The worker is another process, maybe with another thread count, so its float32 sums may run in
    # another order: each of at most 12 layers (forward and backward) of this U-Net (channels 4, 8) sums at
    # most 8 x 27 x 2 = 432 terms, so a value moves by at most 12 x 432 x eps32 of the magnitudes summed,
    # here allowed to be as large as the normalised map's peak, 1 (the test would see any real difference).
    np.testing.assert_allclose(sitk.GetArrayFromImage(written), maps["seg-hires-grad-cam"].array, rtol=0,
                               atol=12 * 432 * EPS32)


def _clean_env() -> dict[str, str]:
    import os

    return {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}


@pytest.mark.process
def test_worker_imports_neither_slicer_nor_qt_nor_vtk(case):
    folder, model, _ = case
    path = write_request(folder, request_for(folder, model, output=str(folder / "heat_imports.nrrd")), "imp.json")
    code = (
        "import sys, io\n"
        "from SegHiResCAMLib.worker.main import main\n"
        f"assert main([{str(path)!r}], stdout=io.StringIO()) == 0\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('slicer', 'qt', 'ctk', 'vtk', 'vtkmodules'))\n"
        "print(bad)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_missing_image_gives_one_error_event_and_exit_1(case):
    folder, model, _ = case
    path = write_request(folder, request_for(folder, model, image=str(folder / "nothere.nrrd")), "missing.json")
    code, events = run_in_process(path)
    assert code == 1
    errors = [event for event in events if event["event"] == "error"]
    assert len(errors) == 1 and events[-1] is errors[0]
    assert "nothere.nrrd does not exist" in errors[0]["message"] and "\n" not in errors[0]["message"]
    assert not any(event["event"] == "result" for event in events)


def test_unknown_layer_error_names_the_nearest_layers(case):
    folder, model, _ = case
    code, events = run_in_process(write_request(folder, request_for(folder, model, layers="decoder.9"), "layer.json"))
    assert code == 1
    assert events[-1]["event"] == "error" and "nearest names" in events[-1]["message"]
    assert "decoder.0" in events[-1]["message"]


def test_unreadable_model_is_an_error_event(case):
    folder, _, _ = case
    broken = folder / "broken.pt"
    broken.write_bytes(b"not a torch file")
    (folder / "broken.json").write_text((folder / "tiny3d.json").read_text())
    code, events = run_in_process(write_request(folder, request_for(folder, broken), "broken.json.req"))
    assert code == 1 and events[-1]["event"] == "error" and "broken.pt" in events[-1]["message"]


def test_roi_outside_the_image_is_refused_before_the_model_loads(case):
    folder, model, _ = case
    elsewhere = sitk.Image(4, 4, 4, sitk.sitkUInt8)
    elsewhere.SetOrigin((500.0, 500.0, 500.0))  # far outside the image: resampled, it covers nothing
    elsewhere[1, 1, 1] = 1
    sitk.WriteImage(elsewhere, str(folder / "far.nrrd"))
    request = request_for(folder, model, roi=str(folder / "far.nrrd"), roi_label=1,
                          output=str(folder / "heat_far.nrrd"))
    code, events = run_in_process(write_request(folder, request, "far.json"))
    # Before: exit 0 with an all-zero heatmap and two warnings.
    assert code == 1 and events[-1]["event"] == "error"
    assert "covers no voxel of the image" in events[-1]["message"]
    assert not any(event["event"] == "warning" for event in events)  # refused, not resampled-and-warned
    assert not any("loading the model" in event.get("message", "") for event in events)
    assert not (folder / "heat_far.nrrd").exists()


def test_roi_on_another_grid_gives_one_warning_event_and_a_result(case):
    folder, model, reference = case
    coarse = sitk.Image(8, 8, 8, sitk.sitkUInt8)  # half the image's resolution, same corner and axes
    coarse.SetSpacing(tuple(2 * s for s in reference.GetSpacing()))
    coarse.SetDirection(reference.GetDirection())
    coarse.SetOrigin(reference.GetOrigin())
    coarse[3:6, 2:6, 3:5] = 1
    sitk.WriteImage(coarse, str(folder / "coarse.nrrd"))
    request = request_for(folder, model, roi=str(folder / "coarse.nrrd"), roi_label=1,
                          output=str(folder / "heat_coarse.nrrd"))
    code, events = run_in_process(write_request(folder, request, "coarse.json"))
    assert code == 0, events
    warnings = [event["message"] for event in events if event["event"] == "warning"]
    assert len(warnings) == 1 and "resampled onto the image's grid (nearest neighbour)" in warnings[0]
    assert events[-1]["event"] == "result" and events[-1]["roi_voxels"] > 0


def test_malformed_request_exits_2_with_an_error_event(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{"image": "a.nrrd", "modle": "typo.pt"}')
    code, events = run_in_process(path)
    assert code == 2 and [event["event"] for event in events] == ["error"]
    assert "malformed" in events[0]["message"]
    path.write_text("{not json")
    assert run_in_process(path)[0] == 2
    assert run_in_process(tmp_path / "absent.json")[0] == 2


def test_output_folder_that_does_not_exist_fails_before_the_model_runs(case):
    folder, model, _ = case
    request = request_for(folder, model, output=str(folder / "no" / "such" / "heat.nrrd"))
    code, events = run_in_process(write_request(folder, request, "outdir.json"))
    assert code == 1 and "does not exist" in events[-1]["message"]
    assert max(event.get("fraction", 0.0) for event in events) == 0.0
