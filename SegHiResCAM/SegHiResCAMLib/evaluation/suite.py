"""Every metric for every method and layer on one case: the long table and what the report draws.

One case = one image, one model, one class and one region. For each layer the methods' maps
are computed through the pipeline (the same call the command line makes), each timed on its
own; the baseline maps (:mod:`baselines`) join them; then each map gets every metric. Rows are
``(case, method, layer, metric, value)``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from ..settings import AUTO_WINDOW
from ..volume import Volume
from ..windows import SlidingWindow
from .baselines import BASELINE_MAPS, baseline_map
from .cost import measure
from .faithfulness import DeletionInsertion, deletion_insertion, end_scores
from .localisation import localisation
from .masking import masking_scores_on_volume
from .randomisation import Randomisation, compare, parameter_randomisation
from .scoring import RegionScorer, resolve_region
from .sparseness import gini

# metric -> (which way is better, what it means); the report's legend and the README's table.
METRICS: dict[str, tuple[str, str]] = {
    "deletion_auc": ("lower", "area under the deletion curve: the region's score as the most relevant voxels go"),
    "insertion_auc": ("higher", "area under the insertion curve: the score as the most relevant voxels come back"),
    "prediction_preserved": ("higher", "share of the region's prediction kept when the image is masked by the map"),
    "image_preserved": ("lower", "share of the image the map keeps (mean map value)"),
    "excess_prediction": ("lower", "prediction the masked image has and the original had not, per unit of prediction"),
    "mass_inside": ("higher", "share of the map's total inside the region"),
    "mass_band": ("higher", "share of the map's total within the band around the region"),
    "energy_pointing": ("higher", "share of the map's total inside the region's bounding box"),
    "pointing_hit": ("higher", "1 if the hottest voxel lies within the band around the region"),
    "gini": ("higher", "sparseness of the map (Gini index; 0 = flat)"),
    "randomisation_spearman": ("lower", "rank correlation with the map of the fully randomised model"),
    "randomisation_ssim": ("lower", "SSIM with the map of the fully randomised model"),
    "data_randomisation_spearman": ("lower", "rank correlation with the map of a model trained on permuted labels"),
    "data_randomisation_ssim": ("lower", "SSIM with the map of a model trained on permuted labels"),
    "seconds": ("lower", "wall-clock seconds to compute the map"),
    "peak_mib": ("lower", "peak memory the computation added (MiB)"),
}


@dataclass(frozen=True)
class EvaluationSettings:
    """The choices of one evaluation, declared once.

    Attributes:
        methods: CAM methods (``SegHiResCAMLib.METHODS`` names or kernel-weighted-contribution).
        baselines: baseline maps to score beside them (``baselines.BASELINE_MAPS``).
        steps, baseline, block, sigma: deletion/insertion settings (:func:`faithfulness.deletion_insertion`).
        score: the region's score (:data:`scoring.SCORES`).
        band_mm: width of the band around the region for localisation (mm).
        randomisation_points: cascade points of the parameter randomisation (0 = skip it).
        randomised: methods that get the randomisation check; None = every method except
            kernel-weighted-contribution, whose 2K forward passes per point make it the costliest
            (its randomisation values are then NaN).
        seed: seed of every random choice (ties, noise, random map, re-initialisation).
        device: "auto", "cpu" or "cuda".
        sliding_window: as ``ExplainSettings.sliding_window`` ("auto", a SlidingWindow or None): decided
            once per case (``pipeline.window_plan``) for the region, every map and every perturbed score.
    """

    methods: tuple[str, ...] = ("seg-hires-grad-cam", "seg-grad-cam")
    baselines: tuple[str, ...] = BASELINE_MAPS
    steps: int = 20
    baseline: str = "blur"
    block: int = 4
    sigma: float = 5.0
    score: str = "logits"
    band_mm: float = 10.0
    randomisation_points: int = 4
    randomised: tuple[str, ...] | None = None
    seed: int = 0
    device: str = "cpu"
    sliding_window: SlidingWindow | str | None = AUTO_WINDOW


@dataclass
class CaseResult:
    """What one case produced: rows of the long table, and the maps and curves the report draws."""

    case: str
    image: Volume
    region: np.ndarray
    rows: list[tuple[str, str, str, str, float]] = field(default_factory=list)
    maps: dict[tuple[str, str], np.ndarray] = field(default_factory=dict)
    curves: dict[tuple[str, str], DeletionInsertion] = field(default_factory=dict)
    randomisation: dict[tuple[str, str], Randomisation] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def evaluate_case(loaded, volume: Volume, *, case: str, target_class: int, layers: Sequence[str],
                  roi: np.ndarray | None = None, settings: EvaluationSettings = EvaluationSettings(),
                  random_labels_model=None,
                  progress: Callable[[float, str], None] | None = None) -> CaseResult:
    """Compute every metric of every method and baseline map at every layer for one case.

    Args:
        loaded: the model and its card (:func:`SegHiResCAMLib.load_model`).
        volume: the image.
        case: the case's name in the table.
        target_class: class index (already resolved against the card).
        layers: layers to explain, each on its own.
        roi: region mask on the image grid; None = the model's own prediction of the class.
        settings: :class:`EvaluationSettings`.
        random_labels_model: a LoadedModel trained on permuted labels (data randomisation), or None.
        progress: ``progress(fraction, message)``.

    Raises:
        InputError: an empty region, unknown method or layer, or a bad setting.
    """
    from ..errors import InputError
    from ..pipeline import explain_volume

    window = _window(loaded, volume, target_class, layers, settings)
    region = resolve_region(loaded, volume, target_class, roi, settings.device, window)
    if not region.any():
        raise InputError(f"the region of class {target_class} is empty in {case}: the model predicts none of it "
                         "there; give a region (--roi) or choose a class that is present")
    scorer = RegionScorer(loaded, volume, target_class, region, settings.score, settings.device, window)
    result = CaseResult(case, volume, region)
    spacing_kji = tuple(float(s) for s in volume.spacing[::-1])
    probe = _probe(loaded, volume)
    total = max(len(layers) * (len(settings.methods) + len(settings.baselines)), 1)
    ends = end_scores(scorer, settings.baseline, sigma=settings.sigma, seed=settings.seed)
    randomised = settings.randomised
    if randomised is None:
        randomised = tuple(m for m in settings.methods if m != "kernel-weighted-contribution")
    done = 0

    def add(method: str, layer: str, metric: str, value: float) -> None:
        result.rows.append((case, method, layer, metric, float(value)))

    for layer in layers:
        def map_of(module, method: str, layer: str = layer) -> np.ndarray:
            maps, explanation = explain_volume(dataclasses.replace(loaded, module=module), volume,
                                               target_class=target_class, roi=region, layers=(layer,),
                                               methods=(method,), device=settings.device, sliding_window=window)
            result.warnings.extend(explanation.warnings)
            return maps[method].array

        maps: dict[str, np.ndarray] = {}
        for method in settings.methods:
            maps[method], cost = measure(lambda method=method: map_of(loaded.module, method), settings.device)
            add(method, layer, "seconds", cost.seconds)
            add(method, layer, "peak_mib", cost.peak_mib)
        for name in settings.baselines:
            maps[name], cost = measure(lambda name=name: baseline_map(name, region, settings.seed), "cpu")
            add(name, layer, "seconds", cost.seconds)
            add(name, layer, "peak_mib", cost.peak_mib)
        for method, heat in maps.items():
            if progress is not None:
                progress(done / total, f"{case}: scoring {method} at {layer}")
            result.maps[(layer, method)] = heat
            curves = deletion_insertion(scorer, heat, steps=settings.steps, baseline=settings.baseline,
                                        block=settings.block, sigma=settings.sigma, seed=settings.seed, ends=ends)
            result.curves[(layer, method)] = curves
            add(method, layer, "deletion_auc", curves.deletion_auc)
            add(method, layer, "insertion_auc", curves.insertion_auc)
            masked = masking_scores_on_volume(scorer, heat)
            add(method, layer, "prediction_preserved", masked.prediction_preserved)
            add(method, layer, "image_preserved", masked.image_preserved)
            add(method, layer, "excess_prediction", masked.excess_prediction)
            where = localisation(heat, region, spacing_kji=spacing_kji, band_mm=settings.band_mm)
            for metric in ("mass_inside", "mass_band", "energy_pointing", "pointing_hit"):
                add(method, layer, metric, getattr(where, metric))
            add(method, layer, "gini", gini(heat))
            if settings.randomisation_points and (method in randomised or method not in settings.methods):
                if method in settings.methods:
                    checked = parameter_randomisation(loaded.module, probe,
                                                      lambda module, method=method: map_of(module, method),
                                                      points=settings.randomisation_points, seed=settings.seed,
                                                      reference=heat)
                else:  # a baseline map does not depend on the model: it is its own randomised map
                    rho, index = compare(heat, heat)
                    checked = Randomisation(("whole model",), (rho,), (index,))
                result.randomisation[(layer, method)] = checked
                add(method, layer, "randomisation_spearman", checked.spearman[-1])
                add(method, layer, "randomisation_ssim", checked.ssim[-1])
            elif settings.randomisation_points:
                add(method, layer, "randomisation_spearman", float("nan"))
                add(method, layer, "randomisation_ssim", float("nan"))
            if random_labels_model is not None:
                other = map_of(random_labels_model.module, method) if method in settings.methods else heat
                rho, index = compare(heat, other)
                add(method, layer, "data_randomisation_spearman", rho)
                add(method, layer, "data_randomisation_ssim", index)
            done += 1
    if progress is not None:
        progress(1.0, f"{case}: done")
    result.warnings = list(dict.fromkeys(result.warnings))
    return result


def _probe(loaded, volume: Volume):
    """One model input ``(1, C, *spatial)`` of this case (the first slice for 2D models)."""
    from ..engine.arrange import arrange_samples, image_tensor
    from ..models.preprocess import prepare_input

    prepared = prepare_input(volume, loaded.card)
    samples, _, _ = arrange_samples(image_tensor(prepared.image, loaded.module), None, loaded.card.spatial_dims,
                             loaded.card.slice_axis)
    return samples[samples.shape[0] // 2:samples.shape[0] // 2 + 1]


def _window(loaded, volume: Volume, target_class: int, layers: Sequence[str],
            settings: EvaluationSettings) -> SlidingWindow | None:
    """The case's way over the image (``pipeline.window_plan``), decided once for every map and score."""
    from ..models.preprocess import prepare_input
    from ..pipeline import settings_for_model, window_plan
    from ..settings import ExplainSettings

    explain_settings = settings_for_model(ExplainSettings(
        target_class=target_class, layers=tuple(layers[:1]), methods=settings.methods, device=settings.device,
        sliding_window=settings.sliding_window), loaded.card)
    return window_plan(loaded, prepare_input(volume, loaded.card), explain_settings, loaded.card).window
