"""A Python file defining build_model() plus a state dict: trusted code only, and then like the original."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from SegHiResCAMLib import explain
from SegHiResCAMLib.errors import ModelError, UnsafeModelError
from SegHiResCAMLib.models.loading import load_model

from model_kinds import blob_image, scriptable_unet

BUILDER = textwrap.dedent(
    """
    import pathlib
    import sys

    pathlib.Path(__file__).with_suffix(".ran").write_text("the builder ran")
    sys.path.insert(0, {testing!r})
    from model_kinds import ScriptableUNet


    def build_model():
        return ScriptableUNet(dims=2, classes=3)
    """
)


def write_builder(folder, *, weights=True, card=True, source=BUILDER):
    path = folder / "my_net.py"
    path.write_text(source.format(testing=os.path.dirname(__file__)))
    if weights:
        torch.save(scriptable_unet(2).state_dict(), folder / "my_net.pth")
    if card:
        (folder / "my_net.json").write_text(json.dumps({"spatial_dims": 2, "class_names": ["bg", "a", "b"],
                                                        "layers": ["dec.1"]}))
    return path


def test_builder_is_refused_without_trust_and_its_code_never_runs(tmp_path):
    path = write_builder(tmp_path)
    with pytest.raises(UnsafeModelError, match="runs that code.*--trust-code"):
        load_model(path)
    assert not path.with_suffix(".ran").exists()


def test_trusted_builder_loads_and_explains_identically(tmp_path):
    path = write_builder(tmp_path)
    loaded = load_model(path, trust_code=True)
    assert loaded.kind == "python" and path.with_suffix(".ran").exists()
    assert loaded.card.spatial_dims == 2 and loaded.card.default_layer == "dec.1"
    model = scriptable_unet(2)
    image = blob_image((16, 16), seed=7)
    expected = explain(model, image, layer="dec.1", target_class=1, device="cpu")
    got = explain(loaded.module, image, layer="dec.1", target_class=1, device="cpu")
    assert expected.max() > 0
    # exact: the builder makes the same module class with the same weights, so the same kernels run
    np.testing.assert_array_equal(got, expected)


def test_builder_without_weights_or_function_says_what_is_missing(tmp_path):
    path = write_builder(tmp_path, weights=False)
    with pytest.raises(ModelError, match="no weights found beside my_net.py.*my_net.pth"):
        load_model(path, trust_code=True)
    other = tmp_path / "other"
    other.mkdir()
    path = write_builder(other, source="VALUE = 1\n")
    with pytest.raises(ModelError, match="no build_model"):
        load_model(path, trust_code=True)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "SegHiResCAMLib.cli", *args], capture_output=True, text=True,
                          timeout=120)


@pytest.mark.process
def test_command_line_asks_for_trust_code_before_running_a_builder(tmp_path):
    path = write_builder(tmp_path)
    refused = _cli("layers", "--model", str(path), "--size", "16")
    assert refused.returncode == 1 and "--trust-code" in refused.stderr
    assert not path.with_suffix(".ran").exists()
    allowed = _cli("layers", "--model", str(path), "--size", "16", "--trust-code")
    assert allowed.returncode == 0, allowed.stderr
    assert "dec.1.conv" in allowed.stdout
