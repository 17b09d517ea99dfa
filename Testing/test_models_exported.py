"""Programs saved with torch.export (.pt2): explained like their eager modules, from every door.

Oracles: the eager module the program was exported from, explained by the same engine (maps of
every method), and an out-of-place recomputation of the in-place network (activations and
gradients). Tolerances: the program runs the same ATen kernels as the eager module, on the same
device, in the same order, so maps normalised to 1 may differ only by a kernel's own choice of
summation order; 1e-5 is the issue's bound (the measured difference here is 0), and 1e-6 for raw
activations and gradients of order 1, as for TorchScript.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from engine_nets import LocalNet, TupleLayerNet, inplace_unet, unet
from model_kinds import blob_image
from tolerances import geometry_atol
from torch import nn

from SegHiResCAMLib import explain, explain_detailed, list_layers
from SegHiResCAMLib.cli import main
from SegHiResCAMLib.engine.capture import forward_with_activations
from SegHiResCAMLib.engine.explain import METHOD_NAMES
from SegHiResCAMLib.errors import InputError, LayerError, ModelError, UnsafeModelError
from SegHiResCAMLib.io.images import read_image, write_image
from SegHiResCAMLib.windows import SlidingWindow
from SegHiResCAMLib.models.card import ModelCard
from SegHiResCAMLib.models.exported import ExportedModel
from SegHiResCAMLib.models.exporting import export_model
from SegHiResCAMLib.models.loading import LoadedModel, code_to_trust, load_model
from SegHiResCAMLib.pipeline import explain_volume
from SegHiResCAMLib.volume import Volume

ATOL_MAP, ATOL_RAW = 1e-5, 1e-6
EXPORT_SHAPES = {2: (32, 32), 3: (16, 16, 16)}
OTHER_SHAPES = {2: (24, 40), 3: (8, 12, 16)}  # sizes the export never saw: dynamic shapes at work


@pytest.fixture(scope="module", params=[2, 3], ids=["2d", "3d"])
def exported_unet(request, tmp_path_factory):
    """(dims, eager U-Net with batch norm and skips, its .pt2 loaded through load_model)."""
    dims = request.param
    eager = unet(dims)
    card = ModelCard(name="unet", spatial_dims=dims, class_names=("bg", "a", "b"), layers=("decoder.0",))
    path = export_model(eager, torch.zeros(1, 1, *EXPORT_SHAPES[dims]),
                        tmp_path_factory.mktemp(f"unet{dims}") / "unet.pt2", card=card)
    return dims, eager, load_model(path)


@pytest.fixture(scope="module")
def small_program(tmp_path_factory) -> Path:
    """A small .pt2 with dynamic sizes (so it holds symbolic size expressions) to tamper with."""
    return export_model(LocalNet(2).eval(), torch.zeros(1, 1, 12, 12),
                        tmp_path_factory.mktemp("small") / "small.pt2")


def predicted_class(model: nn.Module, image: np.ndarray, dims: int | None = None) -> int:
    """The class the (untrained) model predicts most often on ``image``: its region is never empty."""
    x = torch.from_numpy(image)
    x = x[None] if dims is None else x.movedim(1, 0)  # 2D model over a volume: slices as the batch
    with torch.no_grad():
        return int(torch.bincount(model(x).argmax(1).flatten()).argmax())


# ----------------------------------------------------------------------------- explaining

@pytest.mark.parametrize("layer", ["bottleneck", "decoder.1.conv.4"])
def test_every_method_gives_the_eager_modules_map_on_sizes_the_export_never_saw(exported_unet, layer):
    dims, eager, loaded = exported_unet
    assert loaded.kind == "exported-program" and isinstance(loaded.module, ExportedModel)
    image = blob_image(OTHER_SHAPES[dims], seed=3)
    target = predicted_class(eager, image)
    expected = explain_detailed(eager, image, layer=layer, target_class=target, methods=METHOD_NAMES, device="cpu")
    got = explain_detailed(loaded.module, image, layer=layer, target_class=target, methods=METHOD_NAMES, device="cpu")
    for method in METHOD_NAMES:
        assert expected.maps[method].max() > 0, method
        np.testing.assert_allclose(got.maps[method], expected.maps[method], rtol=0, atol=ATOL_MAP, err_msg=method)


def test_layer_lists_regions_and_targets_give_the_eager_maps(exported_unet):
    dims, eager, loaded = exported_unet
    image = blob_image(OTHER_SHAPES[dims], seed=4)
    roi = np.zeros(OTHER_SHAPES[dims], bool)
    roi[(slice(2, 6),) * dims] = True
    target = predicted_class(eager, image)
    for options in ({"layer": ["decoder.0", "decoder.1"]}, {"layer": "decoder.0", "roi": roi},
                    {"layer": "decoder.1", "target": "probability-threshold", "threshold": 0.3}):
        expected = explain(eager, image, target_class=target, device="cpu", **options)
        got = explain(loaded.module, image, target_class=target, device="cpu", **options)
        assert expected.max() > 0
        np.testing.assert_allclose(got, expected, rtol=0, atol=ATOL_MAP)


def test_a_2d_program_explains_a_volume_slice_by_slice_like_the_eager_module(exported_unet):
    dims, eager, loaded = exported_unet
    if dims != 2:
        pytest.skip("2D models only")
    for axis, image in ((0, blob_image((5, 24, 40), seed=5)), (2, blob_image((24, 40, 6), seed=6))):
        target = predicted_class(eager, np.moveaxis(image, 1 + axis, 1), dims=2)
        expected = explain(eager, image, layer="decoder.0", target_class=target, spatial_dims=2, slice_axis=axis,
                           device="cpu")
        got = explain(loaded.module, image, layer="decoder.0", target_class=target, spatial_dims=2, slice_axis=axis,
                      device="cpu")
        assert expected.max() > 0
        np.testing.assert_allclose(got, expected, rtol=0, atol=ATOL_MAP)


def test_a_module_called_twice_is_refused_with_the_eager_models_message(exported_unet):
    dims, eager, loaded = exported_unet
    image = blob_image(EXPORT_SHAPES[dims])
    with pytest.raises(LayerError) as eager_error:
        explain(eager, image, layer="pool", target_class=1, device="cpu")
    with pytest.raises(LayerError) as exported_error:
        explain(loaded.module, image, layer="pool", target_class=1, device="cpu")
    assert "more than once" in str(exported_error.value)
    assert str(exported_error.value) == str(eager_error.value)


class _UsesBoth(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pair, self.head = TupleLayerNet.Pair(), nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.head(torch.cat(self.pair(x), 1))


def test_a_module_returning_several_tensors_is_refused_with_the_eager_models_message():
    eager = _UsesBoth().eval()
    module = ExportedModel(torch.export.export(eager, (torch.zeros(1, 1, 8, 8),)))
    image = blob_image((8, 8))
    with pytest.raises(LayerError) as eager_error:
        explain(eager, image, layer="pair", target_class=1, device="cpu")
    with pytest.raises(LayerError) as exported_error:
        explain(module, image, layer="pair", target_class=1, device="cpu")
    assert str(exported_error.value) == str(eager_error.value) and "tuple" in str(eager_error.value)
    expected = explain(eager, image, layer="pair.conv", target_class=1, device="cpu", relu=False, normalize=False)
    assert np.abs(expected).max() > 0
    np.testing.assert_allclose(explain(module, image, layer="pair.conv", target_class=1, device="cpu", relu=False,
                                       normalize=False), expected, rtol=0, atol=ATOL_RAW * max(1.0, np.abs(expected).max()))


def test_layers_are_the_eager_modules_with_their_types_and_output_shapes(exported_unet):
    dims, eager, loaded = exported_unet
    shape = (1, 1, *OTHER_SHAPES[dims])
    eager_layers = list_layers(eager, shape)
    exported_layers = list_layers(loaded.module, shape)
    assert [info.name for info in exported_layers] == [info.name for info in eager_layers]
    called = {info.name: (info.type, info.output_shape) for info in eager_layers if info.output_shape}
    assert {info.name: (info.type, info.output_shape) for info in exported_layers if info.output_shape} == called
    assert called["decoder.1.conv.1"][0] == f"BatchNorm{dims}d" and called["decoder.0"][0] == "UpBlock"


def test_parameters_and_buffers_keep_their_names_and_values(exported_unet):
    dims, eager, loaded = exported_unet
    ours = dict(loaded.module.state_dict())
    theirs = eager.state_dict()
    assert sorted(ours) == sorted(theirs)
    for name, value in theirs.items():
        torch.testing.assert_close(ours[name], value, rtol=0, atol=0)


def test_the_card_beside_the_program_and_what_the_program_says_make_the_model_card(exported_unet):
    dims, _, loaded = exported_unet
    assert not loaded.module.made_functional  # conv, batch norm in eval, relu, cat: pure as exported
    card = loaded.card
    assert card.class_names == ("bg", "a", "b") and card.default_layer == "decoder.0"
    # the card beside says divisible_by=1, the program's guards say 4 (two poolings): the program wins
    assert card.spatial_dims == dims and card.in_channels == 1 and card.divisible_by == 4
    assert code_to_trust(loaded.source) is None


def test_the_program_is_left_as_found(exported_unet):
    dims, _, loaded = exported_unet
    module = loaded.module
    flags = {name: p.requires_grad for name, p in module.named_parameters()}
    image = blob_image(EXPORT_SHAPES[dims])
    target = predicted_class(module, image)
    explain(module, image, layer="bottleneck", target_class=target, device="cpu", method="kernel-weighted-contribution")
    explain(module, image, layer="bottleneck", target_class=target, device="cpu")
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in module.modules())
    assert all(p.grad is None for p in module.parameters())
    assert flags == {name: p.requires_grad for name, p in module.named_parameters()}
    assert not module.training


# ----------------------------------------------------------------------------- in place, batch norm

@pytest.fixture(scope="module")
def exported_inplace(tmp_path_factory):
    eager = inplace_unet(2)
    path = export_model(eager, torch.zeros(1, 1, 16, 16), tmp_path_factory.mktemp("inplace") / "inplace.pt2")
    return eager, load_model(path).module


def out_of_place(model, x: torch.Tensor, layer: str) -> tuple[torch.Tensor, torch.Tensor]:
    """InplaceUNet's forward written out of place; the layer's output is a leaf. (activation, output)."""
    functional = torch.nn.functional
    values = {}

    def at(name: str, value: torch.Tensor) -> torch.Tensor:
        if name == layer:
            value = value.detach().requires_grad_()
        values[name] = value
        return value

    skip = at("enc", functional.relu(at("enc.1", model.enc[1](model.enc[0](x)))))
    up = at("up", model.up(model.mid(model.pool(skip))))
    dec = at("dec", model.dec(up + skip))
    output = model.head(at("act", functional.leaky_relu(dec, 0.1)))
    return values[layer], output


@pytest.mark.parametrize("layer", ["enc.1", "enc", "up", "dec", "act"])
def test_in_place_operations_after_the_layer_change_neither_its_activation_nor_its_gradient(exported_inplace, layer):
    eager, module = exported_inplace
    # relu_, add_ and leaky_relu_ write only to values the graph computed: it runs as exported, and
    # the engine's hook hands on a clone, as in the Python model
    assert not module.made_functional
    x = torch.from_numpy(blob_image((16, 24), seed=7))[None]
    target = predicted_class(eager, x[0].numpy())
    want_activation, want_output = out_of_place(eager, x, layer)
    output, (activation,) = forward_with_activations(module, x, [layer])
    torch.testing.assert_close(output, want_output, rtol=0, atol=ATOL_RAW)
    torch.testing.assert_close(activation, want_activation, rtol=0, atol=ATOL_RAW)
    roi = torch.zeros_like(output[0, target])
    roi[3:9, 5:15] = 1.0
    (gradient,) = torch.autograd.grad((output[:, target] * roi).sum(), [activation])
    (want_gradient,) = torch.autograd.grad((want_output[:, target] * roi).sum(), [want_activation])
    assert want_gradient.abs().max() > 0
    torch.testing.assert_close(gradient, want_gradient, rtol=0, atol=ATOL_RAW)
    # Every layer here is at full resolution: the signed Seg-HiRes-Grad CAM is sum_k G_k A_k itself.
    # (The eager engine cannot explain 'act': the model drops its return value and the head reads the
    # overwritten y, so the hook's clone leads nowhere; the trace records that the head reads act's result.)
    want_map = (want_gradient * want_activation).sum(1)[0].detach()
    got_map = explain(module, x[0].numpy(), layer=layer, target_class=target, roi=roi.numpy(), device="cpu",
                      relu=False, normalize=False)
    np.testing.assert_allclose(got_map, want_map.numpy(), rtol=0,
                               atol=ATOL_RAW * max(1.0, float(want_map.abs().max())))


class _ClampsItsInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.head = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 2, 1)

    def forward(self, x):
        x.clamp_(-0.5, 0.5)  # writes to the image itself
        return self.head(torch.relu(self.conv(x)))


def test_a_program_that_writes_to_its_input_is_made_functional_and_leaves_the_image_as_given():
    torch.manual_seed(0)
    eager = _ClampsItsInput().eval()
    module = ExportedModel(torch.export.export(eager, (torch.zeros(1, 1, 8, 8),)))
    assert module.made_functional
    x = torch.from_numpy(blob_image((8, 8), seed=14))[None]
    given = x.clone()
    with torch.no_grad():
        torch.testing.assert_close(module(x), eager(x.clone()), rtol=0, atol=ATOL_RAW)
    torch.testing.assert_close(x, given, rtol=0, atol=0)
    expected = explain(eager, x[0].numpy().copy(), layer="conv", target_class=1, device="cpu", relu=False,
                       normalize=False)
    assert np.abs(expected).max() > 0
    np.testing.assert_allclose(explain(module, x[0].numpy(), layer="conv", target_class=1, device="cpu", relu=False,
                                       normalize=False), expected, rtol=0, atol=ATOL_RAW * np.abs(expected).max())


def test_batch_norm_of_a_program_exported_in_eval_mode_is_the_eager_eval_forward(exported_unet):
    dims, eager, loaded = exported_unet
    x = torch.from_numpy(blob_image(OTHER_SHAPES[dims], seed=8))[None]
    with torch.no_grad():
        eval_output = eager(x)
        batch_statistics = unet(dims).train()(x)  # a fresh copy: a training forward changes running stats
        got = loaded.module(x)
    assert (batch_statistics - eval_output).abs().max() > 0.1  # the running statistics matter here
    torch.testing.assert_close(got, eval_output, rtol=0, atol=ATOL_RAW)


def test_programs_exported_in_training_mode_are_refused_with_what_to_do(tmp_path):
    x = torch.from_numpy(blob_image((16, 16), seed=9))[None].repeat(2, 1, 1, 1)
    batch_norm = torch.export.export(unet(2).train(), (x,))
    # What torch itself would run: the batch's own statistics, and the running averages overwritten.
    before = batch_norm.state_dict["encoder.0.1.running_mean"].clone()
    with torch.no_grad():
        assert (batch_norm.module()(x) - unet(2).eval()(x)).abs().max() > 0.1
    assert (batch_norm.state_dict["encoder.0.1.running_mean"] - before).abs().max() > 0
    torch.export.save(batch_norm, str(tmp_path / "bn_train.pt2"))
    with pytest.raises(ModelError, match=r"updates its buffers.*training mode; call model.eval\(\)"):
        load_model(tmp_path / "bn_train.pt2")

    torch.manual_seed(0)
    dropout = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Dropout(0.5), nn.Conv2d(4, 2, 1))
    torch.export.save(torch.export.export(dropout.train(), (x,)), str(tmp_path / "dropout_train.pt2"))
    with pytest.raises(ModelError, match=r"draws random numbers.*training mode"):
        load_model(tmp_path / "dropout_train.pt2")
    torch.export.save(torch.export.export(dropout.eval(), (x,)), str(tmp_path / "dropout_eval.pt2"))
    with torch.no_grad():
        torch.testing.assert_close(load_model(tmp_path / "dropout_eval.pt2").module(x), dropout(x), rtol=0, atol=0)


class _MakesATensor(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)

    def forward(self, x):
        return self.conv(x) + torch.ones(1, 2, 1, 1, device=x.device)  # export records device='cpu'


def test_tensors_the_program_creates_follow_the_model_to_another_device():
    """No GPU here: the 'meta' device stands in for CUDA (torch.export's own module fails the same way)."""
    program = torch.export.export(_MakesATensor().eval(), (torch.zeros(1, 1, 8, 8),))
    module = ExportedModel(program)
    torch.testing.assert_close(module(torch.ones(1, 1, 8, 8)), program.module()(torch.ones(1, 1, 8, 8)), rtol=0, atol=0)
    x = torch.zeros(1, 1, 8, 8, device="meta")
    with pytest.raises(RuntimeError, match="not on the expected device"):
        program.module().to("meta")(x)
    assert module.to("meta")(x).device.type == "meta"


def test_an_nnunet_network_with_in_place_activations_and_modules_under_two_names_explains_like_eager(tmp_path):
    pytest.importorskip("dynamic_network_architectures")
    from model_kinds import nnunet_network

    eager = nnunet_network()  # LeakyReLU(inplace=True), instance norm, conv/norm also held in all_modules
    module = load_model(export_model(eager, torch.zeros(1, 1, 16, 16, 16), tmp_path / "nnunet.pt2")).module
    # torch.export records the name each module was called by (all_modules.0); the stand-ins are shared
    # as in the original model, so the names are the eager ones, except for the parameter-free
    # activation, whose two names nothing in the program ties together
    eager_names = [name for name, _ in eager.named_modules()]
    names = [name for name, _ in module.named_modules()]
    assert [n for n in names if n not in eager_names] == [n.replace("nonlin", "all_modules.2")
                                                          for n in eager_names if n.endswith("convs.0.nonlin")]
    image = blob_image((16, 16, 16), seed=13)
    target = predicted_class(eager, image)
    for layer in ("encoder.stages.1.0.convs.0.conv", "decoder.stages.0"):
        for method in ("seg-hires-grad-cam", "seg-grad-cam"):
            expected = explain(eager, image, layer=layer, target_class=target, method=method, device="cpu")
            assert expected.max() > 0
            np.testing.assert_allclose(explain(module, image, layer=layer, target_class=target, method=method,
                                               device="cpu"), expected, rtol=0, atol=ATOL_MAP)


# ----------------------------------------------------------------------------- static shapes

def test_a_static_program_explains_its_shape_and_refuses_others_naming_the_shape_it_needs(tmp_path):
    eager = unet(2)
    torch.export.save(torch.export.export(eager, (torch.zeros(1, 1, 24, 32),)), str(tmp_path / "static.pt2"))
    loaded = load_model(tmp_path / "static.pt2")
    module = loaded.module
    assert module.input_shape.fixed == (1, 1, 24, 32) and module.batch_limit == 1
    assert loaded.card.spatial_dims == 2 and loaded.card.name == "static"
    image = blob_image((24, 32), seed=10)
    target = predicted_class(eager, image)
    expected = explain(eager, image, layer="decoder.0", target_class=target, device="cpu")
    assert expected.max() > 0
    np.testing.assert_allclose(explain(module, image, layer="decoder.0", target_class=target, device="cpu"),
                               expected, rtol=0, atol=ATOL_MAP)
    with pytest.raises(InputError, match=r"1 x 1 x 24 x 40 .*it accepts 1 x 1 x 24 x 32"):
        explain(module, blob_image((24, 40)), layer="decoder.0", target_class=target, device="cpu",
                sliding_window=None)
    # "auto" (the default) runs a larger image by windows of exactly the program's shape, like the eager
    # module given that window
    wider = blob_image((24, 40), seed=12)
    by_windows = explain(eager, wider, layer="decoder.0", target_class=target, device="cpu",
                         sliding_window=SlidingWindow((24, 32)))
    assert by_windows.max() > 0
    np.testing.assert_allclose(explain(module, wider, layer="decoder.0", target_class=target, device="cpu"),
                               by_windows, rtol=0, atol=ATOL_MAP)
    assert loaded.card.patch_size == (24, 32)  # what it runs on: sliding windows of that size
    # layers are probed at the one shape the program takes, whatever size is asked for
    infos = {info.name: info.output_shape for info in list_layers(module, (1, 1, 64, 64))}
    assert infos["bottleneck"] == (1, 16, 6, 8) and infos["head"] == (1, 3, 24, 32)
    # a volume, slice by slice: the engine's slice batches respect the program's batch of one
    volume = blob_image((5, 24, 32), seed=11)
    target = predicted_class(eager, volume, dims=2)
    expected = explain(eager, volume, layer="bottleneck", target_class=target, spatial_dims=2, device="cpu")
    got = explain(module, volume, layer="bottleneck", target_class=target, spatial_dims=2, device="cpu")
    assert expected.max() > 0
    np.testing.assert_allclose(got, expected, rtol=0, atol=ATOL_MAP)


def test_a_static_3d_program_explains_a_larger_volume_by_windows_of_its_size_like_the_eager_module(tmp_path):
    from SegHiResCAMLib.engine.sliding_window import explain_windows
    from SegHiResCAMLib.windows import window_for_card

    eager = unet(3)
    torch.export.save(torch.export.export(eager, (torch.zeros(1, 1, 16, 16, 16),)), str(tmp_path / "patch.pt2"))
    loaded = load_model(tmp_path / "patch.pt2")
    window = window_for_card(loaded.card)
    assert window is not None and window.patch_size == (16, 16, 16)
    image = blob_image((24, 20, 28), seed=15)
    target = predicted_class(eager, image)
    options = {"layers": ["decoder.0"], "class_index": target, "window": window, "device": "cpu",
               "methods": ("seg-hires-grad-cam", "seg-grad-cam")}
    expected = explain_windows(eager, image, **options)
    got = explain_windows(loaded.module, image, **options)
    assert got.windows == expected.windows > 1
    for method, heat in expected.maps.items():
        assert heat.max() > 0
        np.testing.assert_allclose(got.maps[method], heat, rtol=0, atol=ATOL_MAP)


def test_guards_recorded_at_export_are_checked_before_the_program_runs(exported_unet):
    dims, _, loaded = exported_unet
    odd = (1, 1, *([18] * dims))  # 18 is no multiple of 4: the two poolings need one
    with pytest.raises(InputError, match=r"input\.size\(\)\[2\].*recorded when it was exported.*multiple of 4"):
        loaded.module(torch.zeros(odd))


# ----------------------------------------------------------------------------- safety

def _rewrite(source: Path, target: Path, edit) -> None:
    """Copy a .pt2 archive, passing each member (name inside the archive, bytes) through ``edit``."""
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w") as new:
        for info in old.infolist():
            new.writestr(info, edit(info.filename.split("/", 1)[1], old.read(info.filename)))


class _MakesAFolder:
    """Unpickling this makes the folder: a stand-in for any code a pickle can run."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return os.mkdir, (str(self.path),)


def _pickle_that_runs(path: Path) -> bytes:
    buffer = io.BytesIO()
    torch.save(_MakesAFolder(path), buffer)
    return buffer.getvalue()


def _python_that_runs(path: Path) -> str:
    return f"__import__('os').mkdir({str(path)!r})"


def _example_inputs(marker):
    return lambda name, data: _pickle_that_runs(marker) if name == "data/sample_inputs/model.pt" else data


def _size_expression(marker):
    def edit(name, data):
        if name != "models/model.json":
            return data
        text = data.decode()
        assert "Symbol('s" in text
        return text.replace("Symbol('s", f"({_python_that_runs(marker)} or Symbol)('s", 1).encode()

    return edit


def _shape_guard(marker):
    def edit(name, data):
        if name != "models/model.json":
            return data
        program = json.loads(data)
        program["guards_code"] = [*program.get("guards_code", []), f"{_python_that_runs(marker)} is None"]
        return json.dumps(program).encode()

    return edit


def _pickled_weight(marker):
    def edit(name, data):
        if name == "data/weights/model_weights_config.json":
            config = json.loads(data)
            first = next(iter(config["config"].values()))
            first["use_pickle"] = True
            return json.dumps(config).encode()
        if name == "data/weights/weight_0":
            return _pickle_that_runs(marker)
        return data

    return edit


@pytest.mark.parametrize("edit, why", [
    (_example_inputs, "example inputs that need full unpickling"),
    (_size_expression, "size expression that is not plain arithmetic"),
    (_shape_guard, "shape guard that is not plain size arithmetic"),
    (_pickled_weight, "pickled Python object"),
], ids=["example-inputs", "size-expression", "shape-guard", "pickled-weight"])
def test_archives_that_would_run_their_code_are_refused_before_torch_reads_them(small_program, tmp_path, edit, why):
    marker = tmp_path / "code-ran"
    evil = tmp_path / "evil.pt2"
    _rewrite(small_program, evil, edit(marker))
    # torch itself runs it (torch.export.load; the guard when run_decompositions builds module())
    with contextlib.suppress(Exception):
        torch.export.load(str(evil)).run_decompositions(decomp_table={})
    assert marker.exists(), "the tampered archive no longer reaches torch's code path; update this test"
    marker.rmdir()
    with pytest.raises(UnsafeModelError, match=why):
        load_model(evil)
    assert not marker.exists()


@pytest.mark.parametrize("text, safe", [
    ("Mul(Integer(4), FloorDiv(Symbol('s53', positive=True, integer=True), Integer(4)))", True),
    ("Max(Integer(1), Pow(Symbol('s0', integer=True), Integer(2)))", True),
    ("Add(Integer(-1), Float('1.5', precision=53))", True),
    ("Symbol('s0').__class__", False),                      # attribute access
    ("Mul('__import__(\"os\")')", False),                  # a string sympy would parse again
    ("Symbol('s0') + eval('1')", False),                    # operators and other calls
    ("Pow(Integer(10), Integer(1000000000000))", False),    # arithmetic that never ends
    ("Pow(Integer(2), Pow(Integer(2), Integer(64)))", False),
])
def test_size_expressions_pass_only_as_sympy_arithmetic(text, safe):
    from SegHiResCAMLib.models.exported_archive import is_safe_sympy_text

    assert is_safe_sympy_text(text) is safe


@pytest.mark.parametrize("guard, safe", [
    ("L['x'].size()[2] == (4*(L['x'].size()[2] // 4))", True),
    ("(max(1, L['x'].size()[3] // 2)*max(1, L['x'].size()[2] // 2)) != 1", True),
    ("(L['x'].size()[3] // 4) >= 1 and L['x'].stride()[0] >= 1 and L['x'].storage_offset() == 0", True),
    ("L['x'].size.__self__ is None", False),
    ("__import__('os').getcwd() is None", False),
    ("L['x'].numpy() is None", False),                      # tensor methods other than size/stride
    ("L['x'].size()[2] ** 10 ** 10 == 1", False),
])
def test_shape_guards_pass_only_as_size_arithmetic(guard, safe):
    from SegHiResCAMLib.models.exported_archive import parse_guard

    assert (parse_guard(guard) is not None) is safe


def test_archives_with_compiled_native_code_are_refused(small_program, tmp_path):
    native = tmp_path / "native.pt2"
    _rewrite(small_program, native, lambda name, data: data)
    with zipfile.ZipFile(native, "a") as archive:
        root = archive.namelist()[0].split("/", 1)[0]
        archive.writestr(f"{root}/data/aotinductor/model/model.so", b"\x7fELF")
    with pytest.raises(UnsafeModelError, match="compiled native code"):
        load_model(native)


def test_archives_with_files_outside_their_top_folder_are_refused(small_program, tmp_path):
    """torch.export.load falls back to the older layout (files at the root, read with pickle fallbacks)."""
    mixed = tmp_path / "mixed.pt2"
    _rewrite(small_program, mixed, lambda name, data: data)
    with zipfile.ZipFile(mixed, "a") as archive:
        archive.writestr("version", b"8.20")
        archive.writestr("serialized_state_dict.pt", _pickle_that_runs(tmp_path / "code-ran"))
    with pytest.raises(ModelError, match="one top folder"):
        load_model(mixed)
    assert not (tmp_path / "code-ran").exists()


def test_a_program_is_recognised_by_its_content_and_a_non_archive_named_pt2_is_refused(small_program, tmp_path):
    renamed = tmp_path / "model.pt"
    renamed.write_bytes(small_program.read_bytes())
    assert load_model(renamed).kind == "exported-program"
    (tmp_path / "notes.pt2").write_text("not a model")
    with pytest.raises(ModelError, match="not a torch.export archive"):
        load_model(tmp_path / "notes.pt2")


class _Branches(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(1, 2, 1), nn.Conv2d(1, 2, 3, padding=1)

    def forward(self, x):
        return torch.cond(x.sum() > 0, self.a, self.b, (x,))


class _TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 1)

    def forward(self, x, y):
        return self.conv(x) + y


@pytest.mark.parametrize("model, inputs, why", [
    (_Branches(), (torch.ones(1, 1, 4, 4),), "uses cond"),
    (_TwoInputs(), (torch.ones(1, 1, 4, 4), torch.ones(1, 2, 4, 4)), "takes 2 inputs"),
], ids=["control-flow", "two-inputs"])
def test_programs_the_engine_cannot_explain_are_refused_saying_why(tmp_path, model, inputs, why):
    torch.export.save(torch.export.export(model.eval(), inputs), str(tmp_path / "p.pt2"))
    with pytest.raises(ModelError, match=why):
        load_model(tmp_path / "p.pt2")


# ----------------------------------------------------------------------------- doors

def _volume(path: Path, shape=(16, 20, 24)) -> Volume:
    """An anisotropic, off-origin volume written to ``path`` and read back."""
    ijk_to_ras = np.diag([1.2, 0.9, 2.0, 1.0])
    ijk_to_ras[:3, 3] = [30.0, -10.0, 5.0]
    write_image(Volume(blob_image(shape, seed=12)[0] * 100.0, ijk_to_ras), path)
    return read_image(path)


def test_command_line_lists_and_explains_a_pt2_like_its_eager_module(exported_unet, tmp_path, capsys):
    dims, eager, loaded = exported_unet
    if dims != 3:
        pytest.skip("one command-line run is enough")
    volume = _volume(tmp_path / "image.nrrd")
    out = tmp_path / "heat.nrrd"
    code = main(["explain", "--image", str(tmp_path / "image.nrrd"), "--model", str(loaded.source), "--class", "a",
                 "--out", str(out), "--device", "cpu", "--method", "seg-grad-cam"])
    assert code == 0, capsys.readouterr().err
    eager_loaded = LoadedModel(module=eager, card=loaded.card, source=loaded.source, kind="state-dict")
    maps, _ = explain_volume(eager_loaded, volume, target_class=1, methods=("seg-grad-cam",), device="cpu")
    heat = read_image(out)
    np.testing.assert_allclose(heat.ijk_to_ras, volume.ijk_to_ras, rtol=0, atol=geometry_atol(volume.ijk_to_ras))  # NRRD
    assert maps["seg-grad-cam"].array.max() > 0
    np.testing.assert_allclose(heat.array, maps["seg-grad-cam"].array, rtol=0, atol=ATOL_MAP)


def test_command_line_lists_the_layers_of_a_pt2_with_types_and_shapes(small_program, capsys):
    assert main(["layers", "--model", str(small_program), "--size", "10"]) == 0
    listing = capsys.readouterr().out
    assert "# small: 2D" in listing and "input of 1x1x10x10" in listing
    rows = {line.split()[0]: line.split()[1:] for line in listing.splitlines() if not line.startswith("#")}
    assert rows["features.0"] == ["Conv2d", "1x6x10x10"] and rows["features"] == ["Sequential", "1x6x10x10"]
    assert rows["head"] == ["Conv2d", "1x2x10x10"]


def test_the_worker_explains_a_pt2_like_its_eager_module(exported_unet, tmp_path):
    from SegHiResCAMLib.settings import ExplainSettings
    from SegHiResCAMLib.worker.main import main as worker_main
    from SegHiResCAMLib.worker.protocol import ExplainRequest, parse_event

    dims, eager, loaded = exported_unet
    if dims != 3:
        pytest.skip("one worker run is enough")
    volume = _volume(tmp_path / "image.nrrd", shape=(12, 14, 9))
    request = ExplainRequest(images=(str(tmp_path / "image.nrrd"),), model=str(loaded.source),
                             outputs=(str(tmp_path / "heat.nrrd"),),
                             settings=ExplainSettings(layers="bottleneck", target_class=2, device="cpu"))
    (tmp_path / "request.json").write_text(request.to_json(), encoding="utf-8")
    stream = io.StringIO()
    assert worker_main([str(tmp_path / "request.json")], stdout=stream) == 0, stream.getvalue()
    events = [parse_event(line) for line in stream.getvalue().splitlines()]
    assert events[-1]["event"] == "result"
    eager_loaded = LoadedModel(module=eager, card=loaded.card, source=loaded.source, kind="state-dict")
    maps, _ = explain_volume(eager_loaded, volume, target_class=2, layers=("bottleneck",), device="cpu")
    assert maps["seg-hires-grad-cam"].array.max() > 0
    np.testing.assert_allclose(read_image(tmp_path / "heat.nrrd").array, maps["seg-hires-grad-cam"].array,
                               rtol=0, atol=ATOL_MAP)
