"""The model's own score for a region, recomputed on (perturbed) images through the explanation's path.

Every faithfulness metric asks one question: what does the model say about the region when the
image changes? :class:`RegionScorer` answers it the way the explanation was computed: the
volume goes through the model card's preprocessing (:func:`models.preprocess.prepare_input`),
the model runs on its own grid (2D models slice by slice), and the target is read on the output
grid with the region mapped there:

- ``"logits"`` (default, the explanation's own target): ``y = sum_p m(p) z_c(p)``;
- ``"probability"``: ``y = sum_p m(p) s_c(p)`` (softmax, or sigmoid for one channel / multi-label);
- ``"soft-dice"``: ``y = 2 sum_p m(p) s_c(p) / (sum_p m(p) + sum_p s_c(p))``.

The region is fixed once, on the unperturbed image (a given mask, or the model's own prediction),
and never follows the perturbed prediction. :meth:`RegionScorer.model_outputs` is the ONE place
that runs the model on an input: with a sliding window (the explanation's, ``engine.window_plan``)
it reads the model's fused sliding-window logits (``engine.sliding_window.predict``), the
prediction the windowed explanation explains. The region comes from the pipeline's one prediction
function (``pipeline.predicted_region_on_volume``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..errors import InputError
from ..volume import Volume
from ..windows import SlidingWindow

if TYPE_CHECKING:
    from ..models.loading import LoadedModel

SCORES = ("logits", "probability", "soft-dice")


@dataclass(frozen=True)
class RegionScorer:
    """Scores images with one model, one class and one fixed region (all on the volume's grid).

    Attributes:
        loaded: the model and its card (:class:`models.loading.LoadedModel`).
        volume: the unperturbed image; perturbed images share its geometry.
        class_index: the class c.
        region: bool mask of ``volume.spatial_shape`` (see :func:`resolve_region`).
        score: one of ``SCORES``.
        device: "auto", "cpu" or "cuda".
        sliding_window: the explanation's window (a full patch, ``WindowPlan.window``), or None for one pass.
    """

    loaded: LoadedModel
    volume: Volume
    class_index: int
    region: np.ndarray
    score: str = "logits"
    device: str = "cpu"
    sliding_window: SlidingWindow | None = None

    def __post_init__(self) -> None:
        if self.score not in SCORES:
            raise InputError(f"score {self.score!r} is unknown; choose one of {', '.join(SCORES)}")
        region = np.asarray(self.region)
        if region.shape != self.volume.spatial_shape:
            raise InputError(f"the region has shape {region.shape} but the image has {self.volume.spatial_shape}; "
                             "give a mask on the image's voxel grid")
        object.__setattr__(self, "region", region.astype(bool))

    def __call__(self, arrays: Iterable[np.ndarray]) -> np.ndarray:
        """The score of each image (float64), in order; arrays have the volume's shape."""
        return np.array([self.score_one(array) for array in arrays], dtype=np.float64)

    def score_one(self, array: np.ndarray) -> float:
        """The region's score on one image of the volume's shape."""
        from ..models.preprocess import prepare_input

        array = np.asarray(array)
        if array.shape != self.volume.array.shape:
            raise InputError(f"the perturbed image has shape {array.shape}, not the image's {self.volume.array.shape}")
        prepared = prepare_input(self.volume.with_array(array), self.loaded.card)
        region = np.asarray(prepared.roi_to_model(self.region)).astype(bool)
        output, region_out = self.model_outputs(prepared.image, region)
        return _region_score(output, region_out, self.class_index, self.score, self.loaded.card)

    def model_outputs(self, image: np.ndarray, region: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the model on a model-grid image ``(C, *spatial)``: outputs ``(S, classes, *out)`` in float64
        and the region ``(S, *out)`` on the output grid (S = 1 for 3D models, slices for 2D ones)."""
        from ..engine.capture import segmentation_output
        from ..engine.device import prepared_model, resolve_device
        from ..engine.arrange import arrange_samples, image_tensor
        from ..engine.targets import roi_on_output_grid

        card, model = self.loaded.card, self.loaded.module
        if self.sliding_window is not None:  # the fused logits, on the model's grid like the region
            from ..engine.sliding_window import predict

            fused = predict(model, image, sliding_window=self.sliding_window, device=self.device,
                            slice_axis=card.slice_axis, output_key=card.output_key)
            return torch.from_numpy(fused)[None].to(torch.float64), torch.as_tensor(np.asarray(region))[None]
        samples, roi_t, _ = arrange_samples(image_tensor(image, model), region, card.spatial_dims, card.slice_axis)
        device = resolve_device(self.device)
        outputs, regions = [], []
        with prepared_model(model, device), torch.inference_mode():
            # One sample at a time: perturbed volumes are scored by the dozen, so memory, not speed, limits.
            for index in range(samples.shape[0]):
                batch = samples[index:index + 1].to(device)
                output = segmentation_output(model(batch), batch, self.class_index, card.output_key)
                outputs.append(output.to(torch.float64).cpu())
                regions.append(roi_on_output_grid(roi_t[index:index + 1].to(device), tuple(output.shape[2:])).cpu())
        return torch.cat(outputs), torch.cat(regions)


def _region_score(output: torch.Tensor, region: torch.Tensor, class_index: int, score: str, card) -> float:
    from ..engine.targets import class_probabilities

    weights = region.to(torch.float64)
    if score == "logits":
        return float((output[:, class_index] * weights).sum())
    probability = class_probabilities(output, card.multilabel, card.outputs == "probabilities")[:, class_index]
    if score == "probability":
        return float((probability * weights).sum())
    denominator = float(weights.sum() + probability.sum())
    return 2.0 * float((probability * weights).sum()) / denominator if denominator > 0 else float("nan")


def resolve_region(loaded, volume: Volume, class_index: int, roi: np.ndarray | None = None,
                   device: str = "cpu", sliding_window: SlidingWindow | None = None) -> np.ndarray:
    """The region on the volume's grid: ``roi`` as a bool mask, or the model's own prediction of the class.

    The prediction (argmax == c; logit > 0 for one channel or multi-label models; on the fused
    logits with ``sliding_window``) is the pipeline's (``pipeline.predicted_region_on_volume``):
    mapped back from the model's grid with the explanation's inverse mapping and kept where it
    covers at least half a voxel.

    Raises:
        InputError: the ROI has the wrong shape.
    """
    from ..models.preprocess import prepare_input
    from ..pipeline import predicted_region_on_volume
    from ..settings import ExplainSettings

    if roi is not None:
        roi = np.asarray(roi)
        if roi.shape != volume.spatial_shape:
            raise InputError(f"the ROI has shape {roi.shape} but the image has {volume.spatial_shape}; "
                             "give a mask on the image's voxel grid")
        return roi.astype(bool)
    card = loaded.card
    settings = ExplainSettings(target_class=class_index, device=device, slice_axis=card.slice_axis,
                               multilabel=card.multilabel, probabilities=card.outputs == "probabilities",
                               output_key=card.output_key)
    return predicted_region_on_volume(loaded, prepare_input(volume, card), settings, card, sliding_window)
