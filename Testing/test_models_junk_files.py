"""A file picked as the model that is no model is refused with what it is and what to do."""

from __future__ import annotations

import io
import json
import pickle
import zipfile

import numpy as np
import pytest
import torch

from SegHiResCAMLib.errors import ModelError, UnsafeModelError
from SegHiResCAMLib.models.loading import load_model
from SegHiResCAMLib.models.unet import UNet

from model_kinds import nnunet_network, write_nnunet_folder

CARD = {"spatial_dims": 3, "network": {"name": "SegHiResCAM.UNet", "args": {"spatial_dims": 3, "channels": [4, 8]}}}


def _write(folder, name: str, data: bytes, card: bool = True):
    path = folder / name
    path.write_bytes(data)
    if card:
        path.with_suffix(".json").write_text(json.dumps(CARD))
    return path


def _saved(**options) -> bytes:
    buffer = io.BytesIO()
    torch.save(UNet(channels=(4, 8)).state_dict(), buffer, **options)
    return buffer.getvalue()


def _refusal(path) -> ModelError:
    with pytest.raises(ModelError) as caught:
        load_model(path)
    return caught.value


@pytest.mark.parametrize("card", [True, False])
def test_random_bytes_are_not_called_pickled_objects(tmp_path, card):
    path = _write(tmp_path, "model.pt", np.random.default_rng(0).bytes(4096), card)
    error = _refusal(path)
    assert not isinstance(error, UnsafeModelError)
    assert str(error) == ("model.pt is not a file PyTorch wrote (neither a TorchScript archive nor a torch.save file); "
                          "choose the file written by torch.save(model.state_dict(), path) or torch.jit.save")


@pytest.mark.parametrize("card", [True, False])
def test_an_empty_model_file_says_it_is_empty(tmp_path, card):
    error = _refusal(_write(tmp_path, "model.pth", b"", card))
    assert str(error) == ("the model file model.pth is empty (0 bytes), so it was not saved or copied completely; "
                          "save or copy it again")


def test_a_pt2_of_random_bytes_empty_or_cut_short_is_named_as_such(tmp_path):
    path = _write(tmp_path, "model.pt2", np.random.default_rng(1).bytes(4096), card=False)
    assert str(_refusal(path)) == ("model.pt2 is not a file PyTorch wrote (not a torch.export archive); choose the file "
                                   "written by torch.export.save")
    path.write_bytes(b"")
    assert str(_refusal(path)) == ("the model file model.pt2 is empty (0 bytes), so it was not saved or copied "
                                   "completely; save or copy it again")
    program = torch.export.export(UNet(spatial_dims=2, channels=(4, 8)).eval(), (torch.zeros(1, 1, 16, 16),))
    torch.export.save(program, str(path))
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])  # a copy that stopped half-way
    assert "model.pt2 is a damaged or incomplete archive" in str(_refusal(path))


def test_a_text_file_is_named_a_text_file(tmp_path):
    error = _refusal(_write(tmp_path, "notes.txt", "weights are on the lab drive\n".encode(), card=False))
    assert str(error).startswith("notes.txt is a text file (it starts with 'weights are on the lab drive'), not a model")


@pytest.mark.parametrize("name", ["brain.nii.gz", "brain.nii", "brain.nrrd", "brain.mha"])
def test_an_image_picked_as_the_model_says_to_choose_it_as_the_image(tmp_path, name):
    import SimpleITK as sitk

    path = tmp_path / name
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 5, 6), np.float32)), str(path))
    kind = {"brain.nii.gz": "a NIfTI", "brain.nii": "a NIfTI", "brain.nrrd": "an NRRD", "brain.mha": "a MetaImage"}[name]
    message = str(_refusal(path))
    assert message.startswith(f"{name} is {kind}") and "choose it as the image" in message


@pytest.mark.parametrize("kind", ["state dict", "legacy state dict", "TorchScript"])
def test_a_file_cut_short_is_called_damaged(tmp_path, kind):
    if kind == "TorchScript":
        buffer = io.BytesIO()
        torch.jit.save(torch.jit.script(UNet(channels=(4, 8)).eval()), buffer)
        data = buffer.getvalue()
    else:
        data = _saved(_use_new_zipfile_serialization=kind == "state dict")
    for cut in (len(data) // 2, 200):
        error = _refusal(_write(tmp_path, "model.pt", data[:cut]))
        assert not isinstance(error, UnsafeModelError)
        assert "damaged" in str(error) and "copy or save it again" in str(error)


def test_a_zip_that_is_not_a_model_says_to_unpack_it(tmp_path):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("model/README.txt", "x")
    error = _refusal(_write(tmp_path, "model.zip", buffer.getvalue(), card=False))
    assert str(error) == ("model.zip is a zip archive (1 file: model/README.txt), not a PyTorch model; unpack it and "
                          "choose the model file or folder inside")


def test_a_folder_that_is_neither_bundle_nor_nnunet_points_at_the_model_file_inside(tmp_path):
    folder = tmp_path / "downloads"
    folder.mkdir()
    (folder / "model.ts").write_bytes(b"")
    (folder / "notes.txt").write_text("x")
    assert str(_refusal(folder)).endswith("nnU-Net v2 results folder (plans.json, dataset.json, "
                                          "fold_N/checkpoint_final.pth); it holds model.ts: choose that file instead")


def test_pickled_objects_are_still_refused_as_unsafe_and_plain_weights_still_load(tmp_path):
    torch.save(UNet(channels=(4, 8)), tmp_path / "whole.pt")
    (tmp_path / "whole.json").write_text(json.dumps(CARD))
    with pytest.raises(UnsafeModelError, match="holds pickled Python objects, not just weights"):
        load_model(tmp_path / "whole.pt")
    path = _write(tmp_path, "raw.pt", pickle.dumps({"weight": np.zeros(3)}))  # a plain pickle of numpy data
    with pytest.raises(UnsafeModelError):
        load_model(path)
    for options in ({}, {"_use_new_zipfile_serialization": False}):
        assert load_model(_write(tmp_path, "weights.pt", _saved(**options))).kind == "state-dict"


def test_a_cut_short_nnunet_checkpoint_is_called_damaged(tmp_path):
    pytest.importorskip("dynamic_network_architectures")
    folder = write_nnunet_folder(tmp_path, nnunet_network())
    checkpoint = folder / "fold_0" / "checkpoint_final.pth"
    checkpoint.write_bytes(checkpoint.read_bytes()[:1000])
    error = _refusal(folder)
    assert not isinstance(error, UnsafeModelError) and "checkpoint_final.pth is a damaged" in str(error)
