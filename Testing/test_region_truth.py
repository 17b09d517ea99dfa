"""Issue 8, section 2: the default region holds only the image's voxels (not the padding the card's
preprocessing adds), and a map that ReLU empties says so instead of arriving as silent zeros."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from SegHiResCAMLib.engine.sliding_window import explain_windows
from SegHiResCAMLib.models.card import ModelCard
from SegHiResCAMLib.models.loading import LoadedModel
from SegHiResCAMLib.pipeline import explain_volume
from SegHiResCAMLib.volume import Volume
from SegHiResCAMLib.windows import SlidingWindow

SHAPE = (5, 6, 7)  # padded to 8 x 8 x 8 by divisible_by=4: 302 voxels of padding


class LowIntensityNet(nn.Module):
    """Class 1 wherever the input is below 0.25: logits (x, 0.5 - x), so the zero padding is class 1."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Conv3d(1, 2, 1)
        with torch.no_grad():
            self.features.weight.copy_(torch.tensor([1.0, -1.0]).view(2, 1, 1, 1, 1))
            self.features.bias.copy_(torch.tensor([0.0, 0.5]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


class NegativeEvidenceNet(nn.Module):
    """A = x at 'features'; logits (3 - A, A): class 0 everywhere, and dy/dA = -1 for it, so every
    contribution G*A = -x is negative and ReLU leaves nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Conv3d(1, 1, 1, bias=False)
        with torch.no_grad():
            self.features.weight.fill_(1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activation = self.features(x)
        return torch.cat([3.0 - activation, activation], dim=1)


def loaded(module: nn.Module, **card_fields) -> LoadedModel:
    card = ModelCard(name="oracle", spatial_dims=3, class_names=("a", "b"), layers=("features",), **card_fields)
    return LoadedModel(module=module.eval(), card=card, source=None, kind="python")  # type: ignore[arg-type]


def image_with_low_voxels() -> tuple[Volume, np.ndarray]:
    rng = np.random.default_rng(0)
    array = (1.0 + rng.random(SHAPE)).astype(np.float32)
    low = np.zeros(SHAPE, bool)
    low[1:3, 2:4, 3:6] = True  # 12 voxels
    array[low] = 0.1
    return Volume(array), low


@pytest.mark.parametrize("target", ["logits", "probability-threshold"])
def test_the_default_region_is_the_prediction_on_the_images_voxels_not_on_the_padding(target):
    volume, low = image_with_low_voxels()
    model = loaded(LowIntensityNet(), divisible_by=4)
    settings = dict(target_class=1, methods=("seg-hires-grad-cam",), target=target, device="cpu",
                    normalize=False)
    maps, explanation = explain_volume(model, volume, **settings)
    # Before: the region also held the 302 padding voxels, which the model calls class 1.
    assert explanation.roi_voxels == int(low.sum()) == 12
    # The same as giving the image's own predicted region by hand (the oracle: region = x < 0.25).
    given, _ = explain_volume(model, volume, roi=low, **settings)
    np.testing.assert_array_equal(maps["seg-hires-grad-cam"].array, given["seg-hires-grad-cam"].array)
    assert maps["seg-hires-grad-cam"].array[low].min() > 0 and maps["seg-hires-grad-cam"].array[~low].max() == 0


def test_a_model_that_predicts_nothing_in_the_image_explains_nothing_even_if_the_padding_is_its_class():
    volume = Volume(np.ones(SHAPE, np.float32))  # no voxel below 0.25: class 1 only in the padding
    maps, explanation = explain_volume(loaded(LowIntensityNet(), divisible_by=4), volume, target_class=1,
                                       device="cpu")
    assert explanation.roi_voxels == 0 and maps["seg-hires-grad-cam"].array.max() == 0
    assert any("empty" in note and "all zeros" in note for note in explanation.warnings)


def test_a_map_that_relu_empties_is_said_not_silent():
    volume = Volume((0.5 + np.random.default_rng(1).random(SHAPE)).astype(np.float32))
    model = loaded(NegativeEvidenceNet())
    maps, explanation = explain_volume(model, volume, target_class=0, device="cpu",
                                       methods=("seg-hires-grad-cam", "seg-grad-cam"))
    assert explanation.roi_voxels == volume.array.size
    for method in ("seg-hires-grad-cam", "seg-grad-cam"):
        assert maps[method].array.max() == 0
    notes = [note for note in explanation.warnings if "no positive evidence" in note]
    assert len(notes) == 2 and all("'features'" in note for note in notes)
    # The signed map is the oracle: G * A = -x exactly (one channel, m = 1 everywhere).
    signed, explanation = explain_volume(model, volume, target_class=0, device="cpu", relu=False, normalize=False)
    np.testing.assert_array_equal(signed["seg-hires-grad-cam"].array, -volume.array)
    assert not any("no positive evidence" in note for note in explanation.warnings)


def test_positive_evidence_gives_no_such_note():
    volume, _ = image_with_low_voxels()
    _, explanation = explain_volume(loaded(LowIntensityNet(), divisible_by=4), volume, target_class=1, device="cpu")
    assert not any("no positive evidence" in note for note in explanation.warnings)


def test_sliding_windows_say_it_too():
    image = (0.5 + np.random.default_rng(2).random((1, 12, 12, 12))).astype(np.float32)
    result = explain_windows(NegativeEvidenceNet().eval(), image, layers=["features"], class_index=0,
                             window=SlidingWindow((8, 8, 8)), device="cpu")
    assert result.heatmap.max() == 0 and result.roi_voxels > 0
    assert any("no positive evidence" in note and "'features'" in note for note in result.warnings)
