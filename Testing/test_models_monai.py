"""MONAI bundles and MONAI networks given as a JSON spec: loaded networks explain like the originals."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from SegHiResCAMLib import explain
from SegHiResCAMLib.errors import ModelError, UnsafeModelError
from SegHiResCAMLib.models.loading import load_model
from SegHiResCAMLib.models.preprocess import prepare_input
from SegHiResCAMLib.pipeline import explain_volume
from SegHiResCAMLib.volume import Volume

from model_kinds import UNET_ARGS, blob_image, monai_unet, write_bundle

pytest.importorskip("monai.networks.nets")
LAYER = "model.1.submodule.2"  # decoder block at half resolution

def _assert_explains_like(loaded_module, model, shape=(16, 16, 16)):
    image = blob_image(shape, seed=4)
    for method in ("seg-hires-grad-cam", "seg-grad-cam"):
        expected = explain(model, image, layer=LAYER, target_class=1, method=method, device="cpu")
        got = explain(loaded_module, image, layer=LAYER, target_class=1, method=method, device="cpu")
        assert expected.max() > 0
        # exact: the bundle builds the same MONAI class with the same weights, so the same kernels run
        np.testing.assert_array_equal(got, expected)


def test_bundle_with_state_dict_loads_and_explains_identically(tmp_path):
    model = monai_unet()
    loaded = load_model(write_bundle(tmp_path / "spleen", model))
    assert loaded.kind == "monai-bundle"
    _assert_explains_like(loaded.module, model)


def test_bundle_card_is_read_from_metadata_and_preprocessing(tmp_path):
    card = load_model(write_bundle(tmp_path / "spleen", monai_unet())).card
    assert card.name == "Tiny spleen" and card.class_names == ("background", "spleen")
    assert card.spatial_dims == 3 and card.in_channels == 1
    assert card.divisible_by == 4 and card.orientation == "RAS" and card.spacing == (1.5, 1.5, 2.0) and card.transpose == (2, 1, 0)
    assert card.intensity == {"scheme": "ct-window", "window": [-57, 164], "range": [0.0, 1.0]}


def test_bundle_with_torchscript_only_explains_identically(tmp_path):
    model = monai_unet()
    loaded = load_model(write_bundle(tmp_path / "spleen", model, torchscript=True))
    assert type(loaded.module).__name__ == "ScriptedModel"
    _assert_explains_like(loaded.module, model)


def test_bundle_expression_needs_trusted_code(tmp_path):
    model = monai_unet()
    definition = {"_target_": "monai.networks.nets.UNet", **UNET_ARGS, "channels": "$[4, 8, 16]"}
    folder = write_bundle(tmp_path / "spleen", model, network_def=definition)
    with pytest.raises(UnsafeModelError, match="--trust-code"):
        load_model(folder)
    _assert_explains_like(load_model(folder, trust_code=True).module, model)


def test_card_beside_bundle_overrides_what_was_read(tmp_path):
    folder = write_bundle(tmp_path / "spleen", monai_unet())
    (folder / "model.json").write_text(json.dumps({"layers": [LAYER], "spacing": None}))
    card = load_model(folder).card
    assert card.default_layer == LAYER and card.spacing is None and card.orientation == "RAS"


def test_network_spec_json_plus_state_dict(tmp_path):
    model = monai_unet()
    torch.save(model.state_dict(), tmp_path / "unet.pth")
    (tmp_path / "unet.json").write_text(json.dumps({"name": "UNet", "args": UNET_ARGS,
                                                    "card": {"class_names": ["background", "organ"]}}))
    for path in (tmp_path / "unet.pth", tmp_path / "unet.json"):
        loaded = load_model(path)
        assert loaded.kind == "monai-network" and loaded.card.class_names == ("background", "organ")
        assert loaded.card.transpose == (2, 1, 0)
    _assert_explains_like(loaded.module, model)


def test_unknown_monai_network_name_is_explained(tmp_path):
    torch.save({}, tmp_path / "net.pth")
    (tmp_path / "net.json").write_text(json.dumps({"name": "NoSuchNet", "args": {}}))
    with pytest.raises(ModelError, match="not a network in monai.networks.nets"):
        load_model(tmp_path / "net.pth")


def test_bundle_heatmap_comes_back_in_the_volume_grid(tmp_path):
    loaded = load_model(write_bundle(tmp_path / "spleen", monai_unet()))
    ijk_to_ras = np.diag([-1.0, -1.0, 2.5, 1.0])  # LPS-like axes, anisotropic: needs reorienting and resampling
    volume = Volume(blob_image((10, 20, 20))[0] * 200.0, ijk_to_ras)
    prepared = prepare_input(volume, loaded.card)
    # (I, J, K) at 1.5 x 1.5 x 2.0 mm is 13.3 x 13.3 x 12.5 -> 13 x 13 x 12 (round half to even, as
    # nnU-Net), padded to multiples of 4 ("4*n" in the metadata)
    assert prepared.image.shape == (1, 16, 16, 12)
    maps, _ = explain_volume(loaded, volume, target_class="spleen", layers=LAYER, device="cpu")
    heat = maps["seg-hires-grad-cam"]
    assert heat.array.shape == (10, 20, 20)
    np.testing.assert_array_equal(heat.ijk_to_ras, ijk_to_ras)


def test_bundle_with_its_own_network_code_needs_trusted_code(tmp_path):
    model = monai_unet()
    folder = write_bundle(tmp_path / "custom", model,
                          network_def={"_target_": "scripts.net.make_unet", "seed": 0})
    (folder / "scripts").mkdir()
    (folder / "scripts" / "__init__.py").write_text("")
    (folder / "scripts" / "net.py").write_text(
        "import pathlib\n"
        "pathlib.Path(__file__).with_name('ran').write_text('yes')\n"
        "from monai.networks.nets import UNet\n"
        f"def make_unet(seed):\n    return UNet(**{UNET_ARGS!r})\n"
    )
    with pytest.raises(UnsafeModelError, match="scripts.net.make_unet.*--trust-code"):
        load_model(folder)
    assert not (folder / "scripts" / "ran").exists()
    _assert_explains_like(load_model(folder, trust_code=True).module, model)


def test_code_to_trust_tells_the_panel_when_to_ask(tmp_path):
    from SegHiResCAMLib.models.loading import code_to_trust

    plain = write_bundle(tmp_path / "plain", monai_unet())
    assert code_to_trust(plain) is None
    expression = write_bundle(tmp_path / "expr", monai_unet(),
                              network_def={"_target_": "UNet", **UNET_ARGS, "channels": "$[4, 8, 16]"})
    assert "Python expression" in code_to_trust(expression)
    custom = write_bundle(tmp_path / "custom", monai_unet(), network_def={"_target_": "scripts.net.make"})
    assert "scripts.net.make" in code_to_trust(custom)
    builder = tmp_path / "net.py"
    builder.write_text("def build_model(): ...\n")
    assert "Python code" in code_to_trust(builder)
    assert code_to_trust(tmp_path / "expr" / "models" / "model.pt") is None
