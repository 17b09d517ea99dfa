"""The engine leaves models as it found them, records only what it needs, and says clearly what is wrong."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from SegHiResCAMLib import explain, explain_detailed, list_layers
from SegHiResCAMLib.engine.capture import forward_with_activations
from SegHiResCAMLib.errors import CancelledError, InputError, LayerError, ModelError, SegHiResCAMError
from engine_nets import ClassifierNet, InplaceNet, TupleLayerNet, hooked_output_and_activation, unet
from tolerances import float32_of_float64

IMAGE = np.random.default_rng(0).random((1, 8, 8, 8), dtype=np.float32)


def _hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())


def test_model_is_left_as_found_hooks_grads_modes_flags_and_statistics():
    model = unet(3, classes=3).train()
    model.decoder[0].eval()
    model.encoder[0][0].weight.requires_grad_(False)
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    modes = {name: m.training for name, m in model.named_modules()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    explain_detailed(model, IMAGE, layer=["bottleneck", "decoder.1"], target_class=1, device="cpu",
                     methods=("seg-hires-grad-cam", "seg-grad-cam"))
    assert _hook_count(model) == 0
    assert all(p.grad is None for p in model.parameters())
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
    assert {name: m.training for name, m in model.named_modules()} == modes
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), f"{key} changed (batch norm must run in eval mode)"


def test_hooks_are_removed_and_mode_restored_when_the_run_is_cancelled():
    model = unet(2, classes=3).train()

    def cancel(fraction, message):
        if fraction > 0:
            raise CancelledError("cancelled by the user")

    with pytest.raises(CancelledError):
        explain_detailed(model, np.random.default_rng(1).random((1, 6, 16, 16)), layer="bottleneck",
                         target_class=1, spatial_dims=2, batch_size=2, device="cpu", progress=cancel)
    assert _hook_count(model) == 0 and model.training
    assert torch.is_grad_enabled()


def test_hooks_are_removed_after_a_layer_error_inside_the_forward_pass():
    model = TupleLayerNet().eval()
    with pytest.raises(LayerError, match="returns tuple"):
        explain(model, np.ones((1, 8, 8), np.float32), layer="pair", target_class=1, device="cpu")
    assert _hook_count(model) == 0 and torch.is_grad_enabled()


def test_a_frozen_model_is_explained_like_a_trainable_one():
    trainable = unet(3, classes=3)
    frozen = unet(3, classes=3)
    for parameter in frozen.parameters():
        parameter.requires_grad_(False)
    options = dict(layer="decoder.0", target_class=2, roi=np.ones((8, 8, 8), bool), device="cpu")
    np.testing.assert_array_equal(explain(trainable, IMAGE, **options), explain(frozen, IMAGE, **options))


def test_graph_is_recorded_only_downstream_of_the_layer():
    model = unet(3, classes=3)
    output, (activation,) = forward_with_activations(model, torch.from_numpy(IMAGE)[None], ["bottleneck"])
    assert activation.is_leaf and activation.requires_grad
    with pytest.raises(RuntimeError):  # the encoder is not in the graph
        torch.autograd.grad(output.sum(), model.encoder[0][0].weight)
    reference_out, reference_activation = hooked_output_and_activation(model, torch.from_numpy(IMAGE)[None],
                                                                      "bottleneck")
    lean, = torch.autograd.grad(output[:, 1].sum(), activation)
    full, = torch.autograd.grad(reference_out[:, 1].sum(), reference_activation)
    # exact: cutting the graph changes what is recorded upstream of the layer, not one operation from the
    # layer to the output, forward or backward
    torch.testing.assert_close(lean, full, rtol=0, atol=0)
    torch.testing.assert_close(output, reference_out, rtol=0, atol=0)


def test_layer_followed_by_an_inplace_operation_keeps_its_own_output():
    torch.manual_seed(0)
    model = InplaceNet().double().eval()
    image = np.random.default_rng(2).normal(size=(1, 10, 10))
    heat = explain(model, image, layer="conv", target_class=1, roi=np.ones((10, 10), bool), relu=False,
                   normalize=False, device="cpu")
    x = torch.from_numpy(image)[None]
    with torch.no_grad():
        conv = model.conv(x)
        gradient = model.head.weight[1, :, 0, 0][None, :, None, None] * (conv > 0)
    expected = (conv * gradient).sum(1)[0].numpy()
    np.testing.assert_allclose(heat, expected, **float32_of_float64(expected))  # float64 model, float32 map


def test_models_without_hooks_may_provide_forward_capturing():
    model = unet(3, classes=3)

    class Capturing(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x)

        def layer_names(self):
            return [(name, type(m).__name__) for name, m in self.inner.named_modules() if name]

        def forward_capturing(self, x, layers):
            store = {}
            modules = dict(self.inner.named_modules())

            def keeper(name):
                def keep_first_output(module, inputs, output) -> None:
                    store.setdefault(name, output)

                return keep_first_output

            handles = [modules[name].register_forward_hook(keeper(name)) for name in layers]
            try:
                out = self.inner(x)
            finally:
                for handle in handles:
                    handle.remove()
            return out, [store.get(name) for name in layers]

    options = dict(layer="decoder.0", target_class=1, device="cpu")
    # exact: the same modules run on the same values; the hook keeps the layer's output where the engine's
    # own hook keeps a copy of it
    np.testing.assert_array_equal(explain(Capturing(model), IMAGE, **options), explain(model, IMAGE, **options))
    shapes = {info.name: info.output_shape for info in list_layers(Capturing(model), (1, 1, 8, 8, 8))}
    assert shapes["bottleneck"] == (1, 16, 2, 2, 2)


def test_list_layers_gives_names_types_and_output_shapes():
    model = unet(3, classes=3)
    layers = {info.name: info for info in list_layers(model, (1, 1, 16, 16, 16))}
    assert layers["bottleneck"].type == "ConvBlock" and layers["bottleneck"].output_shape == (1, 16, 4, 4, 4)
    assert layers["head"].output_shape == (1, 3, 16, 16, 16)
    assert layers["decoder"].output_shape is None  # a container that is never called itself
    assert _hook_count(model) == 0


def test_list_layers_marks_the_layers_that_cannot_be_explained_with_the_reason_explaining_them_gives():
    layers = {info.name: info for info in list_layers(unet(3), (1, 1, 8, 8, 8))}
    assert layers["pool"].unusable == "it runs 2 times in one forward pass, so its output is ambiguous"
    assert layers["decoder"].unusable == "it is not used when the model runs"
    assert layers["bottleneck"].unusable is None and layers["head"].unusable is None
    pair = {info.name: info for info in list_layers(TupleLayerNet().eval(), (1, 1, 8, 8))}["pair"]
    assert pair.unusable == "it returns tuple, not a tensor" and pair.output_shape is None
    with pytest.raises(LayerError, match="layer 'pair' returns tuple, not a tensor"):  # the same reason
        explain(TupleLayerNet().eval(), np.ones((1, 8, 8), np.float32), layer="pair", target_class=1, device="cpu")


def test_unknown_layer_names_the_closest_layers():
    with pytest.raises(LayerError, match=r"layer 'decoder\.9' does not exist; nearest names: decoder"):
        explain(unet(3), IMAGE, layer="decoder.9", target_class=1, device="cpu")


def test_class_out_of_range_says_how_many_classes_there_are():
    with pytest.raises(InputError, match=r"class 5 is out of range: the model outputs 3 classes \(0 to 2\)"):
        explain(unet(3, classes=3), IMAGE, layer="bottleneck", target_class=5, device="cpu")


def test_roi_of_another_shape_is_refused():
    with pytest.raises(InputError, match=r"the region has shape \(8, 8, 7\) but the image's spatial shape is"):
        explain(unet(3), IMAGE, layer="bottleneck", target_class=1, roi=np.ones((8, 8, 7), bool), device="cpu")


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_input_is_refused(bad):
    image = IMAGE.copy()
    image[0, 1, 2, 3] = bad
    with pytest.raises(InputError, match="NaN or infinite"):
        explain(unet(3), image, layer="bottleneck", target_class=1, device="cpu")


def test_a_model_output_without_spatial_dimensions_is_refused():
    with pytest.raises(ModelError, match=r"without the spatial dimensions of its input"):
        explain(ClassifierNet().eval(), np.ones((1, 8, 8), np.float32), layer="conv", target_class=1, device="cpu")


def test_a_layer_whose_output_is_not_a_tensor_is_refused():
    with pytest.raises(LayerError, match="layer 'pair' returns tuple, not a tensor; choose one of its submodules"):
        explain(TupleLayerNet().eval(), np.ones((1, 8, 8), np.float32), layer="pair", target_class=1, device="cpu")


def test_a_layer_that_is_never_called_is_refused():
    model = unet(3)
    with pytest.raises(LayerError, match="'decoder' is not used when the model runs"):
        explain(model, IMAGE, layer="decoder", target_class=1, device="cpu")


def test_a_layer_called_twice_is_refused():
    model = unet(3)
    with pytest.raises(LayerError, match="runs more than once"):
        explain(model, IMAGE, layer="pool", target_class=1, device="cpu")


@pytest.mark.parametrize("options, message", [
    (dict(method="gradcam"), "method 'gradcam' is unknown; choose one of seg-hires-grad-cam"),
    (dict(target="softmax"), "target 'softmax' is unknown"),
    (dict(spatial_dims=4), "spatial_dims=4 does not fit"),
    (dict(spatial_dims=2, slice_axis=3), "slice_axis must be 0, 1 or 2"),
    (dict(layer=[]), "no layer was given"),
])
def test_bad_options_are_refused_with_a_message(options, message):
    arguments = dict(layer="bottleneck", target_class=1, device="cpu") | options
    with pytest.raises(InputError, match=message):
        explain(unet(3), IMAGE, **arguments)


def test_requesting_cuda_without_a_gpu_says_to_choose_cpu():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(InputError, match="choose device 'auto' or 'cpu'"):
        explain(unet(3), IMAGE, layer="bottleneck", target_class=1, device="cuda")


def test_every_error_belongs_to_one_family():
    for error in (InputError, LayerError, ModelError, CancelledError):
        assert issubclass(error, SegHiResCAMError)
    assert str(LayerError("plain message")) == "plain message"


def test_auto_device_reports_the_device_that_ran():
    result = explain_detailed(unet(3), IMAGE, layer="bottleneck", target_class=1, device="auto")
    assert result.device == ("cuda" if torch.cuda.is_available() else "cpu")
    assert result.seconds > 0 and result.roi_voxels >= 0
