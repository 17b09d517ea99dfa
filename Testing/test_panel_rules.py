"""The panel's pure rules: which segment ID, layer and model text survive a change, and the torch version check."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from SegHiResCAMLib.dependencies import installed_version, unmet_requirement, version_satisfies
from SegHiResCAMLib.panel_rules import (
    PANEL_CHANNELS,
    extra_channels_to_show,
    layer_choices,
    layer_to_keep,
    model_path_text,
    segment_id_to_keep,
)


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


@pytest.mark.parametrize("in_channels, shown, refused", [(1, 0, False), (2, 1, False), (4, 3, False), (5, 3, True),
                                                         (0, 0, False)])
def test_the_panel_shows_one_volume_selector_per_extra_channel_and_says_when_it_cannot(in_channels, shown, refused):
    count, note = extra_channels_to_show(in_channels)
    assert count == shown and bool(note) == refused and PANEL_CHANNELS == 4
    if refused:
        assert note.startswith(f"this model takes {in_channels} input channels and the panel offers 4; run it from")


def test_layer_rows_put_the_cards_layers_first_with_a_star_and_skip_layers_without_output():
    listing = {"default_layers": ["decoder.0", "absent"], "layers": [
        {"name": "encoder", "type": "ModuleList", "output_shape": None},
        {"name": "encoder.0", "type": "ConvBlock", "output_shape": [1, 4, 32, 32, 32]},
        {"name": "decoder.0", "type": "UpBlock", "output_shape": [1, 8, 16, 16, 16]},
    ]}
    assert layer_choices(listing) == [("decoder.0", "UpBlock  8×16×16×16  ★"), ("encoder.0", "ConvBlock  4×32×32×32")]


def test_layer_rows_leave_out_the_layers_the_listing_says_cannot_be_explained():
    why = "it runs 3 times in one forward pass (called from blocks.0, blocks.1, blocks.2), so its output is ambiguous"
    listing = {"default_layers": [], "layers": [
        {"name": "blocks.2.act", "type": "ReLU", "output_shape": [1, 4, 8, 8, 8], "unusable": why},
        {"name": "blocks.2.conv", "type": "Conv3d", "output_shape": [1, 4, 8, 8, 8], "unusable": None},
    ]}
    assert layer_choices(listing) == [("blocks.2.conv", "Conv3d  4×8×8×8")]


@pytest.mark.process
def test_the_panels_layer_listing_runs_in_the_background_and_gives_the_rows_and_channels(tmp_path):
    import time

    from test_explain_job_regions import MODEL, two_channel_model

    from SegHiResCAMLib import list_layers
    from SegHiResCAMLib.jobs.layers_job import LayersJob
    from SegHiResCAMLib.models.loading import load_model

    model = two_channel_model(tmp_path)
    job = LayersJob(model, size=16)
    job.start()  # returns while the worker starts: the panel polls from a timer
    assert job.state == "running"
    deadline = time.monotonic() + 120
    while not job.poll():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    listing = job.result()
    loaded = load_model(model)
    # the rows: every layer with an output to explain ('pool' runs several times: it cannot be explained)
    infos = [info for info in list_layers(loaded.module, loaded.card.example_shape(16))
             if info.output_shape and not info.unusable]
    assert "pool" not in {info.name for info in infos}
    rows = layer_choices(listing)
    assert [name for name, _ in rows] == ["decoder.0", "decoder.1", "bottleneck"] + [
        info.name for info in infos if info.name not in ("decoder.0", "decoder.1", "bottleneck")]
    assert rows[0][1].endswith("★") and listing["in_channels"] == 2 and MODEL.exists()


@pytest.mark.process
def test_a_listing_that_fails_ends_polled_with_a_one_line_error_and_no_temp_folder(tmp_path):
    import time

    from SegHiResCAMLib.errors import SegHiResCAMError
    from SegHiResCAMLib.jobs.layers_job import LayersJob

    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a model")
    job = LayersJob(broken)
    job.start()
    temp_dir = job.temp_dir
    deadline = time.monotonic() + 120
    while not job.poll():  # never raises: the panel stays consistent
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert job.state == "failed" and isinstance(job.error, SegHiResCAMError) and "\n" not in str(job.error)
    assert "broken.pt" in str(job.error) and not temp_dir.exists()


def test_the_panels_sliding_window_box_and_patch_size_make_the_command_lines_choice():
    import json

    from SegHiResCAMLib.cli import build_parser, explain_settings
    from SegHiResCAMLib.panel_rules import sliding_window_choice
    from SegHiResCAMLib.settings import ExplainSettings

    common = ["explain", "--image", "i.nrrd", "--model", "m.pt", "--class", "1", "--out", "h.nrrd"]
    for (auto, patch), options in (((True, 0), []), ((True, 64), []), ((False, 64), ["--patch-size", "64"]),
                                   ((False, 0), ["--whole-volume"])):
        choice = sliding_window_choice(auto, patch)
        assert choice == explain_settings(build_parser().parse_args(common + options)).sliding_window
        settings = ExplainSettings(target_class=1, sliding_window=choice)  # what the worker receives
        assert ExplainSettings.from_dict(json.loads(json.dumps(settings.to_dict()))).sliding_window == choice
