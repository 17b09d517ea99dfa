"""Sliding windows through every door (issue 14's wiring, issue 8 section 4): the settings' choice, "auto",
the memory refusal before the work, the command line, the region's one prediction and the evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_models import brain_like_image, save_tiny_unet

from SegHiResCAMLib import explain, explain_detailed
from SegHiResCAMLib.cli import build_parser, explain_request, main
from SegHiResCAMLib.engine.job import explain_samples
from SegHiResCAMLib.engine.memory import AVAILABLE_MEMORY_VARIABLE, RUNTIME_BYTES, USABLE_SHARE, available_bytes
from SegHiResCAMLib.engine.prediction import predicted_mask
from SegHiResCAMLib.engine.registry import build_methods
from SegHiResCAMLib.engine.sliding_window import predict
from SegHiResCAMLib.engine.window_plan import plan_windows
from SegHiResCAMLib.errors import InputError, NotEnoughMemoryError
from SegHiResCAMLib.evaluation.scoring import RegionScorer, resolve_region
from SegHiResCAMLib.io.images import read_image, write_image
from SegHiResCAMLib.models.loading import load_model
from SegHiResCAMLib.models.preprocess import prepare_input
from SegHiResCAMLib.pipeline import explain_volume, predicted_region_on_volume, settings_for_model
from SegHiResCAMLib.settings import ExplainSettings
from SegHiResCAMLib.volume import Volume
from SegHiResCAMLib.windows import SlidingWindow
from SegHiResCAMLib.worker.protocol import ExplainRequest, request_from_json

SHAPE = (24, 20, 28)
CLASS = 2


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("window_models")
    return {"plain": save_tiny_unet(folder, "plain"),
            "patched": save_tiny_unet(folder, "patched", patch_size=(16, 16, 16))}


@pytest.fixture(scope="module")
def volume() -> Volume:
    return Volume(brain_like_image(SHAPE, seed=3).astype(np.float32), np.diag([1.0, 1.0, 1.0, 1.0]))


class ShapeRecorder(torch.nn.Module):
    """A fully convolutional net that records the spatial shape of every input it is given."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Conv3d(1, 8, 3, padding=1)
        self.head = torch.nn.Conv3d(8, 2, 1)
        self.seen: list[tuple[int, ...]] = []

    def forward(self, x):
        self.seen.append(tuple(x.shape[2:]))
        return self.head(torch.relu(self.body(x)))


# ----------------------------------------------------------------------------- the settings' choice


def test_the_sliding_window_choice_is_declared_once_and_round_trips_through_the_worker_json():
    for choice in ("auto", None, SlidingWindow((16, 12, 8), step=0.25, gaussian=False, mirror_axes=(0, 2)),
                   SlidingWindow((32,))):
        settings = ExplainSettings(target_class=1, sliding_window=choice)
        again = ExplainSettings.from_dict(json.loads(json.dumps(settings.to_dict())))
        assert again == settings and again.sliding_window == choice
        request = ExplainRequest(images=("a.nrrd",), model="m.pt", outputs=("h.nrrd",), settings=settings)
        assert request_from_json(json.dumps(request.to_dict())).settings.sliding_window == choice
    assert ExplainSettings(target_class=1).sliding_window == "auto"  # the default
    with pytest.raises(InputError, match="sliding_window"):
        ExplainSettings(target_class=1, sliding_window="windows")
    with pytest.raises(InputError, match="whole image in one pass"):
        ExplainSettings(target_class=1, methods=("kernel-weighted-contribution",), sliding_window=SlidingWindow((8,)))


# ----------------------------------------------------------------------------- the engine's door


def test_auto_and_explicit_one_pass_give_todays_whole_volume_map_exactly(models):
    model = load_model(models["plain"]).module
    image = brain_like_image(SHAPE, seed=4)[None]
    settings = ExplainSettings(target_class=CLASS, layers=("decoder.0",), device="cpu", sliding_window=None)
    today = explain_samples(model, image, settings, build_methods(settings.methods)).heatmap  # the one-pass loop
    for choice in ("auto", None):
        got = explain(model, image, layer="decoder.0", target_class=CLASS, device="cpu", sliding_window=choice)
        assert np.array_equal(got, today)


def test_explain_and_explain_detailed_take_a_window_and_equal_the_windowed_engine(models):
    from SegHiResCAMLib.engine.sliding_window import explain_windows

    model = load_model(models["plain"]).module
    image = brain_like_image(SHAPE, seed=5)[None]
    window = SlidingWindow((16, 16, 16))
    reference = explain_windows(model, image, layers=["decoder.0"], class_index=CLASS, window=window, device="cpu")
    got = explain_detailed(model, image, layer="decoder.0", target_class=CLASS, device="cpu", sliding_window=window)
    assert np.array_equal(got.heatmap, reference.heatmap) and got.roi_voxels == reference.roi_voxels
    cube = explain(model, image, layer="decoder.0", target_class=CLASS, device="cpu",
                   sliding_window=SlidingWindow((16,)))  # one number: every axis
    assert np.array_equal(cube, reference.heatmap)


