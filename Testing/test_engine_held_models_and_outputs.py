"""Models as users hold them (a ``LoadedModel``), and networks whose forward returns several outputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from SegHiResCAMLib import (explain, explain_detailed, kernel_weighted_contribution, list_layers, load_model,
                            masking_scores)
from SegHiResCAMLib.errors import ModelError
from SegHiResCAMLib.models.unet import UNet

from engine_nets import unet
from model_kinds import blob_image, scriptable_unet
from owner_nets import OnlySeg, TwoOutputs, blob, float32_tolerance, hd_bet_like
from tolerances import float32_of_reordered_float64


def _state_dict_model(tmp_path, card: dict):
    model = unet(3, classes=3)
    path = tmp_path / "unet.pth"
    torch.save(model.state_dict(), path)
    network = {"name": "SegHiResCAM.UNet", "args": {"spatial_dims": 3, "out_channels": 3, "channels": [4, 8, 16]}}
    (tmp_path / "unet.json").write_text(json.dumps({"network": network, **card}))
    return model, load_model(path)


# ----------------------------------------------------------------------------- LoadedModel

def test_a_loaded_model_is_explained_with_its_cards_defaults(tmp_path):
    # float64 on both sides: TorchScript may sum in another order (tolerances.float32_of_reordered_float64)
    model = scriptable_unet(2).double()
    path = tmp_path / "net2d.ts"
    torch.jit.save(torch.jit.script(model), str(path))
    (tmp_path / "net2d.json").write_text(json.dumps({"spatial_dims": 2, "slice_axis": 1, "layers": ["mid"]}))
    volume = np.concatenate([blob_image((16, 16), seed=s) for s in range(5)])[None].transpose(0, 2, 1, 3)
    volume = volume.astype(np.float64)
    assert volume.shape == (1, 16, 5, 16)  # slices along axis 1, as the card says
    expected = explain(model, volume, layer="mid", target_class=1, spatial_dims=2, slice_axis=1, device="cpu")
    assert expected.max() == 1.0
    loaded = load_model(path)
    np.testing.assert_allclose(explain(loaded, volume, target_class=1, device="cpu"), expected,
                               **float32_of_reordered_float64(expected))
    # what the user gives wins over the card
    other = explain(model, volume.transpose(0, 2, 1, 3), layer="dec.0", target_class=1, spatial_dims=2, device="cpu")
    assert other.max() == 1.0
    got = explain(loaded, volume.transpose(0, 2, 1, 3), layer="dec.0", target_class=1, slice_axis=0, device="cpu")
    np.testing.assert_allclose(got, other, **float32_of_reordered_float64(other))


def test_every_entry_point_takes_a_loaded_model(tmp_path):
    model, loaded = _state_dict_model(tmp_path, {"layers": ["bottleneck"], "multilabel": True})
    image = blob_image((8, 8, 8), seed=2)
    expected = explain_detailed(model, image, layer="bottleneck", target_class=1, multilabel=True, device="cpu")
    got = explain_detailed(loaded, image, target_class=1, device="cpu")
    np.testing.assert_array_equal(got.heatmap, expected.heatmap)
    assert got.roi_voxels == expected.roi_voxels
    kwc = kernel_weighted_contribution(loaded, image, target_class=1, device="cpu")
    np.testing.assert_array_equal(kwc, kernel_weighted_contribution(model, image, layer="bottleneck", target_class=1,
                                                                    multilabel=True, device="cpu"))
    scores = masking_scores(loaded, image, got.heatmap, target_class=1, device="cpu")
    assert scores == masking_scores(model, image, got.heatmap, target_class=1, multilabel=True, device="cpu")
    assert [i.name for i in list_layers(loaded, (1, 1, 8, 8, 8))] == [i.name for i in list_layers(model, (1, 1, 8, 8, 8))]


def test_something_that_is_no_model_is_refused_with_what_to_give():
    with pytest.raises(ModelError, match=r"the model is a str; give a torch.nn.Module, a TorchScript module"):
        explain("model.pt", np.zeros((1, 8, 8), np.float32), layer="x", target_class=0, device="cpu")


# ----------------------------------------------------------------------------- tuple, list and dict outputs

def _nnunet_plain(deep_supervision: bool):
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    torch.manual_seed(0)
    return PlainConvUNet(1, 3, [4, 8, 16], torch.nn.Conv3d, 3, [1, 2, 2], 1, 3, 1, conv_bias=True,
                         norm_op=torch.nn.InstanceNorm3d, norm_op_kwargs={"affine": True}, nonlin=torch.nn.LeakyReLU,
                         deep_supervision=deep_supervision).eval()


def test_nnunet_deep_supervision_explains_its_full_resolution_output():
    pytest.importorskip("dynamic_network_architectures")
    with_ds, without = _nnunet_plain(True), _nnunet_plain(False)
    without.load_state_dict(with_ds.state_dict())
    image = blob_image((16, 16, 16), seed=3)
    with torch.no_grad():
        outputs = with_ds(torch.from_numpy(image)[None])
    assert [tuple(o.shape[2:]) for o in outputs] == [(16, 16, 16), (8, 8, 8)]  # nnU-Net's order: full first
    layer = "decoder.stages.1"
    expected = explain(without, image, layer=layer, target_class=1, device="cpu")
    assert expected.max() == 1.0
    np.testing.assert_array_equal(explain(with_ds, image, layer=layer, target_class=1, device="cpu"), expected)
    np.testing.assert_array_equal(kernel_weighted_contribution(with_ds, image, layer=layer, target_class=1, device="cpu"),
                                  kernel_weighted_contribution(without, image, layer=layer, target_class=1, device="cpu"))


def _unetplusplus(deep_supervision: bool):
    from monai.networks.nets import BasicUNetPlusPlus

    torch.manual_seed(0)
    return BasicUNetPlusPlus(spatial_dims=2, in_channels=1, out_channels=3, features=(4, 4, 8, 8, 16, 4),
                             deep_supervision=deep_supervision).eval()


def test_unet_plus_plus_with_deep_supervision_is_refused_until_told_which_output():
    pytest.importorskip("monai")
    with_ds, without = _unetplusplus(True), _unetplusplus(False)
    without.load_state_dict(with_ds.state_dict())
    image = blob((32, 32), seed=4)
    with torch.no_grad():
        assert len(with_ds(torch.from_numpy(image)[None])) == 4  # four outputs, all at full resolution
    layer = "conv_0_0"
    with pytest.raises(ModelError, match=r"the model returns 4 outputs at the input's resolution \(0 .*3 .*\) and "
                                         r"nothing says which is the segmentation; name it with output_key"):
        explain(with_ds, image, layer=layer, target_class=1, device="cpu")
    expected = explain(without, image, layer=layer, target_class=1, device="cpu")  # a list of one: its output
    assert expected.max() == 1.0
    for key in (3, -1):  # the full network's output is the last
        np.testing.assert_array_equal(explain(with_ds, image, layer=layer, target_class=1, output_key=key,
                                              device="cpu"), expected)


def test_a_dict_output_explains_its_full_resolution_entry():
    torch.manual_seed(0)
    model = TwoOutputs().eval()
    image = blob((16, 16), seed=5)
    roi = np.zeros((16, 16), bool)
    roi[4:12, 5:11] = True
    expected = explain(OnlySeg(model), image, layer="features", target_class=1, roi=roi, device="cpu")
    assert expected.max() == 1.0
    np.testing.assert_array_equal(explain(model, image, layer="features", target_class=1, roi=roi, device="cpu"),
                                  expected)
    with pytest.raises(ModelError, match=r"no tensor entry 'logits' \(output_key\); its entries: 'aux', 'seg'"):
        explain(model, image, layer="features", target_class=1, output_key="logits", device="cpu")


def test_the_model_card_names_which_output_is_the_segmentation(tmp_path):
    from SegHiResCAMLib.pipeline import explain_volume
    from SegHiResCAMLib.volume import Volume

    torch.manual_seed(0)
    model = TwoOutputs(both_full=True).eval()
    image = blob((16, 16), seed=6)
    with pytest.raises(ModelError, match=r"2 outputs at the input's resolution \('edges' .*'seg' .*\)"):
        explain(model, image, layer="features", target_class=1, device="cpu")
    path = tmp_path / "two.ts"
    torch.jit.save(torch.jit.script(model), str(path))
    (tmp_path / "two.json").write_text(json.dumps({"spatial_dims": 2, "output_key": "seg", "layers": ["features"],
                                                   "class_names": ["a", "b", "c"]}))
    loaded = load_model(path)
    # class 2 ('c') is what the segmentation output predicts here: an absent class would compare all-zero maps
    expected = explain(OnlySeg(model), image, layer="features", target_class=2, device="cpu")
    assert expected.max() == 1.0
    np.testing.assert_allclose(explain(loaded, image, target_class=2, device="cpu"), expected, rtol=0,
                               atol=float32_tolerance(4 * 9, 4))
    volume = Volume(np.stack([image[0]] * 3), np.eye(4))  # three identical slices
    maps, _ = explain_volume(loaded, volume, target_class="c", device="cpu")
    for k in range(3):
        np.testing.assert_allclose(maps["seg-hires-grad-cam"].array[k], expected, rtol=0,
                                   atol=float32_tolerance(4 * 9, 4))


def test_hd_bet_style_deep_supervision_explains_the_full_resolution_output(tmp_path):
    with_ds, without = hd_bet_like(do_ds=True), hd_bet_like(do_ds=False)
    image = blob((8, 8, 8), seed=7, dtype=np.float64)
    expected = explain(without, image, layer="end_conv", target_class=1, device="cpu")
    assert expected.max() == 1.0
    np.testing.assert_array_equal(explain(with_ds, image, layer="end_conv", target_class=1, device="cpu"), expected)
    traced = torch.jit.trace(with_ds, torch.from_numpy(image)[None])  # a traced list output
    np.testing.assert_allclose(explain(traced, image, layer="end_conv", target_class=1, device="cpu"), expected,
                               rtol=0, atol=float32_tolerance(4 * 27, 4))


def test_a_card_output_key_must_be_an_index_or_a_key():
    from SegHiResCAMLib import ModelCard

    with pytest.raises(ModelError, match="output_key must be an index or a key"):
        ModelCard(output_key=1.5)
    assert ModelCard.from_dict(ModelCard(output_key=-1, train_mode_modules=("*.norm",)).to_dict()).output_key == -1


def test_a_unet_without_spatial_output_is_still_refused():
    class Pooled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = UNet(2, 1, 2, channels=(4, 8))

        def forward(self, x):
            return (self.net(x).mean((2, 3)),)

    with pytest.raises(ModelError, match=r"returned a tuple with no \(N, classes, \*spatial\) tensor"):
        explain(Pooled().eval(), np.zeros((1, 8, 8), np.float32), layer="net.head", target_class=0, device="cpu")
