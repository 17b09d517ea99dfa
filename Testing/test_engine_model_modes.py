"""The model runs in its owner's inference mode, and modes and every buffer are left as found.

HD-BET keeps its ``InstanceNorm3d(track_running_stats=True)`` layers in training mode at inference, so
each image is normalised with its own statistics; in eval mode the same network predicts something else.
"""

from __future__ import annotations

import copy
import json
import warnings

import numpy as np
import pytest
import torch

from SegHiResCAMLib import explain, explain_detailed, kernel_weighted_contribution, list_layers, masking_scores
from SegHiResCAMLib.errors import ModelError, SegHiResCAMWarning
from SegHiResCAMLib.models.loading import load_model

from owner_nets import hd_bet_like

SHAPE = (8, 8, 8)
LAYER = "end_conv"  # full resolution: the map needs no upsampling, so the reference below is exact


def _image(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.linspace(-1, 1, s) for s in SHAPE], indexing="ij")
    ball = 3.0 * np.exp(-sum(g ** 2 for g in grids) * 2)
    return (ball + 0.5 * rng.standard_normal(SHAPE))[None]


def _float32(reference: np.ndarray) -> float:
    """The maps come back as float32: a few roundings of the largest value."""
    return 4 * float(np.finfo(np.float32).eps) * float(np.abs(reference).max())


def _state(model: torch.nn.Module):
    modes = {name: module.training for name, module in model.named_modules()}
    buffers = {name: buffer.clone() for name, buffer in model.named_buffers()}
    return modes, buffers


def _assert_left_as_found(model, before) -> None:
    modes, buffers = before
    assert {name: module.training for name, module in model.named_modules()} == modes
    after = dict(model.named_buffers())
    assert set(after) == set(buffers)
    for name, buffer in buffers.items():
        assert torch.equal(after[name], buffer), f"{name} changed"


def _owner_reference(model, image: np.ndarray, target_class: int):
    """Seg-HiRes-Grad CAM before ReLU, computed with plain autograd on a copy run exactly as the owner runs it."""
    owner = copy.deepcopy(model)
    x = torch.from_numpy(image)[None]
    with torch.no_grad():
        prediction = copy.deepcopy(owner)(x).argmax(1) == target_class  # the owner's own forward pass
    kept = {}
    handle = getattr(owner, LAYER).register_forward_hook(lambda module, inputs, output: kept.setdefault("A", output))
    try:
        output = owner(x)
    finally:
        handle.remove()
    activation = kept["A"]
    score = (output[:, target_class] * prediction).sum()
    gradient, = torch.autograd.grad(score, activation)
    return prediction[0].numpy(), (gradient * activation).sum(1)[0].detach().numpy()


def test_a_model_in_eval_mode_with_norms_left_in_training_mode_is_explained_as_its_owner_runs_it():
    model = hd_bet_like()
    image = _image()
    prediction, reference = _owner_reference(model, image, 1)
    with torch.no_grad():
        in_eval = copy.deepcopy(model).eval()(torch.from_numpy(image)[None]).argmax(1)[0].numpy() == 1
    assert (in_eval != prediction).mean() > 0.05  # eval mode would explain a prediction the model never makes
    before = _state(model)
    result = explain_detailed(model, image, layer=LAYER, target_class=1, relu=False, normalize=False, device="cpu")
    assert result.roi_voxels == int(prediction.sum()) > 0
    assert result.warnings == ()
    np.testing.assert_allclose(result.heatmap, reference, rtol=0, atol=_float32(reference))
    _assert_left_as_found(model, before)  # also running_mean/var and num_batches_tracked, which train mode updates


def test_its_default_region_is_the_models_own_prediction_run_the_owners_way():
    model = hd_bet_like(seed=2)
    image = _image(seed=2)  # the owner predicts 348 voxels of class 1; eval mode would predict all 512
    prediction, _ = _owner_reference(model, image, 1)
    assert 0 < prediction.sum() < prediction.size
    heat = explain(model, image, layer=LAYER, target_class=1, device="cpu")
    given = explain(model, image, layer=LAYER, target_class=1, roi=prediction, device="cpu")
    assert heat.max() == 1.0
    np.testing.assert_array_equal(heat, given)


