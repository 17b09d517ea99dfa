"""TorchScript models: activations captured without hooks, identical to the eager module's."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from SegHiResCAMLib import explain
from SegHiResCAMLib.errors import LayerError
from SegHiResCAMLib.models.loading import load_model
from SegHiResCAMLib.models.torchscript import ScriptedModel

from model_kinds import blob_image, hooked, scriptable_unet
from tolerances import float32_of_reordered_float64, reordered_float64

# The eager and TorchScript runs of one network are compared in float64: TorchScript's executor may run
# its graph (and the derivative of it) through other kernels or in another order than eager mode, so
# the two agree to float64 reordering (tolerances.reordered_float64), and explained maps, returned in
# float32, to one rounding more.
SHAPES = {2: (16, 16), 3: (8, 8, 8)}
# nested names in any order: "dec.1.conv.conv" comes before "dec.1" and "dec.1.conv", which contain it
LAYERS = ["dec.1.conv.conv", "mid", "dec.0", "head", "enc.1.act", "dec.1.up", "dec.1", "dec.1.conv"]


def _image(shape, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(blob_image(shape, seed=seed)).double()


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    torch.testing.assert_close(got, want, rtol=0, atol=reordered_float64(want.abs().max()))


def _export(model, dims: int, how: str, folder) -> str:
    example = _image(SHAPES[dims]).to(next(model.parameters()).dtype)[None]
    exported = torch.jit.script(model) if how == "script" else torch.jit.trace(model, example)
    path = folder / f"model_{how}_{dims}d.ts"
    torch.jit.save(exported, str(path))
    return str(path)


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("how", ["script", "trace"])
def test_captured_activations_and_gradients_equal_eager_hooks(tmp_path, dims, how):
    model = scriptable_unet(dims).double()
    loaded = load_model(_export(model, dims, how, tmp_path))
    assert loaded.kind == "torchscript" and isinstance(loaded.module, ScriptedModel)
    x = _image(SHAPES[dims], seed=1)[None]
    reference, ref_acts = hooked(model, x, LAYERS)
    for _ in range(3):  # the profiling executor optimises after the first runs: results must not change
        output, acts = loaded.module.forward_capturing(x, LAYERS)
        _close(output, reference)
        for got, want in zip(acts, ref_acts):
            _close(got, want)
        mask = torch.zeros_like(reference[:, 1])
        mask[..., 2:6, 3:7] = 1.0
        grads = torch.autograd.grad((output[:, 1] * mask).sum(), acts)
        ref_grads = torch.autograd.grad((reference[:, 1] * mask).sum(), ref_acts, retain_graph=True)
        for got, want in zip(grads, ref_grads):
            _close(got, want)


@pytest.mark.parametrize("how", ["script", "trace"])
def test_plain_forward_returns_the_models_output(tmp_path, how):
    model = scriptable_unet(2).double()
    loaded = load_model(_export(model, 2, how, tmp_path))
    x = _image((16, 16), seed=2)[None]
    _close(loaded.module(x), model(x))


def test_layer_names_are_submodule_paths_that_can_be_captured(tmp_path):
    loaded = load_model(_export(scriptable_unet(3), 3, "script", tmp_path))
    names = dict(loaded.module.layer_names())
    assert names["dec.1.conv.conv"] == "Conv3d" and names["mid"] == "Block" and names["head"] == "Conv3d"
    assert "enc" not in names  # a ModuleList is never called
    assert "pool" not in names  # called twice: its output is ambiguous


def test_ambiguous_and_unknown_layers_are_refused_with_the_reason(tmp_path):
    loaded = load_model(_export(scriptable_unet(2), 2, "trace", tmp_path))
    x = torch.zeros(1, 1, 16, 16)
    with pytest.raises(LayerError, match="called 2 times"):
        loaded.module.forward_capturing(x, ["pool"])
    with pytest.raises(LayerError, match="does not exist.*nearest names: .*dec"):
        loaded.module.forward_capturing(x, ["decoder.9"])


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("how", ["script", "trace"])
def test_loaded_torchscript_explains_identically_to_the_eager_module(tmp_path, dims, how):
    model = scriptable_unet(dims).double()
    loaded = load_model(_export(model, dims, how, tmp_path))
    image = _image(SHAPES[dims], seed=3).numpy()
    roi = None  # the model's own prediction for class 1, found through each module's own output
    for method in ("seg-hires-grad-cam", "seg-grad-cam"):
        for layer in ("dec.1.conv", "mid"):
            expected = explain(model, image, layer=layer, target_class=1, roi=roi, method=method, device="cpu")
            got = explain(loaded.module, image, layer=layer, target_class=1, roi=roi, method=method, device="cpu")
            assert np.abs(expected).max() > 0
            np.testing.assert_allclose(got, expected, **float32_of_reordered_float64(expected))


def test_list_layers_works_on_a_torchscript_model(tmp_path):
    from SegHiResCAMLib import list_layers

    loaded = load_model(_export(scriptable_unet(3), 3, "script", tmp_path))
    infos = {info.name: info for info in list_layers(loaded.module, (1, 1, 8, 8, 8))}
    assert tuple(infos["mid"].output_shape)[-4:] == (16, 2, 2, 2)
    assert tuple(infos["dec.1.conv"].output_shape)[-4:] == (4, 8, 8, 8)


def test_monai_unet_scripted_captures_nested_sequential_layers(tmp_path):
    nets = pytest.importorskip("monai.networks.nets")
    torch.manual_seed(0)
    model = nets.UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(4, 8, 16), strides=(2, 2),
                      num_res_units=1).eval().double()
    path = tmp_path / "model.ts"
    torch.jit.save(torch.jit.script(model), str(path))
    loaded = load_model(path)
    x = _image((16, 16, 16))[None]
    layers = ["model.1.submodule.2", "model.2"]
    reference, ref_acts = hooked(model, x, layers)
    output, acts = loaded.module.forward_capturing(x, layers)
    _close(output, reference)
    for got, want in zip(acts, ref_acts):
        _close(got, want)


@pytest.mark.parametrize("how", ["script", "trace"])
def test_a_scripted_model_with_frozen_parameters_is_explained_like_the_eager_one(tmp_path, how):
    eager = scriptable_unet(3).double()
    for parameter in eager.parameters():
        parameter.requires_grad_(False)
    loaded = load_model(_export(eager, 3, how, tmp_path))
    assert not any(p.requires_grad for p in loaded.module.parameters())
    image = _image(SHAPES[3], seed=4).numpy()
    expected = explain(eager, image, layer="mid", target_class=1, device="cpu")
    got = explain(loaded.module, image, layer="mid", target_class=1, device="cpu")
    assert expected.max() > 0
    np.testing.assert_allclose(got, expected, **float32_of_reordered_float64(expected))
