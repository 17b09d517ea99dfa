"""Nothing pickled runs silently, and missing optional packages say which extra to install."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import textwrap

import pytest
import torch

from SegHiResCAMLib.errors import UnsafeModelError
from SegHiResCAMLib.models.loading import load_model
from SegHiResCAMLib.models.unet import UNet

from model_kinds import nnunet_network, write_nnunet_folder


class _Payload:
    """Unpickling this would create a file: the proof that code ran."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _card(path, spatial_dims=3):
    (path.with_suffix(".json")).write_text(json.dumps({
        "spatial_dims": spatial_dims, "network": {"name": "SegHiResCAM.UNet",
                                                  "args": {"spatial_dims": spatial_dims, "channels": [4, 8]}}}))


def test_whole_pickled_module_is_refused_with_what_to_do(tmp_path):
    path = tmp_path / "whole.pt"
    torch.save(UNet(channels=(4, 8)), path)  # the whole module, not its state dict
    _card(path)
    with pytest.raises(UnsafeModelError, match=r"arbitrary code.*torch.save\(model.state_dict\(\)"):
        load_model(path)


@pytest.mark.parametrize("zipped", [True, False])
def test_malicious_pickle_never_runs(tmp_path, zipped):
    marker = tmp_path / "pwned"
    path = tmp_path / "weights.pth"
    if zipped:
        torch.save({"weight": _Payload(str(marker))}, path)
    else:
        path.write_bytes(pickle.dumps({"weight": _Payload(str(marker))}))
    _card(path)
    with pytest.raises(UnsafeModelError):
        load_model(path)
    assert not marker.exists()


def test_state_dict_loads_with_tensors_only(tmp_path):
    path = tmp_path / "net.pth"
    torch.save(UNet(channels=(4, 8)).state_dict(), path)
    _card(path)
    assert load_model(path).kind == "state-dict"


BLOCKED_IMPORT = textwrap.dedent(
    """
    import sys
    sys.modules[{blocked!r}] = None  # as if the package were not installed
    sys.path.insert(0, {testing!r})
    from SegHiResCAMLib.errors import MissingDependencyError
    from SegHiResCAMLib.models.loading import load_model
    try:
        load_model({path!r})
    except MissingDependencyError as error:
        print("MISSING:", error)
    """
)


def _load_without(package: str, path) -> str:
    code = BLOCKED_IMPORT.format(blocked=package, testing=os.path.dirname(__file__), path=str(path))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.process
def test_missing_monai_names_the_monai_extra(tmp_path):
    torch.save({}, tmp_path / "net.pth")
    (tmp_path / "net.json").write_text(json.dumps({"name": "UNet", "args": {"spatial_dims": 3}}))
    out = _load_without("monai", tmp_path / "net.pth")
    assert "MISSING:" in out and 'pip install "seghirescam[monai]"' in out


@pytest.mark.process
def test_missing_network_package_names_the_nnunet_extra(tmp_path):
    pytest.importorskip("dynamic_network_architectures")  # needed to write the checkpoint here
    folder = write_nnunet_folder(tmp_path, nnunet_network())
    out = _load_without("dynamic_network_architectures", folder)
    assert "MISSING:" in out and 'pip install "seghirescam[nnunet]"' in out
