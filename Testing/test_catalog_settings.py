"""The catalog names every choice once; the settings check every value once and survive JSON."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from SegHiResCAMLib import catalog
from SegHiResCAMLib.errors import InputError
from SegHiResCAMLib.settings import DisplaySettings, ExplainSettings, RegionPoint
from SegHiResCAMLib.windows import SlidingWindow

EVERY_FIELD = dict(
    target_class="white matter", layers=("bottleneck", "decoder.0"), methods=("seg-grad-cam", "seg-hires-grad-cam"),
    target="probability-threshold", target_threshold=0.25, device="cuda:1", slice_axis=2, region="point",
    point=RegionPoint((12.5, -3.0, 40.0), 4.0), multilabel=True, probabilities=False, output_key="seg", relu=False,
    normalize=False, batch_size=3,
    sliding_window=SlidingWindow((96, 96, 80), step=0.25, gaussian=False, mirror_axes=(0, 1)),
)


def test_catalog_names_are_unique_and_complete():
    for choices in (catalog.METHOD_CHOICES, catalog.TARGET_CHOICES, catalog.DEVICE_CHOICES, catalog.REGION_CHOICES):
        names = catalog.names(choices)
        assert len(set(names)) == len(names) and all(choice.label for choice in choices)
    assert catalog.DEFAULT_METHOD == "seg-hires-grad-cam" == catalog.METHOD_CHOICES[0].name
    assert all(method.formula and set(method.targets) <= set(catalog.names(catalog.TARGET_CHOICES))
               for method in catalog.METHOD_CHOICES)
    assert [m.name for m in catalog.METHOD_CHOICES if not m.gradient] == ["kernel-weighted-contribution"]


def test_engine_dispatch_and_catalog_name_the_same_methods_and_agree_on_gradients():
    from SegHiResCAMLib import METHODS
    from SegHiResCAMLib.engine.registry import ENGINE_METHODS, build_methods

    assert list(ENGINE_METHODS) == list(catalog.names(catalog.METHOD_CHOICES))
    for method in build_methods(list(ENGINE_METHODS)):
        info = catalog.method(method.name)
        assert method.uses_gradient == info.gradient
        assert (method.name in METHODS) == info.gradient  # the gradient methods are functions of (A, G)
        assert (method.preparation_weight > 0) == (not info.gradient)


def test_an_unknown_name_is_refused_with_the_choices():
    with pytest.raises(InputError, match=r"^method 'gradcam' is unknown; choose one of seg-hires-grad-cam, "):
        catalog.method("gradcam")
    with pytest.raises(InputError, match=r"region 'lesion' is unknown; choose one of mask, prediction, whole-image, "
                                         r"point$"):
        catalog.find(catalog.REGION_CHOICES, "lesion", "region")


def test_settings_survive_a_json_round_trip_with_every_field_set():
    settings = ExplainSettings(**EVERY_FIELD)
    text = json.dumps(settings.to_dict())
    assert ExplainSettings.from_dict(json.loads(text)) == settings
    assert set(json.loads(text)) == set(EVERY_FIELD)  # every field travels
    display = DisplaySettings(opacity=0.7, lower_threshold=0.0, show_3d=True, output_name="T1 heatmap")
    assert DisplaySettings.from_dict(json.loads(json.dumps(display.to_dict()))) == display
    assert ExplainSettings.from_dict({"target_class": 1}) == ExplainSettings(target_class=1)
    last = ExplainSettings(target_class=1, output_key=-1)  # an index stays an index (UNet++: the last output)
    assert ExplainSettings.from_dict(json.loads(json.dumps(last.to_dict()))).output_key == -1


def test_unknown_and_missing_keys_are_refused_naming_them():
    data = ExplainSettings(target_class=1).to_dict()
    with pytest.raises(InputError, match=r"unknown keys \['threshold'\]"):
        ExplainSettings.from_dict({**data, "threshold": 0.5})
    data.pop("target_class")
    with pytest.raises(InputError, match=r"lack the keys \['target_class'\]"):
        ExplainSettings.from_dict(data)
    with pytest.raises(InputError, match=r"unknown keys \['opacityy'\]"):
        DisplaySettings.from_dict({"opacityy": 0.5})


def test_values_are_normalised_once():
    settings = ExplainSettings(target_class="2", layers="bottleneck", methods=["seg-grad-cam"],
                               slice_axis=np.int64(1), target_threshold=np.float32(0.5), batch_size=np.int32(4))
    assert settings.target_class == 2 and settings.layers == ("bottleneck",) and settings.methods == ("seg-grad-cam",)
    assert type(settings.slice_axis) is int and type(settings.batch_size) is int
    assert type(ExplainSettings(target_class=1, output_key=np.int64(2)).output_key) is int
    assert type(settings.target_threshold) is float
    assert ExplainSettings(target_class=np.int64(3)).target_class == 3
    assert ExplainSettings(target_class=" white matter ").target_class == "white matter"


@pytest.mark.parametrize("field, value, words", [
    ("target_threshold", math.nan, "target_threshold must be a number strictly between 0 and 1, got nan"),
    ("target_threshold", 0.0, "strictly between 0 and 1, got 0.0"),
    ("target_threshold", 1.0, "strictly between 0 and 1, got 1.0"),
    ("target_threshold", 1.5, "got 1.5"),
    ("target_threshold", "0.5", "got '0.5'"),
    ("target_threshold", True, "got True"),
    ("methods", (), "no method was given; choose at least one of seg-hires-grad-cam"),
    ("methods", ("seg-grad-cam", "seg-grad-cam"), "name a method twice"),
    ("methods", ("gradcam",), "method 'gradcam' is unknown; choose one of seg-hires-grad-cam"),
    ("target", "softmax", "target 'softmax' is unknown; choose one of logits, probability-threshold"),
    ("device", "gpu", "device 'gpu' is unknown; choose one of auto, cuda, cpu"),
    ("slice_axis", 3, "slice_axis must be 0, 1 or 2"),
    ("slice_axis", True, "slice_axis must be 0, 1 or 2"),
    ("region", "lesion", "region 'lesion' is unknown"),
    ("region", "point", "the region kind 'point' needs a point: place a markup point (panel), give --point R A S"),
    ("point", (1.0, 2.0, 3.0), "point must be a RegionPoint"),
    ("point", {"ras": [1, 2]}, "the point must be three finite numbers (R, A, S) in millimetres, got [1, 2]"),
    ("point", {"ras": [1, 2, math.inf]}, "three finite numbers"),
    ("point", {"ras": [1, 2, 3], "radius_mm": 0}, "the point's radius must be a positive number of millimetres, got 0"),
    ("point", {"ras": [1, 2, 3], "radius": 5}, "the point have unknown keys ['radius']"),
    ("multilabel", "yes", "multilabel must be true, false or None"),
    ("output_key", 1.5, "output_key must be an index or a key of the model's outputs, or None"),
    ("output_key", True, "output_key must be an index or a key"),
    ("output_key", "", "output_key must be an index or a key"),
    ("relu", None, "relu must be true or false"),
    ("batch_size", 0, "batch_size must be a positive number"),
    ("layers", ("",), "layers must be a list of names"),
    ("target_class", -1, "target_class must be a class index"),
    ("target_class", 1.5, "target_class must be a class index"),
])
def test_each_bad_value_is_refused_naming_the_field_and_the_allowed_values(field, value, words):
    with pytest.raises(InputError) as raised:
        ExplainSettings(**{"target_class": 1, field: value})
    assert words in str(raised.value)


@pytest.mark.parametrize("field, value", [("opacity", 1.5), ("opacity", math.nan), ("lower_threshold", -0.1),
                                          ("show_3d", 1), ("output_name", "  ")])
def test_bad_display_values_are_refused_with_the_value(field, value):
    with pytest.raises(InputError, match=field):
        DisplaySettings(**{field: value})


@pytest.mark.parametrize("changes", [dict(target="probability-threshold"), dict(relu=False)])
def test_kernel_weighted_contribution_is_refused_with_what_it_cannot_do(changes):
    with pytest.raises(InputError, match="Kernel-Weighted Contribution"):
        ExplainSettings(target_class=1, methods=("kernel-weighted-contribution",), **changes)
    ExplainSettings(target_class=1, methods=("seg-grad-cam",), **changes)  # the gradient methods can


def test_the_region_kind_follows_what_was_given_and_refuses_contradictions():
    assert ExplainSettings(target_class=1).region_kind(region_given=True) == "mask"
    assert ExplainSettings(target_class=1).region_kind(region_given=False) == "prediction"
    assert ExplainSettings(target_class=1, region="whole-image").region_kind(False) == "whole-image"
    with pytest.raises(InputError, match="'mask' needs a region"):
        ExplainSettings(target_class=1, region="mask").region_kind(False)
    with pytest.raises(InputError, match="a region was given, but the region kind 'prediction'"):
        ExplainSettings(target_class=1, region="prediction").region_kind(True)


def test_a_point_makes_the_region_kind_point_and_travels_as_json():
    point = RegionPoint(np.array([1.5, -2.0, 30.25]), radius_mm=np.float32(7.5))
    assert point.ras == (1.5, -2.0, 30.25) and type(point.radius_mm) is float
    settings = ExplainSettings(target_class=1, point=point)
    assert settings.region_kind(False) == "point" == ExplainSettings(target_class=1, region="point",
                                                                     point=point).region_kind(False)
    data = json.loads(json.dumps(settings.to_dict()))
    assert data["point"] == {"ras": [1.5, -2.0, 30.25], "radius_mm": 7.5}
    assert ExplainSettings.from_dict(data) == settings
    assert RegionPoint((0, 0, 0)).radius_mm == 10.0
    with pytest.raises(InputError, match="a region was given, but the region kind 'point'"):
        settings.region_kind(True)
    with pytest.raises(InputError, match="a point was given, but the region kind is 'whole-image'"):
        ExplainSettings(target_class=1, region="whole-image", point=point)


def test_the_three_thresholds_have_three_names():
    explain_fields = set(ExplainSettings(target_class=1).to_dict())
    display_fields = set(DisplaySettings().to_dict())
    assert "target_threshold" in explain_fields and "lower_threshold" in display_fields
    assert "threshold" not in explain_fields | display_fields
