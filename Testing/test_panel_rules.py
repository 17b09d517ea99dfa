"""The panel's pure rules: which segment ID, layer and model text survive a change, and the torch version check."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from SegHiResCAMLib.dependencies import installed_version, unmet_requirement, version_satisfies
from SegHiResCAMLib.panel_rules import layer_to_keep, model_path_text, segment_id_to_keep


@pytest.mark.parametrize(
    "segment_ids, wanted, shown, kept",
    [
        # The defect: an emptied (or empty) segmentation, while the selector still reports the old ID.
        ([], "Segment_1", "Segment_1", ""),
        ([], "", "Segment_1", ""),
        # No segmentation chosen: no segment either, whatever the selector's hidden combo box picked.
        (None, "Segment_1", "Segment_1", ""),
        (None, "", "tumor", ""),
        # The parameter node's segment exists: it wins over what the selector shows.
        (["liver", "tumor"], "tumor", "liver", "tumor"),
        # Another segmentation without that ID: follow the selector, which shows one of its segments.
        (["a", "b"], "tumor", "b", "b"),
        # Neither exists (the selector not yet filled): nothing is chosen silently.
        (["a", "b"], "tumor", "tumor", ""),
        (["a", "b"], "", "", ""),
    ],
)
def test_segment_id_to_keep(segment_ids, wanted, shown, kept):
    assert segment_id_to_keep(segment_ids, wanted, shown) == kept


@pytest.mark.parametrize(
    "layer, previous, model, layers, kept",
    [
        # The defect: another model keeps the old model's layer.
        ("decoder.0", "/m/a.pt", "/m/b.pt", ["encoder.0", "bottleneck"], ""),
        # ... unless the new model has a layer of that name.
        ("decoder.0", "/m/a.pt", "/m/b.pt", ["decoder.0", "bottleneck"], "decoder.0"),
        # The new model's layers could not be listed: the card's default, not a guess.
        ("decoder.0", "/m/a.pt", "/m/b.pt", None, ""),
        # The model was cleared.
        ("decoder.0", "/m/a.pt", "", None, ""),
        # The same model (also when stored as "." vs "" for none): the layer stays.
        ("decoder.0", "/m/a.pt", "/m/a.pt", None, "decoder.0"),
        ("x", ".", "", None, "x"),
        # First look after a scene was loaded: its saved layer stays.
        ("decoder.0", None, "/m/b.pt", ["encoder.0"], "decoder.0"),
        # The card's default stays the card's default.
        ("", "/m/a.pt", "/m/b.pt", ["decoder.0"], ""),
    ],
)
def test_layer_to_keep(layer, previous, model, layers, kept):
    assert layer_to_keep(layer, previous, model, layers) == kept


def test_the_model_field_shows_no_text_for_no_model():
    # The parameter node stores "no model" as Path(), whose text is ".": never shown as a model.
    assert model_path_text(Path()) == "" and model_path_text(None) == "" and model_path_text("") == ""
    assert model_path_text(Path("/data/bundle")) == str(Path("/data/bundle"))
    assert model_path_text("model.PT") == "model.PT"


@pytest.mark.parametrize(
    "version, requirement, met",
    [
        ("2.0.1", ">=2.1", False),
        ("1.13.1", ">=2.1", False),
        ("2.1.0", ">=2.1", True),
        ("2.1", ">=2.1", True),
        ("2.13.0", ">=2.1", True),  # numbers, not text: "2.13" > "2.2"
        ("2.2.0", ">=2.13", False),
        ("2.1.2+cu121", ">=2.1", True),  # local build label
        ("2.6.0.dev20241001+cpu", ">=2.1", True),  # nightly build of a later release
        ("2.1.0a0", ">=2.1", False),  # a pre-release comes before its release (PEP 440)
        ("2.5.0", ">=2.1,<2.5", False),
        ("not a version", ">=2.1", False),
    ],
)
def test_version_satisfies(version, requirement, met):
    assert version_satisfies(version, requirement) is met


def test_the_installed_torch_is_read_from_its_metadata():
    assert installed_version("torch") == torch.__version__
    assert installed_version("no-such-distribution-seghirescam") is None
    assert unmet_requirement("torch", ">=2.1") is None
    assert unmet_requirement("torch", ">=999") == torch.__version__
    assert unmet_requirement("no-such-distribution-seghirescam", ">=1") is None
