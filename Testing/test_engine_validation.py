"""Prediction Preserved / Image Preserved: mask the image with the map, predict again, compare."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from SegHiResCAMLib import MaskingScores, masking_scores
from SegHiResCAMLib.errors import InputError, SegHiResCAMWarning
from engine_nets import LocalNet, unet
from tolerances import EPS32, EPS64

# PixelNet runs in float32: z = w x + b is within 2 eps32 of its float64 value (|w x|, |z| <= 3), the
# sigmoid moves that by at most (1 - s) |dz| and evaluates within about 4 eps32: each probability is within
# 6 eps32 of the float64 one, relatively (the masked image's map value, rounded to float32, adds 2 more).
# Prediction Preserved is a ratio of float64 sums of such probabilities: within 2 x 8 = 16 eps32.
PRESERVED_RTOL = 16 * EPS32


class PixelNet(nn.Module):
    """One sigmoid output ``z(p) = w x(p) + b``: the output at p depends only on the input at p."""

    def __init__(self, weight: float = 3.0, bias: float = -1.0, use_bias: bool = True) -> None:
        super().__init__()
        self.head = nn.Conv2d(1, 1, 1, bias=use_bias)
        with torch.no_grad():
            self.head.weight.fill_(weight)
            if use_bias:
                self.head.bias.fill_(bias)

    def forward(self, x):
        return self.head(x)


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


IMAGE = np.random.default_rng(0).random((1, 12, 12)).astype(np.float32)


def test_a_map_of_ones_preserves_everything_exactly():
    model = unet(3, classes=3)
    image = np.random.default_rng(1).random((1, 16, 16, 16), dtype=np.float32)
    scores = masking_scores(model, image, np.ones((16, 16, 16)), target_class=1, device="cpu", baseline=0.3)
    assert scores == MaskingScores(prediction_preserved=1.0, image_preserved=1.0, excess_prediction=0.0)


def test_a_map_of_zeros_keeps_no_image_and_a_bias_free_net_keeps_half_its_probability():
    model = PixelNet(use_bias=False)
    scores = masking_scores(model, IMAGE, np.zeros((12, 12)), target_class=0, device="cpu")
    x = IMAGE[0].astype(np.float64)
    roi = 3.0 * x > 0  # the prediction: logit > 0
    expected = 0.5 * roi.sum() / _sigmoid(3.0 * x[roi]).sum()  # the masked image predicts sigmoid(0)
    assert scores.image_preserved == 0.0
    assert scores.prediction_preserved == pytest.approx(expected, rel=PRESERVED_RTOL, abs=0)


def test_threshold_form_keeps_the_fraction_of_voxels_above_the_threshold():
    heat = np.random.default_rng(2).random((12, 12))
    scores = masking_scores(LocalNet(2), IMAGE, heat, target_class=1, roi=np.ones((12, 12)), threshold=0.7,
                            device="cpu")
    # a count of 144 zeros and ones is exact; the mean divides it by 144 (or multiplies by 1/144): 2 roundings
    assert scores.image_preserved == pytest.approx(float((heat > 0.7).mean()), rel=2 * EPS64, abs=0)
    assert 0.0 <= scores.prediction_preserved <= 1.0


def test_prediction_preserved_matches_the_closed_form_of_a_pixelwise_model():
    weight, bias = 3.0, -1.0
    model = PixelNet(weight, bias)
    x = IMAGE[0].astype(np.float64)
    roi = weight * x + bias > 0
    original = _sigmoid(weight * x + bias) * roi
    heat = np.random.default_rng(3).random((12, 12))
    soft = masking_scores(model, IMAGE, heat, target_class=0, device="cpu")
    changed = _sigmoid(weight * heat * x + bias) * roi
    assert soft.prediction_preserved == pytest.approx(np.minimum(changed, original).sum() / original.sum(),
                                                      rel=PRESERVED_RTOL, abs=0)
    # the mean of 144 values in [0, 1], summed in another order than numpy's: within 144 eps64 of the sum
    assert soft.image_preserved == pytest.approx(heat.mean(), rel=144 * EPS64, abs=0)
    # The region's own mask keeps all of its evidence; its complement keeps only the bias's sigmoid(b).
    keep = masking_scores(model, IMAGE, roi.astype(float), target_class=0, device="cpu")
    other = masking_scores(model, IMAGE, 1.0 - roi, target_class=0, device="cpu")
    assert keep.prediction_preserved == 1.0  # exact: where the map is 1 the image is used as it is
    assert other.prediction_preserved == pytest.approx(_sigmoid(bias) * roi.sum() / original.sum(),
                                                       rel=PRESERVED_RTOL, abs=0)
    assert keep.prediction_preserved > other.prediction_preserved


def test_scores_stay_in_the_unit_interval_for_random_maps():
    model = unet(2, classes=3)
    rng = np.random.default_rng(4)
    image = rng.random((1, 16, 16), dtype=np.float32)
    for _ in range(3):
        scores = masking_scores(model, image, rng.random((16, 16)), target_class=0, device="cpu")
        assert 0.0 <= scores.prediction_preserved <= 1.0 and 0.0 <= scores.image_preserved <= 1.0


def test_2d_model_over_a_volume_and_a_given_region():
    model = LocalNet(2, classes=2)
    volume = np.random.default_rng(5).standard_normal((1, 6, 10, 10)).astype(np.float32)
    roi = np.zeros((6, 10, 10), bool)
    roi[2, 3:7, 3:7] = True
    whole = masking_scores(model, volume, np.ones((6, 10, 10)), target_class=1, roi=roi, spatial_dims=2,
                           slice_axis=0, device="cpu")
    assert whole == MaskingScores(1.0, 1.0, 0.0)
    half = np.zeros((6, 10, 10))
    half[:, :, :5] = 1.0
    scores = masking_scores(model, volume, half, target_class=1, roi=roi, spatial_dims=2, slice_axis=1,
                            device="cpu")
    assert scores.image_preserved == 0.5 and 0.0 <= scores.prediction_preserved <= 1.0


def test_empty_region_gives_nan_prediction_preserved_and_a_warning():
    with pytest.warns(SegHiResCAMWarning, match="empty"):
        scores = masking_scores(LocalNet(2), IMAGE, np.ones((12, 12)), target_class=1, roi=np.zeros((12, 12)),
                                device="cpu")
    assert np.isnan(scores.prediction_preserved) and scores.image_preserved == 1.0


@pytest.mark.parametrize(
    ("heat", "message"),
    [(np.ones((12, 11)), "shape"), (np.full((12, 12), 1.5), "outside"), (np.full((12, 12), np.nan), "NaN"),
     (-np.ones((12, 12)), "outside")],
)
def test_unusable_heatmaps_are_refused_with_a_clear_message(heat, message):
    with pytest.raises(InputError, match=message):
        masking_scores(LocalNet(2), IMAGE, heat, target_class=0, device="cpu")