def test_a_volume_over_the_memory_budget_is_explained_by_windows_automatically(monkeypatch):
    model = ShapeRecorder().eval()
    image = brain_like_image((48, 48, 48), seed=6)[None]
    settings = ExplainSettings(target_class=1, layers=("body",), device="cpu")
    whole = plan_windows(model, image.shape, ExplainSettings(target_class=1, layers=("body",), device="cpu",
                                                             sliding_window=None)).estimate
    assert whole.fits  # on this machine one pass fits; with a budget of half what it adds it does not
    budget = int((RUNTIME_BYTES + (whole.peak_bytes - RUNTIME_BYTES) // 2) / USABLE_SHARE)
    monkeypatch.setenv(AVAILABLE_MEMORY_VARIABLE, str(budget))
    assert available_bytes("cpu") == budget
    plan = plan_windows(model, image.shape, settings)
    assert plan.window is not None and plan.estimate.fits and plan.windows > 1
    assert plan.describe().startswith("estimated peak about ") and f"{plan.windows} windows of " in plan.describe()
    messages = []
    got = explain_detailed(model, image, layer="body", target_class=1, device="cpu",
                           progress=lambda fraction, message: messages.append(message))
    assert messages[0] == plan.describe()
    expected = explain_detailed(model, image, layer="body", target_class=1, device="cpu", sliding_window=plan.window)
    assert np.array_equal(got.heatmap, expected.heatmap)
    assert plan.window.patch_size in model.seen and (48, 48, 48) not in model.seen  # never the whole volume


def test_a_run_that_does_not_fit_is_refused_before_any_forward_at_its_size(monkeypatch):
    model = ShapeRecorder().eval()
    image = brain_like_image((48, 48, 48), seed=6)[None]
    monkeypatch.setenv(AVAILABLE_MEMORY_VARIABLE, "2MB")
    for choice, way in ((None, "one pass over the whole image"), (SlidingWindow((32,)), "8 windows of 32x32x32"),
                        ("auto", "windows of 16x16x16")):
        model.seen.clear()
        with pytest.raises(NotEnoughMemoryError, match=way) as refused:
            explain(model, image, layer="body", target_class=1, device="cpu", sliding_window=choice)
        message = str(refused.value)
        assert "\n" not in message and "of 2 MB available on the CPU" in message
        assert "smaller crop" in message and "shallower layer" in message
        assert ("sliding windows" if choice is None else "smaller patch") in message
        # only the small probe ran (at most 32 voxels an axis), never the image or a window of the run
        assert all(max(shape) <= 32 for shape in model.seen) and (48, 48, 48) not in model.seen
    monkeypatch.setenv(AVAILABLE_MEMORY_VARIABLE, "lots")
    with pytest.raises(InputError, match=AVAILABLE_MEMORY_VARIABLE):
        available_bytes("cpu")


# ----------------------------------------------------------------------------- the pipeline and the card


def test_auto_tiles_like_the_models_own_inference_when_the_card_has_a_patch(models, volume):
    loaded = load_model(models["patched"])
    assert loaded.card.patch_size == (16, 16, 16)
    messages = []
    maps, explanation = explain_volume(loaded, volume, ExplainSettings(target_class=CLASS, device="cpu"),
                                       progress=lambda fraction, message: messages.append(message))
    windowed, _ = explain_volume(loaded, volume, ExplainSettings(target_class=CLASS, device="cpu",
                                                                 sliding_window=SlidingWindow((16, 16, 16))))
    one_pass, _ = explain_volume(loaded, volume, ExplainSettings(target_class=CLASS, device="cpu", sliding_window=None))
    heat = maps["seg-hires-grad-cam"].array
    assert heat.max() > 0 and np.array_equal(heat, windowed["seg-hires-grad-cam"].array)
    assert not np.array_equal(heat, one_pass["seg-hires-grad-cam"].array)  # a different computation
    assert any("windows of 16x16x16" in message and message.startswith("estimated peak") for message in messages)


def test_the_point_region_and_the_evaluation_region_come_from_the_fused_prediction(models, volume):
    loaded = load_model(models["patched"])
    card = loaded.card
    settings = settings_for_model(ExplainSettings(target_class=CLASS, device="cpu"), card)
    prepared = prepare_input(volume, card)
    window = SlidingWindow((16, 16, 16))
    fused = predict(loaded.module, prepared.image, sliding_window=window, device="cpu")
    on_model_grid = predicted_mask(loaded.module, prepared.image, settings, window=window)
    assert np.array_equal(on_model_grid, fused.argmax(0) == CLASS) and on_model_grid.any()
    one_pass = predicted_mask(loaded.module, prepared.image, settings)
    assert not np.array_equal(on_model_grid, one_pass)  # the windows change the prediction itself
    region = predicted_region_on_volume(loaded, prepared, settings, card, window)
    assert np.array_equal(resolve_region(loaded, volume, CLASS, device="cpu", sliding_window=window), region)
    assert np.array_equal(resolve_region(loaded, volume, CLASS, device="cpu"),
                          predicted_region_on_volume(loaded, prepared, settings, card))
    # the scorer reads the same fused logits: y = sum_p m(p) Z_c(p), checked in float64
    scorer = RegionScorer(loaded, volume, CLASS, region, device="cpu", sliding_window=window)
    mask = np.asarray(prepared.roi_to_model(region)).astype(bool)
    expected = float((fused[CLASS].astype(np.float64) * mask).sum())
    tolerance = 8 * np.finfo(np.float32).eps * float(np.abs(fused[CLASS]).astype(np.float64).sum())
    assert abs(scorer.score_one(volume.array) - expected) <= tolerance


# ----------------------------------------------------------------------------- the command line


def test_the_command_lines_window_options_reach_the_engine(models, volume, tmp_path):
    image = tmp_path / "image.nrrd"
    write_image(volume, image)
    common = ["explain", "--image", str(image), "--model", str(models["plain"]), "--class", str(CLASS),
              "--device", "cpu"]
    args = build_parser().parse_args(common + ["--out", str(tmp_path / "w.nrrd"), "--patch-size", "16",
                                               "--tile-step", "0.75", "--mirror", "0", "2"])
    window = SlidingWindow((16,), step=0.75, mirror_axes=(0, 2))
    assert explain_request(args).settings.sliding_window == window
    assert main(common + ["--out", str(tmp_path / "w.nrrd"), "--patch-size", "16", "--tile-step", "0.75",
                          "--mirror", "0", "2"]) == 0
    maps, _ = explain_volume(load_model(models["plain"]), read_image(image),
                             ExplainSettings(target_class=CLASS, device="cpu", sliding_window=window))
    assert np.array_equal(read_image(tmp_path / "w.nrrd").array, maps["seg-hires-grad-cam"].array)
    assert main(common + ["--out", str(tmp_path / "one.nrrd"), "--whole-volume"]) == 0
    maps, _ = explain_volume(load_model(models["plain"]), read_image(image),
                             ExplainSettings(target_class=CLASS, device="cpu", sliding_window=None))
    assert np.array_equal(read_image(tmp_path / "one.nrrd").array, maps["seg-hires-grad-cam"].array)
    parse = build_parser().parse_args
    assert explain_request(parse(common + ["--out", "h.nrrd"])).settings.sliding_window == "auto"
    assert explain_request(parse(common + ["--out", "h.nrrd", "--patch-size", "8", "12", "16"])).settings \
        .sliding_window == SlidingWindow((8, 12, 16))
    for bad, says in ((["--whole-volume", "--patch-size", "16"], "--whole-volume"), (["--mirror", "0"], "need --patch-size"),
                      (["--patch-size", "1", "2", "3", "4"], "1, 2 or 3 numbers")):
        with pytest.raises(InputError, match=says):
            explain_request(parse(common + ["--out", "h.nrrd", *bad]))
    batch = parse(["batch", "--cases", "c.csv", "--model", "m.pt", "--class", "1", "--out", "o", "--patch-size", "16"])
    assert batch.patch_size == [16]
    from SegHiResCAMLib.evaluation.command import settings_from

    evaluate = parse(["evaluate", "--image", "i.nrrd", "--model", "m.pt", "--class", "1", "--out", "o",
                      "--whole-volume"])
    assert settings_from(evaluate).sliding_window is None


def test_the_command_line_refuses_a_whole_volume_that_does_not_fit_with_the_estimate(models, volume, tmp_path,
                                                                                      monkeypatch, capsys):
    image = tmp_path / "image.nrrd"
    write_image(volume, image)
    monkeypatch.setenv(AVAILABLE_MEMORY_VARIABLE, "1MB")
    out = tmp_path / "h.nrrd"
    status = main(["explain", "--image", str(image), "--model", str(models["plain"]), "--class", str(CLASS),
                   "--device", "cpu", "--out", str(out), "--whole-volume"])
    error = capsys.readouterr().err.strip().splitlines()
    assert status == 1 and len(error) == 1 and not out.exists()
    assert error[0].startswith("seghirescam: error: this explanation (one pass over the whole image) needs an "
                               "estimated about ") and "of 1 MB available on the CPU" in error[0]
