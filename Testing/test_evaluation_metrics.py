"""Oracles for every evaluation metric (issue 11): each value is known exactly or computed another way."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from evaluation_nets import SHAPE, BoxNet, NegativeNet, box_mask, loaded, positive_volume
from SegHiResCAMLib.errors import InputError, SegHiResCAMWarning
from SegHiResCAMLib.evaluation.baselines import blob_map, random_map, region_map
from SegHiResCAMLib.evaluation.cost import measure
from SegHiResCAMLib.evaluation.faithfulness import deletion_insertion
from SegHiResCAMLib.evaluation.localisation import localisation
from SegHiResCAMLib.evaluation.masking import masking_scores_on_volume
from SegHiResCAMLib.evaluation.perturbation import baseline_image, block_order, harmonic_fill, perturb
from SegHiResCAMLib.evaluation.randomisation import (data_randomisation, execution_stages, parameter_randomisation,
                                                     randomised_copy)
from SegHiResCAMLib.evaluation.scoring import RegionScorer, resolve_region
from SegHiResCAMLib.evaluation.similarity import spearman, ssim
from SegHiResCAMLib.evaluation.sparseness import gini
from SegHiResCAMLib.evaluation.statistics import bootstrap_mean, paired_comparison

EPS32 = float(np.finfo(np.float32).eps)
EPS64 = float(np.finfo(np.float64).eps)
N = int(np.prod(SHAPE))  # voxels: the length of the float64 sums below


def box_scorer(score: str = "logits") -> RegionScorer:
    whole = np.ones(SHAPE, bool)
    return RegionScorer(loaded(BoxNet()), positive_volume(), 1, whole, score=score)


# ----------------------------------------------------------------------------- deletion / insertion


def test_box_indicator_has_near_zero_deletion_auc_and_a_random_map_does_not():
    scorer = box_scorer()
    steps = 16
    box = deletion_insertion(scorer, box_mask().astype(np.float32), steps=steps, baseline="zero", block=2)
    # The box is 8 blocks of 2^3, ranked first (32 blocks go per step): the score is gone after step 1, exactly.
    assert box.fractions[0] == 0 and box.fractions[-1] == 1
    # Exact: with the box at 0 every feature is 0, so the score is the all-baseline score itself (0); with the
    # box kept it is the unperturbed score, the same sum of the same values. The fractions are multiples of
    # 2^-12 (4096 voxels), so the trapezoid sums are exact too.
    np.testing.assert_array_equal(box.deletion[1:], 0.0)
    assert box.deletion_auc == box.fractions[1] / 2
    assert box.deletion_auc <= 0.5 / steps
    np.testing.assert_array_equal(box.insertion[1:], 1.0)
    assert box.insertion_auc == 1 - box.fractions[1] / 2
    aucs = [deletion_insertion(scorer, random_map(SHAPE, seed), steps=steps, baseline="zero", block=2).deletion_auc
            for seed in range(5)]
    # A random order removes each of the box's 8 blocks at a uniform random step: AUC about 1/2.
    assert min(aucs) > 5 * box.deletion_auc
    assert 0.3 < float(np.mean(aucs)) < 0.7


def test_deletion_curve_follows_the_share_of_the_box_still_present():
    # With 1-voxel blocks and x constant, y is proportional to the box voxels left: an independent count.
    volume = positive_volume()
    constant = volume.with_array(np.full(SHAPE, 1.5, np.float32))
    scorer = RegionScorer(loaded(BoxNet()), constant, 1, np.ones(SHAPE, bool))
    heat = random_map(SHAPE, 3)
    result = deletion_insertion(scorer, heat, steps=8, baseline="zero", block=1)
    order = np.argsort(-heat.ravel(), kind="stable")
    box_flat = box_mask().ravel()
    for fraction, value in zip(result.fractions, result.deletion):
        removed = order[: int(round(fraction * heat.size))]
        left = 1.0 - box_flat[removed].sum() / box_flat.sum()
        # the box's 64 float32 feature values (3 each) summed: within 64 float32 roundings of the score
        assert value == pytest.approx(left, rel=0, abs=64 * EPS32)


@pytest.mark.parametrize("baseline", ["zero", "mean", "blur", "noise", "impute"])
def test_curves_are_normalised_whatever_the_score_units_and_baseline(baseline):
    for score in ("logits", "probability", "soft-dice"):
        scorer = RegionScorer(loaded(NegativeNet()), positive_volume(), 1, box_mask(), score=score)
        result = deletion_insertion(scorer, blob_map(box_mask()), steps=4, baseline=baseline, block=4)
        assert result.deletion[0] == 1.0 and result.deletion[-1] == 0.0
        assert result.insertion[0] == 0.0 and result.insertion[-1] == 1.0
        assert np.isfinite(result.deletion_auc) and np.isfinite(result.insertion_auc)


def test_baseline_images_come_from_the_images_own_intensities():
    image = positive_volume().array
    constant = np.full(SHAPE, 3.25, np.float32)
    assert np.array_equal(baseline_image(constant, "blur"), constant)  # blurring a constant changes nothing
    assert np.all(baseline_image(image, "mean") == np.float32(image.astype(np.float64).mean()))
    noise = baseline_image(image, "noise", seed=7).astype(np.float64)
    assert abs(noise.mean() - image.mean()) < 4 * image.std() / np.sqrt(image.size)
    # statistical, not rounding: a sample standard deviation of n draws has relative standard error
    # 1 / sqrt(2 n); five of them (the draws are seeded, the same numbers on every machine)
    assert noise.std() == pytest.approx(float(image.std()), rel=5 / np.sqrt(2 * image.size))
    assert np.array_equal(noise, baseline_image(image, "noise", seed=7))  # seeded
    assert not baseline_image(image, "zero").any()


def test_a_model_blind_to_the_removal_gives_nan_with_a_warning():
    scorer = box_scorer()
    flat = scorer.volume.with_array(np.zeros(SHAPE, np.float32))  # zero image: "zero" removes nothing
    blind = RegionScorer(scorer.loaded, flat, 1, scorer.region)
    with pytest.warns(SegHiResCAMWarning, match="does not change"):
        result = deletion_insertion(blind, box_mask().astype(np.float32), steps=2, baseline="zero")
    assert math.isnan(result.deletion_auc) and math.isnan(result.insertion_auc)


def test_bad_inputs_are_refused_before_scoring():
    scorer = box_scorer()
    with pytest.raises(InputError, match="baseline"):
        deletion_insertion(scorer, box_mask(), baseline="black")
    with pytest.raises(InputError, match="shape"):
        deletion_insertion(scorer, np.zeros((4, 4, 4)))
    heat = box_mask().astype(np.float32)
    heat[0, 0, 0] = np.nan
    with pytest.raises(InputError, match="NaN"):
        deletion_insertion(scorer, heat)


def test_block_order_puts_the_hottest_block_first_and_breaks_ties_by_the_seed():
    heat = np.zeros(SHAPE, np.float32)
    heat[13, 2, 9] = 1.0
    labels, order = block_order(heat, 4)
    assert order[0] == labels[13, 2, 9]
    _, first = block_order(np.zeros(SHAPE), 4, seed=0)
    _, second = block_order(np.zeros(SHAPE), 4, seed=1)
    assert sorted(first) == sorted(second) == list(range(64)) and list(first) != list(second)


# ----------------------------------------------------------------------------- imputation


def test_imputer_reproduces_a_linear_ramp_so_the_removed_shape_does_not_show():
    k, j, i = np.meshgrid(*(np.arange(n, dtype=np.float64) for n in SHAPE), indexing="ij")
    ramp = (3.0 * k - 2.0 * j + 0.5 * i + 100.0).astype(np.float32)
    mask = np.zeros(SHAPE, bool)
    mask[3:9, 5:13, 2:7] = True  # an L-shaped hole, away from the borders
    mask[3:5, 5:7, 7:12] = True
    filled = perturb(ramp, mask, "impute")
    # Harmonic interpolation of a linear function is the function itself: no trace of the mask. Conjugate
    # gradients stop at relative residual 1e-8; the hole lies in a 6 x 8 x 10 box, so its Dirichlet
    # Laplacian has eigenvalues between sum_axes 2 (1 - cos(pi / (n + 1))) (interlacing with the box's) and
    # 12 (Gershgorin): the error is within kappa 1e-8 of the solution's 2-norm (at most sqrt(count) times
    # its largest value), then rounded to float32.
    kappa = 12 / sum(2 * (1 - np.cos(np.pi / (n + 1))) for n in (6, 8, 10))
    bound = (kappa * 1e-8 * np.sqrt(mask.sum()) + EPS32) * float(np.abs(ramp).max())
    np.testing.assert_allclose(filled, ramp, rtol=0, atol=bound)
    for leaky in ("zero", "mean"):
        changed = perturb(ramp, mask, leaky) != ramp
        assert np.array_equal(changed, mask)  # a constant fill draws the mask's exact outline


def test_imputer_keeps_kept_voxels_and_solves_the_neighbour_mean_equation():
    rng = np.random.default_rng(1)
    image = rng.random(SHAPE).astype(np.float32)
    mask = rng.random(SHAPE) < 0.3
    filled = harmonic_fill(image, mask).astype(np.float64)
    assert np.array_equal(filled[~mask], image[~mask].astype(np.float64))
    # Each removed voxel equals the mean of its existing face neighbours (the defining equation).
    padded = np.pad(filled, 1)
    exists = np.pad(np.ones(SHAPE), 1)
    sums = np.zeros(SHAPE)
    counts = np.zeros(SHAPE)
    for axis in range(3):
        for step in (1, -1):
            sums += np.roll(padded, step, axis)[1:-1, 1:-1, 1:-1]
            counts += np.roll(exists, step, axis)[1:-1, 1:-1, 1:-1]
    # The residual of that equation is r / degree with |r| <= 1e-8 |b| (conjugate gradients' stopping rule;
    # b sums at most 6 kept values in [0, 1) per removed voxel), plus the float32 rounding of the filled
    # values and of their neighbours' mean.
    residual = 1e-8 * 6 * np.sqrt(mask.sum())
    np.testing.assert_allclose(filled[mask], (sums / counts)[mask], rtol=0, atol=residual + 2 * EPS32)
    assert np.all(harmonic_fill(image, np.ones(SHAPE, bool)) == np.float32(image.astype(np.float64).mean()))


# ----------------------------------------------------------------------------- masking scores


def test_excess_prediction_of_the_identity_mask_is_zero():
    scorer = RegionScorer(loaded(NegativeNet()), positive_volume(), 1, box_mask())
    scores = masking_scores_on_volume(scorer, np.ones(SHAPE, np.float32))
    assert scores.excess_prediction == 0.0
    assert scores.prediction_preserved == 1.0
    assert scores.image_preserved == 1.0


def test_excess_prediction_matches_a_float64_reference():
    volume = positive_volume()
    region = box_mask()
    scorer = RegionScorer(loaded(NegativeNet()), volume, 1, region)
    heat = blob_map(region)
    scores = masking_scores_on_volume(scorer, heat)
    x = volume.array.astype(np.float64)
    original = 1 / (1 + np.exp(x))  # softmax of (0, -x) for class 1 = sigmoid(-x)
    masked = 1 / (1 + np.exp(heat.astype(np.float64) * x))
    expected_excess = np.maximum(masked - original, 0)[region].sum() / original[region].sum()
    expected_preserved = np.minimum(masked, original)[region].sum() / original[region].sum()
    assert expected_excess > 0.05  # darkening raises this class: the masking creates prediction
    # Each float32 probability is within c = 8 eps32 of its float64 value, relatively (the masked logit
    # -a x with a rounded to float32, the product, the sigmoid); EP and PP are float64 sums of such values
    # over the region divided by the original's sum: within c (2 + 2 EP) and 3 c.
    c = 8 * EPS32
    assert scores.excess_prediction == pytest.approx(expected_excess, rel=0, abs=c * (2 + 2 * expected_excess))
    assert scores.prediction_preserved == pytest.approx(expected_preserved, rel=0, abs=3 * c)
    # a float64 mean of N values in [0, 1] in another order: within N eps64
    assert scores.image_preserved == pytest.approx(float(heat.astype(np.float64).mean()), rel=N * EPS64)


# ----------------------------------------------------------------------------- randomisation


def _unet_case(tmp_path: Path):
    from tiny_models import save_tiny_unet
    from SegHiResCAMLib.models.loading import load_model

    model = load_model(save_tiny_unet(tmp_path, channels=(4, 8)))
    k, j, i = np.meshgrid(*(np.arange(16) for _ in range(3)), indexing="ij")
    ball = ((k - 8) ** 2 + (j - 7) ** 2 + (i - 9) ** 2 < 25).astype(np.float32)
    volume = positive_volume().with_array(ball * 2.0 + 0.1 * positive_volume(1).array)
    return model, volume


@pytest.mark.parametrize("method", ["seg-grad-cam", "seg-hires-grad-cam"])
def test_randomising_the_whole_model_changes_a_gradient_map(tmp_path, method):
    from SegHiResCAMLib.engine.explain import explain

    model, volume = _unet_case(tmp_path)
    region = np.zeros(SHAPE, bool)
    region[6:11, 5:10, 7:12] = True
    image = volume.array[None]
    before = {name: value.clone() for name, value in model.module.state_dict().items()}

    def map_of(module):
        return explain(module, image, layer="bottleneck", target_class=2, roi=region, method=method)

    probe = torch.from_numpy(image[None].copy())
    trained = map_of(model.module)
    result = parameter_randomisation(model.module, probe, map_of, points=None, seed=0)
    stages = execution_stages(model.module, probe)
    assert stages[0][0] == "head" and stages[-1][0] == "encoder.0"
    assert result.stages == tuple(name for name, _ in stages)
    randomised = map_of(randomised_copy(model.module, [m for _, group in stages for m in group], seed=0))
    assert float(np.abs(randomised - trained).max()) > 0.2
    assert result.ssim[-1] < 0.8
    if method == "seg-grad-cam":
        assert result.spearman[-1] < 0.5
    # The trained model is left exactly as it was: same weights, no hooks.
    after = model.module.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert all(not module._forward_hooks for module in model.module.modules())
    # Randomising nothing is the identity of the comparison.
    # the same map twice: SSIM is exactly 1 and Spearman within 4 eps64 of it (see the similarity test)
    assert data_randomisation(trained, map_of(model.module)) == (pytest.approx(1.0, rel=0, abs=4 * EPS64), 1.0)


def test_randomised_copy_reinitialises_only_the_named_modules(tmp_path):
    model, _ = _unet_case(tmp_path)
    copy = randomised_copy(model.module, ["head"], seed=0)
    trained, changed = model.module.state_dict(), copy.state_dict()
    assert not torch.equal(trained["head.weight"], changed["head.weight"])
    assert all(torch.equal(trained[name], changed[name]) for name in trained if not name.startswith("head."))


# ----------------------------------------------------------------------------- similarity, sparseness


def test_identical_maps_have_spearman_and_ssim_one_and_reversed_maps_minus_one():
    heat = random_map(SHAPE, 4)
    # Identical (or exactly reversed) whole-number ranks: s / sqrt(s * s) for one sum s, rounded in the
    # product, the root and the division: within 4 eps64 of 1. SSIM is exactly 1: the numerator and the
    # denominator of every local index are the same float64 operations (2 x y = x^2 + y^2 for x = y),
    # and the mean of ones is 1.
    assert spearman(heat, heat) == pytest.approx(1.0, rel=0, abs=4 * EPS64)
    assert ssim(heat, heat) == 1.0
    assert spearman(heat, heat.astype(np.float64) ** 3) == pytest.approx(1.0, rel=0, abs=4 * EPS64)  # ranks only
    assert spearman(heat, 1.0 - heat) == pytest.approx(-1.0, rel=0, abs=4 * EPS64)
    assert ssim(heat, random_map(SHAPE, 5)) < 0.1
    assert math.isnan(spearman(heat, np.zeros(SHAPE)))


def test_gini_of_a_one_hot_map_and_of_a_constant_map():
    one_hot = np.zeros(SHAPE)
    one_hot[3, 4, 5] = 0.7
    n = one_hot.size
    assert gini(one_hot) == 1 - 1 / n  # exact: one term, 0.7 / 0.7 * 0.5 / 4096, dyadic
    # a float64 sum of n shares (adding up to about 1/2) times 2: within 2 n eps64
    assert gini(np.full(SHAPE, 0.3)) == pytest.approx(0.0, rel=0, abs=2 * n * EPS64)
    # Half zeros, half ones: G = 1/2 (from the definition, summed by hand).
    assert gini(np.repeat([0.0, 1.0], 50)) == pytest.approx(0.5, rel=0, abs=2 * 100 * EPS64)
    assert math.isnan(gini(np.zeros(SHAPE)))


# ----------------------------------------------------------------------------- localisation


def test_pointing_game_and_energy_on_a_blob_centred_in_a_box():
    region = np.zeros(SHAPE, bool)
    region[5:11, 4:12, 6:10] = True
    blob = blob_map(region).astype(np.float64)
    where = localisation(blob, region, band_mm=0.0)
    assert where.pointing_hit == 1.0
    # The blob is separable: its mass in the box is the product of per-axis shares (independent sums).
    shares = []
    for axis, span in enumerate((slice(5, 11), slice(4, 12), slice(6, 10))):
        coordinates = np.argwhere(region)[:, axis].astype(np.float64)
        profile = np.exp(-0.5 * ((np.arange(SHAPE[axis]) - coordinates.mean()) / coordinates.std()) ** 2)
        shares.append(profile[span].sum() / profile.sum())
    # The blob is float64 exponentials rounded to float32 (eps32 / 2 each): a ratio of two sums of them
    # is within eps32 of the float64 shares, plus float64 sums of N terms (N eps64 each).
    assert where.energy_pointing == pytest.approx(np.prod(shares), rel=EPS32 + 2 * N * EPS64)
    # a box region is its own box: the same share summed another way, and every voxel within 100 mm
    assert where.mass_inside == pytest.approx(where.energy_pointing, rel=2 * N * EPS64)
    assert localisation(blob, region, band_mm=100.0).mass_band == pytest.approx(1.0, rel=0, abs=2 * N * EPS64)


def test_pointing_misses_a_blob_far_from_the_region_and_the_band_is_in_millimetres():
    region = np.zeros(SHAPE, bool)
    region[2:4, 2:4, 2:4] = True
    far = np.zeros(SHAPE)
    far[12, 12, 12] = 1.0
    assert localisation(far, region, band_mm=5.0).pointing_hit == 0.0
    # 8.5 voxels of 2 mm along each axis from the nearest region voxel: 14.7 voxels = 29.4 mm.
    distance = 2.0 * math.sqrt(3 * 9 ** 2)
    assert localisation(far, region, spacing_kji=(2.0, 2.0, 2.0), band_mm=distance + 0.01).pointing_hit == 1.0
    assert localisation(far, region, spacing_kji=(2.0, 2.0, 2.0), band_mm=distance - 0.01).pointing_hit == 0.0
    with pytest.raises(InputError, match="empty"):
        localisation(far, np.zeros(SHAPE, bool))


def test_region_and_blob_baselines():
    region = box_mask()
    assert np.array_equal(region_map(region), region.astype(np.float32))
    blob = blob_map(region)
    coordinates = np.argwhere(region).astype(np.float64)
    centre, spread = coordinates.mean(axis=0), coordinates.std(axis=0)
    weights = blob.astype(np.float64)
    centroid = (np.argwhere(np.ones(SHAPE, bool)) * weights.ravel()[:, None]).sum(axis=0) / weights.sum()
    # The blob is separable, so along each axis its centroid is that of the 1D Gaussian (the region's mean
    # and spread) truncated at the volume's edges; the float32 rounding of the weights (eps32 / 2 each)
    # moves a centroid by at most eps32 times the largest index.
    truncated = []
    for axis, size in enumerate(SHAPE):
        index = np.arange(size, dtype=np.float64)
        profile = np.exp(-0.5 * ((index - centre[axis]) / spread[axis]) ** 2)
        truncated.append((index * profile).sum() / profile.sum())
    np.testing.assert_allclose(centroid, truncated, rtol=0, atol=2 * EPS32 * max(SHAPE))
    assert blob.max() <= 1.0


# ----------------------------------------------------------------------------- region, statistics, cost


def test_region_defaults_to_the_models_own_prediction():
    volume = positive_volume()
    model = loaded(NegativeNet())
    region = resolve_region(model, volume, 0)  # (0, -x) with x > 0: class 0 wins everywhere
    assert region.all()
    assert not resolve_region(model, volume, 1).any()
    given = box_mask()
    assert np.array_equal(resolve_region(model, volume, 1, given), given)


def test_paired_comparison_exact_wilcoxon_and_bootstrap():
    a = np.array([3.0, 5.0, 2.0, 8.0, 4.0, 6.0])
    b = a - np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    result = paired_comparison(a, b)
    # all six differences positive, exact test: a sum of a few dyadic probabilities, within a few eps64
    assert result.wilcoxon_p == pytest.approx(2 / 2 ** 6, rel=8 * EPS64)
    assert result.difference.mean == 3.5  # exact: 21 / 6
    assert 1.0 <= result.difference.low < 3.5 < result.difference.high <= 6.0
    constant = bootstrap_mean([0.25] * 5)
    assert constant.mean == constant.low == constant.high == 0.25
    assert math.isnan(paired_comparison([1.0], [0.0]).wilcoxon_p)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="peak memory needs Linux's /proc")
def test_cost_sees_a_large_allocation():
    def allocate():
        block = np.ones(64 * 2 ** 20 // 8 * 4)  # 256 MiB, touched
        return float(block[-1])

    value, cost = measure(allocate)
    assert value == 1.0 and cost.seconds >= 0.0
    assert cost.peak_mib >= 200.0