def test_a_model_wholly_in_training_mode_runs_in_eval_mode_with_a_warning_and_is_put_back():
    model = hd_bet_like(seed=1).train()
    image = _image(seed=1)
    before = _state(model)
    result = explain_detailed(model, image, layer=LAYER, target_class=1, device="cpu")
    assert any("was in training mode" in message and "model.eval()" in message for message in result.warnings)
    expected = explain_detailed(copy.deepcopy(model).eval(), image, layer=LAYER, target_class=1, device="cpu")
    np.testing.assert_array_equal(result.heatmap, expected.heatmap)
    _assert_left_as_found(model, before)
    with pytest.warns(SegHiResCAMWarning, match="was in training mode"):
        list_layers(model, (1, 1, *SHAPE))
    _assert_left_as_found(model, before)


def test_every_engine_path_leaves_modes_and_buffers_as_found():
    model = hd_bet_like(seed=3)
    image = _image(seed=3)
    before = _state(model)
    heat = kernel_weighted_contribution(model, image, layer="context", target_class=1, device="cpu")
    _assert_left_as_found(model, before)
    masking_scores(model, image, heat, target_class=1, device="cpu")
    _assert_left_as_found(model, before)
    infos = {info.name: info for info in list_layers(model, (1, 1, *SHAPE))}
    assert infos["end_norm"].output_shape == (1, 4, *SHAPE)
    _assert_left_as_found(model, before)


def test_a_scripted_model_with_norms_in_training_mode_is_explained_as_its_owner_runs_it(tmp_path):
    model = hd_bet_like(seed=4)
    image = _image(seed=4)
    _, reference = _owner_reference(model, image, 1)
    scripted = torch.jit.script(copy.deepcopy(model))
    before = _state(scripted)
    heat = explain(scripted, image, layer=LAYER, target_class=1, relu=False, normalize=False, device="cpu")
    np.testing.assert_allclose(heat, reference, rtol=0, atol=_float32(reference))
    _assert_left_as_found(scripted, before)


def test_a_model_card_names_the_modules_that_run_in_training_mode(tmp_path):
    owner = hd_bet_like(seed=5)
    image = _image(seed=5)
    _, reference = _owner_reference(owner, image, 1)
    exported = copy.deepcopy(owner).eval()  # saved the usual way: everything in eval mode
    path = tmp_path / "hdbet.ts"
    torch.jit.save(torch.jit.script(exported), str(path))
    assert not load_model(path).module.scripted.end_norm.training
    for entry in ("InstanceNorm3d", "*norm"):
        (tmp_path / "hdbet.json").write_text(json.dumps({"train_mode_modules": [entry], "layers": [LAYER]}))
        loaded = load_model(path)
        modes = {name: module.training for name, module in loaded.module.submodules()}
        assert modes["end_norm"] and modes["context.norm"] and not modes["end_conv"] and not loaded.module.training
        heat = explain(loaded, image, target_class=1, relu=False, normalize=False, device="cpu")
        np.testing.assert_allclose(heat, reference, rtol=0, atol=_float32(reference))
    (tmp_path / "hdbet.json").write_text(json.dumps({"train_mode_modules": ["BatchNorm3d"]}))
    with pytest.raises(ModelError, match=r"train_mode_modules entry 'BatchNorm3d' names no module of the network"):
        load_model(path)


def test_an_exported_program_runs_as_exported_and_its_card_cannot_name_training_mode_modules(tmp_path):
    owner = hd_bet_like(seed=1)
    image = _image(seed=1)
    prediction, reference = _owner_reference(owner, image, 1)
    assert prediction.any()
    x = torch.from_numpy(image)[None]
    program = torch.export.export(copy.deepcopy(owner), (x,))  # exported in the owner's mode: norms use the image's statistics
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # torch's own notices while making it functional are not relayed
        heat = explain(program, image, layer=LAYER, target_class=1, relu=False, normalize=False, device="cpu")
    np.testing.assert_allclose(heat, reference, rtol=0, atol=_float32(reference))
    path = tmp_path / "hdbet.pt2"
    torch.export.save(torch.export.export(copy.deepcopy(owner).eval(), (x,)), str(path))
    (tmp_path / "hdbet.json").write_text(json.dumps({"train_mode_modules": ["InstanceNorm3d"], "layers": [LAYER]}))
    with pytest.raises(ModelError, match=r"train_mode_modules cannot apply to the exported program hdbet\.pt2"):
        load_model(path)
