"""The engine's settings door: one ExplainSettings from explain() to the batch loop, region kinds included."""

from __future__ import annotations

import numpy as np
import pytest
from engine_nets import unet

from SegHiResCAMLib import explain, explain_detailed
from SegHiResCAMLib.engine.explain import explain_with_settings
from SegHiResCAMLib.errors import InputError
from SegHiResCAMLib.settings import ExplainSettings

IMAGE = np.random.default_rng(4).random((1, 8, 8, 8), dtype=np.float32)


def test_explain_detailed_is_the_settings_door_with_its_keywords_as_fields():
    model = unet(3, classes=3)
    roi = np.zeros((8, 8, 8), bool)
    roi[2:6, 1:5, 3:7] = True
    by_keywords = explain_detailed(model, IMAGE, layer=["bottleneck", "decoder.0"], target_class=1, roi=roi,
                                   methods=("seg-grad-cam", "seg-hires-grad-cam"), relu=False, normalize=False,
                                   device="cpu")
    settings = ExplainSettings(target_class=1, layers=("bottleneck", "decoder.0"),
                               methods=("seg-grad-cam", "seg-hires-grad-cam"), relu=False, normalize=False,
                               device="cpu")
    by_settings = explain_with_settings(model, IMAGE, settings, roi=roi)
    assert list(by_settings.maps) == ["seg-grad-cam", "seg-hires-grad-cam"]
    for method, heat in by_keywords.maps.items():
        np.testing.assert_array_equal(by_settings.maps[method], heat)
    assert by_settings.roi_voxels == by_keywords.roi_voxels == int(roi.sum())


def test_the_whole_image_region_is_the_region_of_every_voxel():
    model = unet(3, classes=3)
    whole = explain_with_settings(model, IMAGE, ExplainSettings(target_class=2, layers="bottleneck",
                                                                region="whole-image", device="cpu"))
    ones = explain_detailed(model, IMAGE, layer="bottleneck", target_class=2, roi=np.ones((8, 8, 8), bool),
                            device="cpu")
    np.testing.assert_array_equal(whole.heatmap, ones.heatmap)
    assert whole.roi_voxels == 8 * 8 * 8 and whole.heatmap.max() == 1.0  # exact: the maximum divided by itself


def test_region_kinds_that_contradict_the_given_region_are_refused_before_any_work():
    model = unet(3, classes=3)
    calls = []
    with pytest.raises(InputError, match="region kind 'prediction'"):
        explain_with_settings(model, IMAGE, ExplainSettings(target_class=1, layers="bottleneck", region="prediction"),
                              roi=np.ones((8, 8, 8), bool), progress=lambda f, m: calls.append(f))
    with pytest.raises(InputError, match="'mask' needs a region"):
        explain_with_settings(model, IMAGE, ExplainSettings(target_class=1, layers="bottleneck", region="mask"),
                              progress=lambda f, m: calls.append(f))
    assert calls == []


def test_a_class_name_reaches_the_engine_only_through_the_model_card():
    with pytest.raises(InputError, match="'white matter' is a name; the engine takes a class index"):
        explain(unet(3, classes=3), IMAGE, layer="bottleneck", target_class="white matter", device="cpu")


@pytest.mark.parametrize("threshold", [0.0, 1.0, float("nan")])
def test_a_target_threshold_outside_the_open_unit_interval_is_refused(threshold):
    with pytest.raises(InputError, match="target_threshold must be a number strictly between 0 and 1"):
        explain(unet(3, classes=3), IMAGE, layer="bottleneck", target_class=1, target="probability-threshold",
                threshold=threshold, device="cpu")
