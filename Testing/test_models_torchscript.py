"""TorchScript models: activations captured without hooks, identical to the eager module's."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from SegHiResCAMLib import explain
from SegHiResCAMLib.errors import LayerError
from SegHiResCAMLib.models.loading import load_model
from SegHiResCAMLib.models.torchscript import ScriptedModel

from model_kinds import blob_image, hooked, scriptable_unet
from owner_nets import InplaceAfterLayers, SharedActivationNet, blob, float32_tolerance
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
    return _saved(model, how, example, folder, f"model_{dims}d")


def _saved(model, how: str, example: torch.Tensor, folder, name: str) -> str:
    """``model`` scripted or traced (on ``example``) and saved as ``<name>_<how>.ts`` in ``folder``."""
    exported = torch.jit.script(model) if how == "script" else torch.jit.trace(model, example)
    path = folder / f"{name}_{how}.ts"
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


def test_layer_names_are_submodule_paths_and_the_uncapturable_ones_say_why(tmp_path):
    loaded = load_model(_export(scriptable_unet(3), 3, "script", tmp_path))
    names = dict(loaded.module.layer_names())
    assert names["dec.1.conv.conv"] == "Conv3d" and names["mid"] == "Block" and names["head"] == "Conv3d"
    problems = {name: why for name, (why, _) in loaded.module.layer_problems().items()}
    assert problems == {"enc": "it is never called by the model's forward",  # a ModuleList is never called
                        "dec": "it is never called by the model's forward",
                        "pool": "it runs 2 times in one forward pass (called from the model's forward), so its "
                                "output is ambiguous"}


def test_ambiguous_and_unknown_layers_are_refused_with_the_reason(tmp_path):
    loaded = load_model(_export(scriptable_unet(2), 2, "trace", tmp_path))
    x = torch.zeros(1, 1, 16, 16)
    with pytest.raises(LayerError, match="'pool' cannot be explained: it runs 2 times"):
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


# ----------------------------------------------------------------------------- in-place operations after a layer

INPLACE_LAYERS = ["stem", "body", "act", "mix"]


def _exported(model, how: str, example: torch.Tensor, folder, name: str):
    return load_model(_saved(model, how, example, folder, name))


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("how", ["script", "trace"])
def test_captured_activation_is_the_layers_output_though_in_place_operations_follow(tmp_path, dims, how):
    torch.manual_seed(dims)
    model = InplaceAfterLayers(dims).eval()
    x = torch.from_numpy(blob(SHAPES[dims], seed=5))[None]
    loaded = _exported(model, how, x, tmp_path, f"inplace{dims}d")
    # The independent reference: the same weights in float64, with no in-place operation anywhere.
    reference_out, reference = copy.deepcopy(model).double().reference(x.double())
    fan_in = 4 * 3 ** dims
    for _ in range(2):  # the profiling executor may change the graph after the first run
        output, acts = loaded.module.forward_capturing(x, INPLACE_LAYERS)
        for name, got in zip(INPLACE_LAYERS, acts):
            want = reference[name]
            np.testing.assert_allclose(got.detach().double().numpy(), want.detach().numpy(), rtol=0,
                                       atol=float(want.abs().max()) * float32_tolerance(3 * fan_in), err_msg=name)
        np.testing.assert_allclose(output.detach().double().numpy(), reference_out.detach().numpy(), rtol=0,
                                   atol=float(reference_out.abs().max()) * float32_tolerance(4 * fan_in))
        # gradients flow through the copies that the graph edit inserted
        grads = torch.autograd.grad(output[:, 1].sum(), acts)
        want_grads = torch.autograd.grad(reference_out[:, 1].sum(), [reference[n] for n in INPLACE_LAYERS],
                                         retain_graph=True)
        for name, got, want in zip(INPLACE_LAYERS, grads, want_grads):
            np.testing.assert_allclose(got.double().numpy(), want.numpy(), rtol=0,
                                       atol=float(want.abs().max()) * float32_tolerance(3 * fan_in), err_msg=name)


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("how", ["script", "trace"])
def test_every_method_maps_a_torchscript_model_with_in_place_operations_like_the_eager_module(tmp_path, dims, how):
    from SegHiResCAMLib import METHODS

    torch.manual_seed(10 + dims)
    model = InplaceAfterLayers(dims).eval()
    image = blob(SHAPES[dims], seed=6)
    loaded = _exported(model, how, torch.from_numpy(image)[None], tmp_path, f"maps{dims}d")
    voxels = int(np.prod(SHAPES[dims]))
    tolerance = float32_tolerance(4 * 4 * 3 ** dims, 4, voxels)  # conv fan-ins, channel sum, spatial means
    roi = np.zeros(SHAPES[dims], bool)
    roi[(slice(2, 6),) * dims] = True
    for layer in ("body", "act", "mix"):
        for method in METHODS:
            options = dict(layer=layer, target_class=1, roi=roi, method=method, device="cpu")
            expected = explain(model, image, **options)
            got = explain(loaded.module, image, **options)
            assert expected.max() == 1.0, (layer, method)
            np.testing.assert_allclose(got, expected, rtol=0, atol=tolerance, err_msg=f"{layer} {method}")


# ----------------------------------------------------------------------------- one module called from several places

def test_a_module_that_a_traced_model_passes_into_its_blocks_is_refused_naming_its_calls(tmp_path):
    model = SharedActivationNet(2).eval()
    image = blob(SHAPES[2], seed=7)
    with pytest.raises(LayerError, match="runs more than once"):  # what the hooks say on the eager module
        explain(model, image, layer="act", target_class=1, device="cpu")
    # The tracer hands one path's module to every block: that path runs three times.
    loaded = _exported(model, "trace", torch.from_numpy(image)[None], tmp_path, "shared")
    with pytest.raises(LayerError, match=r"layer 'blocks.2.act' cannot be explained: it runs 3 times in one forward "
                                         r"pass \(called from blocks.0, blocks.1, blocks.2\), so its output is "
                                         r"ambiguous; choose a module that is used once"):
        explain(loaded.module, image, layer="blocks.2.act", target_class=1, device="cpu")
    for name in ("act", "blocks.0.act"):
        with pytest.raises(LayerError, match=rf"layer '{name}' cannot be explained: it is never called"):
            explain(loaded.module, image, layer=name, target_class=1, device="cpu")
    # each block's own convolution runs once: explained as the eager module explains it
    # (class 0 is what this net predicts; a class it never predicts would compare two all-zero maps)
    expected = explain(model, image, layer="blocks.1.conv", target_class=0, device="cpu")
    assert expected.max() == 1.0
    got = explain(loaded.module, image, layer="blocks.1.conv", target_class=0, device="cpu")
    np.testing.assert_allclose(got, expected, rtol=0, atol=float32_tolerance(4 * 9 * 4, 4))


def test_a_scripted_model_gives_each_path_of_a_shared_module_its_own_call(tmp_path):
    model = SharedActivationNet(2).eval()
    x = torch.from_numpy(blob(SHAPES[2], seed=7))[None]
    loaded = _exported(model, "script", x, tmp_path, "shared")
    calls = []
    handle = model.act.register_forward_hook(lambda module, inputs, output: calls.append(output.detach().clone()))
    try:
        model(x)
    finally:
        handle.remove()
    _, (second,) = loaded.module.forward_capturing(x, ["blocks.1.act"])
    torch.testing.assert_close(second, calls[1], rtol=0, atol=float32_tolerance(4 * 9 * 2))
    assert loaded.module.layer_problems()["act"][0] == "it is never called by the model's forward"


def test_layer_list_of_a_traced_model_that_passes_one_module_into_its_blocks_marks_the_unusable_ones(tmp_path):
    from SegHiResCAMLib import list_layers

    model = SharedActivationNet(3).eval()
    loaded = _exported(model, "trace", torch.zeros(1, 1, 8, 8, 8), tmp_path, "shared3d")
    infos = {info.name: info for info in list_layers(loaded.module, (1, 1, 8, 8, 8))}
    assert set(infos) == {name for name, _ in loaded.module.scripted.named_modules() if name}
    eager = {info.name: info for info in list_layers(model, (1, 1, 8, 8, 8))}
    for name in ("stem", "blocks.0", "blocks.0.conv", "blocks.2", "blocks.2.conv", "head"):
        assert infos[name].unusable is None and infos[name].output_shape == eager[name].output_shape
    assert infos["blocks.2.act"].unusable == ("it runs 3 times in one forward pass (called from blocks.0, blocks.1, "
                                              "blocks.2), so its output is ambiguous")
    for name in ("act", "blocks.0.act", "blocks.1.act", "blocks"):
        assert infos[name].unusable == "it is never called by the model's forward" and infos[name].output_shape is None
    assert eager["act"].unusable == "it runs 3 times in one forward pass, so its output is ambiguous"
    assert eager["blocks"].unusable == "it is not used when the model runs"


def test_layers_command_lists_every_layer_and_says_why_some_cannot_be_explained(tmp_path, capsys):
    from SegHiResCAMLib.cli import main

    model = SharedActivationNet(3).eval()
    path = tmp_path / "shared.ts"
    torch.jit.save(torch.jit.trace(model, torch.zeros(1, 1, 8, 8, 8)), str(path))
    assert main(["layers", "--model", str(path), "--size", "8"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if not line.startswith("#")}
    assert "1x4x8x8x8" in lines["blocks.1.conv"] and "cannot be explained" not in lines["blocks.1.conv"]
    assert "(cannot be explained: it runs 3 times in one forward pass" in lines["blocks.2.act"]


# ----------------------------------------------------------------------------- TorchScript modules as users hold them

@pytest.mark.parametrize("how", ["script", "trace"])
def test_a_module_from_torch_jit_load_is_explained_like_the_eager_one(tmp_path, how):
    from SegHiResCAMLib import explain_detailed, list_layers

    model = scriptable_unet(3).double()
    path = _export(model, 3, how, tmp_path)
    held = torch.jit.load(path)
    image = _image(SHAPES[3], seed=8).numpy()
    expected = explain(model, image, layer="mid", target_class=1, device="cpu")
    assert expected.max() == 1.0
    result = explain_detailed(held, image, layer="mid", target_class=1, device="cpu")
    np.testing.assert_allclose(result.heatmap, expected, **float32_of_reordered_float64(expected))
    assert result.warnings == ()
    shapes = {info.name: info.output_shape for info in list_layers(held, (1, 1, 8, 8, 8))}
    assert shapes["mid"] == (1, 16, 2, 2, 2)
    assert not held.training and not any(m.training for m in held.modules())
