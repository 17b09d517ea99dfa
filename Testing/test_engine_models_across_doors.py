"""Models as users hold them, through every door of the settings-object engine and the evaluation.

The settings object carries ``output_key`` to the batch loop and to Kernel-Weighted Contribution's
ablations; a ``LoadedModel``'s card fills what the settings leave open (layers, class name,
output_key); sliding windows and the memory estimate take output_key too and run models in their
owner's mode; an exported program returns its outputs as the model did and is explained in memory
too; the prediction that finds a point's region reads the same output; the evaluation scores the card's output and runs models in their owner's mode; why a
layer cannot be explained reaches the command line and the worker's listing, which the panel reads.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from SegHiResCAMLib.cli import main
from SegHiResCAMLib.engine.explain import explain, explain_with_settings
from SegHiResCAMLib.engine.memory import step_peak_bytes
from SegHiResCAMLib.engine.prediction import predicted_mask
from SegHiResCAMLib.engine.sliding_window import explain_windows, predict
from SegHiResCAMLib.errors import ModelError, SegHiResCAMWarning
from SegHiResCAMLib.evaluation.masking import masking_scores_on_volume
from SegHiResCAMLib.evaluation.randomisation import execution_stages
from SegHiResCAMLib.evaluation.scoring import RegionScorer
from SegHiResCAMLib.models.card import ModelCard
from SegHiResCAMLib.models.loading import LoadedModel, load_model
from SegHiResCAMLib.service import run_request
from SegHiResCAMLib.settings import ExplainSettings
from SegHiResCAMLib.volume import Volume
from SegHiResCAMLib.windows import SlidingWindow
from SegHiResCAMLib.worker.protocol import LayersRequest

from owner_nets import OnlySeg, SharedActivationNet, TwoOutputs, blob, hd_bet_like

METHODS = ("seg-hires-grad-cam", "kernel-weighted-contribution")


def _two_outputs() -> TwoOutputs:
    torch.manual_seed(0)
    return TwoOutputs(both_full=True).eval()  # "edges" and "seg", both at full resolution


def _loaded(module: nn.Module, **card) -> LoadedModel:
    card = ModelCard(spatial_dims=2, class_names=("a", "b", "c"), layers=("features",), **card)
    return LoadedModel(module=module, card=card, source=Path("two.pt"), kind="python")


def test_the_settings_output_key_reaches_the_batch_loop_and_the_ablations():
    model = _two_outputs()
    image = blob((16, 16), seed=8)
    roi = np.zeros((16, 16), bool)
    roi[4:12, 5:11] = True  # the untrained network predicts class 2 everywhere: explain class 1 over a region
    settings = ExplainSettings(target_class=1, layers=("features",), methods=METHODS, output_key="seg", device="cpu")
    got = explain_with_settings(model, image, settings, roi=roi)
    expected = explain_with_settings(OnlySeg(model), image, dataclasses.replace(settings, output_key=None), roi=roi)
    assert got.roi_voxels == expected.roi_voxels == int(roi.sum())
    for method in METHODS:
        assert expected.maps[method].max() == 1.0
        np.testing.assert_array_equal(got.maps[method], expected.maps[method], err_msg=method)
    # A LoadedModel's card names the layer, the output and the classes the settings leave open.
    by_card = explain_with_settings(_loaded(model, output_key="seg"), image,
                                    ExplainSettings(target_class="b", methods=METHODS, device="cpu"), roi=roi)
    for method in METHODS:
        np.testing.assert_array_equal(by_card.maps[method], expected.maps[method], err_msg=method)


def test_the_evaluation_scores_and_masks_the_output_the_card_names():
    model = _two_outputs()
    slices = blob((16, 16), seed=9)[0]
    volume = Volume(np.stack([slices, slices[::-1], slices[:, ::-1]]), np.eye(4))
    region = np.zeros(volume.spatial_shape, bool)
    region[:, 4:12, 5:11] = True
    heat = np.clip(blob((3, 16, 16), seed=10)[0], 0.0, 1.0)
    chosen = RegionScorer(_loaded(model, output_key="seg"), volume, 1, region, device="cpu")
    reference = RegionScorer(_loaded(OnlySeg(model)), volume, 1, region, device="cpu")
    assert chosen.score_one(volume.array) == reference.score_one(volume.array) != 0.0
    assert masking_scores_on_volume(chosen, heat) == masking_scores_on_volume(reference, heat)


def test_randomisation_follows_a_model_wholly_in_training_mode_as_it_runs_for_explanations():
    # Batch norm after global pooling sees one value per channel: in training mode it cannot run at all.
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.BatchNorm2d(4),
                          nn.Conv2d(4, 2, 1)).train()
    before = {name: value.clone() for name, value in model.state_dict().items()}
    stages = execution_stages(model, torch.ones(1, 1, 8, 8))
    assert [name for name, _ in stages] == ["3", "2", "0"]  # output first
    assert all(module.training for module in model.modules())
    assert all(torch.equal(before[name], value) for name, value in model.state_dict().items())


def test_why_a_layer_cannot_be_explained_reaches_the_command_line_and_the_panels_listing(tmp_path, capsys):
    path = tmp_path / "shared.ts"
    torch.jit.save(torch.jit.trace(SharedActivationNet(3).eval(), torch.zeros(1, 1, 8, 8, 8)), str(path))
    why = "it runs 3 times in one forward pass (called from blocks.0, blocks.1, blocks.2), so its output is ambiguous"
    assert main(["layers", "--model", str(path), "--size", "8"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if not line.startswith("#")}
    assert lines["blocks.2.act"].endswith(f"(cannot be explained: {why})")
    assert "cannot be explained" not in lines["blocks.2.conv"] and lines["blocks.2.conv"].endswith("1x4x8x8x8")
    event = json.loads(json.dumps(run_request(LayersRequest(model=str(path), trust_code=False, size=8)).event()))
    rows = {row["name"]: row for row in event["layers"]}
    assert rows["blocks.2.act"]["unusable"] == why and rows["blocks.2.conv"]["unusable"] is None


def test_sliding_windows_and_the_memory_estimate_take_the_output_key():
    model = _two_outputs()
    image = blob((24, 24), seed=11)
    roi = np.zeros((24, 24), bool)
    roi[6:18, 5:15] = True
    window = SlidingWindow((16, 16))
    kwargs = dict(layers=["features"], class_index=1, roi=roi, window=window, device="cpu")
    with pytest.raises(ModelError, match="name it with output_key"):
        explain_windows(model, image, **kwargs)
    expected = explain_windows(OnlySeg(model), image, **kwargs)
    assert expected.heatmap.max() == 1.0
    for given, key in ((model, "seg"), (_loaded(model, output_key="seg"), None)):  # the argument, or the card's
        got = explain_windows(given, image, output_key=key, **kwargs)
        np.testing.assert_array_equal(got.heatmap, expected.heatmap)
        np.testing.assert_array_equal(predict(given, image, sliding_window=window, device="cpu", output_key=key),
                                      predict(OnlySeg(model), image, sliding_window=window, device="cpu"))
    probe = torch.from_numpy(image)[None]
    with pytest.raises(ModelError, match="name it with output_key"):
        step_peak_bytes(model, probe, ["features"])
    assert step_peak_bytes(model, probe, ["features"], output_key="seg") > 0


def test_sliding_windows_run_a_model_wholly_in_training_mode_in_eval_mode_and_say_so():
    model = hd_bet_like(seed=6).train()
    image = blob((8, 8, 8), seed=12, dtype=np.float64)
    before = {name: value.clone() for name, value in model.state_dict().items()}
    kwargs = dict(layers=["end_conv"], class_index=1, window=SlidingWindow((8, 8, 8)), device="cpu")
    result = explain_windows(model, image, **kwargs)
    assert result.warnings[0].startswith("the model was in training mode, so it ran in evaluation mode")
    np.testing.assert_array_equal(result.heatmap, explain_windows(model.eval(), image, **kwargs).heatmap)
    model.train()
    with pytest.warns(SegHiResCAMWarning, match="was in training mode"):
        predict(model, image, device="cpu")
    assert all(module.training for module in model.modules())
    assert all(torch.equal(before[name], value) for name, value in model.state_dict().items())


def test_the_prediction_behind_a_point_region_reads_the_output_the_settings_or_the_card_name():
    model = _two_outputs()
    image = blob((16, 16), seed=13)
    with torch.no_grad():
        probability = torch.softmax(OnlySeg(model)(torch.from_numpy(image)[None]), 1)[0, 1]
    settings = ExplainSettings(target_class=1, target="probability-threshold",
                               target_threshold=float(probability.median()), device="cpu")
    expected = predicted_mask(OnlySeg(model), image, settings)
    assert 0 < expected.sum() < expected.size
    with pytest.raises(ModelError, match="name it with output_key"):
        predicted_mask(model, image, settings)
    np.testing.assert_array_equal(predicted_mask(model, image, dataclasses.replace(settings, output_key="seg")),
                                  expected)
    by_card = predicted_mask(_loaded(model, output_key="seg"), image, dataclasses.replace(settings, target_class="b"))
    np.testing.assert_array_equal(by_card, expected)


def test_an_exported_program_returns_its_outputs_as_the_model_did_and_is_explained_in_memory_too(tmp_path):
    model = _two_outputs()
    image = blob((16, 16), seed=14)
    roi = np.zeros((16, 16), bool)
    roi[4:12, 5:11] = True
    program = torch.export.export(model, (torch.from_numpy(image)[None],))
    expected = explain(OnlySeg(model), image, layer="features", target_class=1, roi=roi, device="cpu")
    assert expected.max() == 1.0
    with pytest.raises(ModelError, match=r"2 outputs at the input's resolution \('edges' .*'seg' .*\)"):
        explain(program, image, layer="features", target_class=1, roi=roi, device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a program runs as exported: no training-mode warning
        got = explain(program, image, layer="features", target_class=1, roi=roi, output_key="seg", device="cpu")
    np.testing.assert_array_equal(got, expected)
    path = tmp_path / "two.pt2"
    torch.export.save(program, str(path))
    (tmp_path / "two.json").write_text(json.dumps({"spatial_dims": 2, "output_key": "seg", "layers": ["features"],
                                                   "class_names": ["a", "b", "c"]}))
    np.testing.assert_array_equal(explain(load_model(path), image, target_class="b", roi=roi, device="cpu"), expected)
