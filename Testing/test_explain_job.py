"""ExplainJob: MRML nodes -> real worker process -> heatmap node (slicer-core scene, CPU).

This is what ``SegHiResCAMLogic.process`` runs in Slicer: success shows a heatmap with the
input's geometry and its mass on the evidence; cancel and failure leave the scene exactly
as it was and remove the temp folder.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from mrml_helpers import add_segment, add_segmentation, add_volume
from SegHiResCAMLib.errors import CancelledError, InputError, LayerError, SegHiResCAMError
from SegHiResCAMLib.jobs.explain_job import ExplainJob, JobInputs
from SegHiResCAMLib.jobs.worker_job import error_from_event
from SegHiResCAMLib.mrml.heatmap_display import HEATMAP_ATTRIBUTE
from SegHiResCAMLib.mrml.scene import new_scene, node_ids
from SegHiResCAMLib.mrml.volumes import array_from_node, ijk_to_ras_of_node
from SegHiResCAMLib.settings import DisplaySettings, ExplainSettings
from tolerances import EPS32, geometry_atol

MODEL = Path(__file__).resolve().parents[1] / "SegHiResCAM" / "Resources" / "Models" / "SelfTestBallUNet.pt"
IJK_TO_RAS = np.array([[-1.2, 0, 0, 20.0], [0, -1.2, 0, -5.0], [0, 0, 2.0, 7.0], [0, 0, 0, 1]])
CENTRE, RADIUS = np.array([12.0, 18.0, 15.0]), 5.0


def ball_scene(size: int = 32):
    """A scene with a noisy volume holding a bright ball, and a segment covering the ball."""
    scene = new_scene()
    rng = np.random.default_rng(1)
    grid = np.indices((size,) * 3)
    ball = ((grid - CENTRE[:, None, None, None]) ** 2).sum(0) <= RADIUS**2
    image = (rng.normal(100.0, 10.0, (size,) * 3) + 30.0 * ball).astype(np.float32)
    volume = add_volume(scene, image, IJK_TO_RAS, name="Ball image")
    segmentation = add_segmentation(scene)
    segment_id = add_segment(segmentation, ball, IJK_TO_RAS, "ball", "Ball")
    near = ((grid - CENTRE[:, None, None, None]) ** 2).sum(0) <= (RADIUS + 4) ** 2
    return scene, volume, segmentation, segment_id, near


def cpu(**choices) -> ExplainSettings:
    return ExplainSettings(**{"target_class": 1, "device": "cpu", **choices})


def job(scene, volume, model, segmentation, segment_id, settings, display=DisplaySettings(), **options) -> ExplainJob:
    return ExplainJob(scene, JobInputs(volume, model, segmentation, segment_id), settings, display, **options)


@pytest.mark.process
def test_heatmap_node_has_the_input_geometry_and_its_mass_on_the_evidence():
    scene, volume, segmentation, segment_id, near = ball_scene()
    reported = []
    running = job(scene, volume, MODEL, segmentation, segment_id, cpu(), DisplaySettings(show_3d=False),
                  progress=lambda fraction, message: reported.append((fraction, message)))
    node = running.wait(timeout=120)
    assert running.state == "done" and running.device == "cpu" and running.seconds > 0
    assert node.GetScene() is scene and node.GetAttribute(HEATMAP_ATTRIBUTE) == "1"
    np.testing.assert_allclose(ijk_to_ras_of_node(node), IJK_TO_RAS, rtol=0, atol=geometry_atol(IJK_TO_RAS))
    heat = array_from_node(node)
    assert heat.shape == (32, 32, 32) and np.isfinite(heat).all()
    assert heat.max() == 1.0 and heat.min() >= 0.0  # exact: the maximum divided by itself
    assert heat[near].sum() / heat.sum() > 0.8
    fractions = [fraction for fraction, _ in reported]
    assert len(fractions) >= 2 and fractions == sorted(fractions)
    assert running.temp_dir is None  # removed once the result was read


@pytest.mark.process
def test_an_existing_output_node_is_filled_in_place_and_no_node_is_added():
    scene, volume, segmentation, segment_id, _ = ball_scene()
    first = job(scene, volume, MODEL, segmentation, segment_id, cpu()).wait(timeout=120)
    ids_after_first = node_ids(scene)
    again = job(scene, volume, MODEL, segmentation, segment_id, cpu(methods=("seg-grad-cam",)), output_node=first)
    assert again.wait(timeout=120) is first
    assert node_ids(scene) == ids_after_first


@pytest.mark.process
def test_gui_style_polling_reaches_the_same_result_as_wait():
    scene, volume, segmentation, segment_id, near = ball_scene()
    running = job(scene, volume, MODEL, segmentation, segment_id, cpu())
    running.start()
    assert running.state == "running" and running.temp_dir.is_dir()
    deadline = time.monotonic() + 120
    while not running.poll():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    heat = array_from_node(running.result())
    assert heat[near].sum() / heat.sum() > 0.8


@pytest.mark.process
def test_cancel_mid_run_leaves_the_scene_unchanged_and_no_temp_files():
    scene, volume, segmentation, segment_id, _ = ball_scene(size=64)
    before = node_ids(scene)
    seen = []
    running = job(scene, volume, MODEL, segmentation, segment_id, cpu(),
                  progress=lambda fraction, message: seen.append(message))
    running.start()
    pid, temp_dir = running.worker_pid, running.temp_dir
    deadline = time.monotonic() + 60
    while not seen and time.monotonic() < deadline:
        running.poll()
        time.sleep(0.02)
    assert seen and running.state == "running" and psutil.pid_exists(pid), "the worker must be mid-run"
    running.cancel()
    assert running.state == "cancelled"
    assert node_ids(scene) == before, "a cancelled run must add no node"
    assert not temp_dir.exists()
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    with pytest.raises(CancelledError):
        running.result()
    assert running.poll() is True  # polling a cancelled job is harmless


@pytest.mark.process
def test_a_worker_error_becomes_one_line_error_and_leaves_the_scene_unchanged():
    scene, volume, segmentation, segment_id, _ = ball_scene()
    before = node_ids(scene)
    failing = job(scene, volume, MODEL, segmentation, segment_id, cpu(layers=("decoder.99",)))
    with pytest.raises(SegHiResCAMError) as raised:
        failing.wait(timeout=120)
    message = str(raised.value)
    assert "decoder.99" in message and "\n" not in message
    assert failing.state == "failed" and failing.temp_dir is None
    assert node_ids(scene) == before


def test_a_missing_segment_is_refused_before_any_process_starts():
    scene, volume, segmentation, _, _ = ball_scene()
    before = node_ids(scene)
    refused = job(scene, volume, MODEL, segmentation, "NoSuchSegment", cpu())
    with pytest.raises(InputError, match="NoSuchSegment"):
        refused.start()
    assert refused.state == "new" and refused.worker_pid is None and node_ids(scene) == before


def test_a_missing_model_file_is_refused_before_any_process_starts(tmp_path):
    scene, volume, segmentation, segment_id, _ = ball_scene()
    with pytest.raises(InputError, match="does not exist"):
        job(scene, volume, tmp_path / "absent.pt", segmentation, segment_id, cpu()).start()


def test_options_out_of_range_are_refused_with_the_value():
    with pytest.raises(InputError, match="gpu"):
        ExplainSettings(target_class=1, device="gpu")
    with pytest.raises(InputError, match="1.5"):
        DisplaySettings(opacity=1.5)
    with pytest.raises(InputError, match="3"):
        ExplainSettings(target_class=1, slice_axis=3)


def test_panel_choices_travel_to_the_worker_in_the_request():
    from SegHiResCAMLib.io.images import read_image, read_mask
    from SegHiResCAMLib.worker.launcher import WorkerProcess

    scene, volume, segmentation, _, _ = ball_scene()
    settings = cpu(layers="decoder.0", target_class=1, methods=("seg-grad-cam",), target="probability-threshold",
                   target_threshold=0.3, slice_axis=2)
    inputs = JobInputs(volume, MODEL, segmentation, "Ball", trust_code=True)  # a segment name is accepted
    panel_job = ExplainJob(scene, inputs, settings)
    panel_job._check_inputs()
    with WorkerProcess() as worker:
        request = panel_job._request(worker)
        settings = request.settings
        assert (settings.layers, settings.target_class, settings.methods) == (("decoder.0",), 1, ("seg-grad-cam",))
        assert (settings.target, settings.target_threshold, settings.device) == ("probability-threshold", 0.3, "cpu")
        assert settings.slice_axis == 2 and request.trust_code and request.model == str(MODEL)
        (image_path,) = request.images
        image = read_image(image_path)
        np.testing.assert_allclose(image.ijk_to_ras, IJK_TO_RAS, rtol=0, atol=geometry_atol(IJK_TO_RAS))  # NRRD
        mask = read_mask(request.roi, image, label=request.roi_label)
        grid = np.indices(mask.shape)
        np.testing.assert_array_equal(mask, ((grid - CENTRE[:, None, None, None]) ** 2).sum(0) <= RADIUS**2)


def test_worker_error_events_map_to_our_error_classes():
    assert type(error_from_event({"event": "error", "message": "bad layer", "type": "LayerError"})) is LayerError
    plain = error_from_event({"event": "error", "message": "first line\nsecond", "type": "KeyboardInterrupt"})
    assert type(plain) is SegHiResCAMError and str(plain) == "first line"


@pytest.mark.process
def test_several_methods_give_one_named_heatmap_node_each_equal_to_the_library():
    from SegHiResCAMLib.models.loading import load_model
    from SegHiResCAMLib.mrml.segments import segment_mask
    from SegHiResCAMLib.mrml.volumes import volume_from_node
    from SegHiResCAMLib.pipeline import explain_volume

    scene, volume, segmentation, segment_id, _ = ball_scene()
    methods = ("seg-hires-grad-cam", "seg-grad-cam")
    running = job(scene, volume, MODEL, segmentation, segment_id, cpu(methods=methods))
    first = running.wait(timeout=120)
    assert list(running.output_nodes) == list(methods) and first is running.output_nodes[methods[0]]
    assert [node.GetName() for node in running.output_nodes.values()] == [
        "Ball image Seg-HiRes-Grad CAM decoder.0 heatmap", "Ball image Seg-Grad CAM decoder.0 heatmap"]
    roi = segment_mask(segmentation, segment_id, volume)
    expected, _ = explain_volume(load_model(MODEL), volume_from_node(volume), cpu(methods=methods), roi=roi)
    # The worker is another process, maybe with another thread count, so its float32 sums may run in another
    # order: each of at most 26 layers (forward and backward) of this U-Net (channels 4, 8, 16) sums at most
    # 16 x 27 = 432 terms, so a value moves by at most 26 x 432 x eps32 of the magnitudes summed, here
    # allowed to be as large as the normalised heatmap's peak, 1.
    for method, node in running.output_nodes.items():
        np.testing.assert_allclose(array_from_node(node), expected[method].array, rtol=0, atol=26 * 432 * EPS32)


@pytest.mark.process
def test_a_models_layers_are_listed_by_the_worker_not_in_this_process():
    from SegHiResCAMLib import list_layers
    from SegHiResCAMLib.jobs.layers_job import LayersJob
    from SegHiResCAMLib.models.loading import load_model

    listing = LayersJob(MODEL, size=16).wait(timeout=120)
    loaded = load_model(MODEL)
    expected = list_layers(loaded.module, loaded.card.example_shape(16))
    assert [row["name"] for row in listing["layers"]] == [info.name for info in expected]
    assert listing["default_layers"] == list(loaded.card.layers) and listing["default_layers"][0] == "decoder.0"
    shapes = {row["name"]: row["output_shape"] for row in listing["layers"]}
    assert all(shapes[info.name] == (list(info.output_shape) if info.output_shape else None) for info in expected)
