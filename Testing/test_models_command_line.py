"""The command line explains every kind of model and writes the map on the image's own grid."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from SegHiResCAMLib.cli import main
from SegHiResCAMLib.io.images import read_image, write_image
from SegHiResCAMLib.volume import Volume

from model_kinds import blob_image, scriptable_unet
from tolerances import geometry_atol


def oblique_image(path) -> Volume:
    """A 16 x 20 x 24 CT-like volume with anisotropic spacing and axes pointing P, S, L."""
    ijk_to_ras = np.eye(4)
    ijk_to_ras[:3, :3] = np.array([[0.0, 0.0, -1.0], [-1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]) * [1.2, 1.0, 2.0]
    ijk_to_ras[:3, 3] = [30.0, -10.0, 5.0]
    array = np.zeros((16, 20, 24), np.float32)
    array[2:14, 2:18, 2:22] = blob_image((12, 16, 20), seed=8)[0] * 300.0
    volume = Volume(array, ijk_to_ras)
    write_image(volume, path)
    return read_image(path)


def torchscript_model(folder):
    path = folder / "net.ts"
    torch.jit.save(torch.jit.script(scriptable_unet(3)), str(path))
    (folder / "net.json").write_text(json.dumps({"class_names": ["bg", "a", "b"], "layers": ["dec.1"],
                                                 "divisible_by": 4, "intensity": {"scheme": "zscore"}}))
    return path, []


def monai_bundle(folder):
    pytest.importorskip("monai")
    from model_kinds import monai_unet, write_bundle

    bundle = write_bundle(folder / "bundle", monai_unet())
    (bundle / "model.json").write_text(json.dumps({"layers": ["model.1.submodule.2"]}))
    return bundle, []


def nnunet_folder(folder):
    pytest.importorskip("dynamic_network_architectures")
    from model_kinds import nnunet_network, write_nnunet_folder

    return write_nnunet_folder(folder, nnunet_network()), []


def python_builder(folder):
    from test_models_builder import write_builder

    path = write_builder(folder)
    (folder / "my_net.json").write_text(json.dumps({"spatial_dims": 2, "class_names": ["bg", "a", "b"],
                                                    "layers": ["dec.1"], "divisible_by": 4}))
    return path, ["--trust-code"]


@pytest.mark.parametrize("make", [torchscript_model, monai_bundle, nnunet_folder, python_builder])
def test_explain_writes_a_heatmap_on_the_images_grid(tmp_path, make, capsys):
    image = oblique_image(tmp_path / "image.nrrd")
    model, extra = make(tmp_path)
    out = tmp_path / "heat.nrrd"
    status = main(["explain", "--image", str(tmp_path / "image.nrrd"), "--model", str(model), "--class", "1",
                   "--out", str(out), "--device", "cpu", *extra])
    assert status == 0, capsys.readouterr().err
    heat = read_image(out)
    assert heat.array.shape == image.array.shape
    np.testing.assert_allclose(heat.ijk_to_ras, image.ijk_to_ras, rtol=0, atol=geometry_atol(image.ijk_to_ras))  # NRRD
    assert heat.array.min() >= 0 and heat.array.max() == 1.0  # exact: the maximum divided by itself
