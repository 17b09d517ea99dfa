"""The engine's entry points: ``explain``, ``explain_detailed`` and ``explain_with_settings``.

One forward pass records the graph downstream of the chosen layer(s); one
``torch.autograd.grad`` gives the gradient for every gradient method asked for; the maps are
ReLU'd at layer resolution, upsampled to the input grid and normalised by the maximum
over the whole volume. A 2D model over a volume runs slice by slice in batches, and
slices whose region is empty are skipped (their map is zero by definition).

The model runs over the image in one pass or by sliding windows (``settings.sliding_window``,
decided with its memory estimate by ``engine.window_plan``; windows go through
``engine.sliding_window``, exact to the model's fused prediction).

``explain`` and ``explain_detailed`` keep their keyword signatures; each builds one
:class:`~SegHiResCAMLib.settings.ExplainSettings` and runs it through the same path as
:func:`explain_with_settings` (``engine.job``: one loop for every method, Kernel-Weighted
Contribution included).
"""

from __future__ import annotations

import time
import warnings as _warnings
from collections.abc import Sequence

import numpy as np
from torch import nn

from ..errors import InputError, SegHiResCAMWarning
from ..progress import ProgressCallback
from ..settings import AUTO_WINDOW, ExplainSettings
from ..windows import SlidingWindow, window_for_card
from .arrange import region_array
from .capture import check_layers
from .held_model import held_model
from .job import Explanation, explain_samples
from .registry import ENGINE_METHODS, build_methods
from .sliding_window import explain_windows
from .window_plan import WindowPlan, plan_windows

METHOD_NAMES = tuple(ENGINE_METHODS)

__all__ = ["Explanation", "explain", "explain_detailed", "explain_with_settings", "METHOD_NAMES"]


def explain(
    model: nn.Module,
    image,
    *,
    layer: str | Sequence[str] | None = None,
    target_class: int,
    roi=None,
    method: str = "seg-hires-grad-cam",
    target: str = "logits",
    threshold: float = 0.5,
    spatial_dims: int | None = None,
    slice_axis: int | None = None,
    normalize: bool = True,
    relu: bool = True,
    multilabel: bool | None = None,
    probabilities: bool | None = None,
    output_key: int | str | None = None,
    device: str = "auto",
    sliding_window: SlidingWindow | str | None = AUTO_WINDOW,
) -> np.ndarray:
    r"""Class activation map of ``target_class`` over ``roi`` for one image.

    With ``y = sum_p m(p) z_c(p)`` (``m`` the ROI, ``z_c`` the class-c logits) and
    ``G = dy/dA`` at the chosen layer, Seg-HiRes-Grad CAM is ``ReLU(sum_k G_k * A_k)``
    and Seg-Grad CAM ``ReLU(sum_k mean(G_k) A_k)``; see ``engine.methods`` for all.

    Args:
        model: ``torch.nn.Module`` whose output is ``(N, classes, *spatial)``, a TorchScript
            module (``torch.jit.load``), or a ``LoadedModel`` (``load_model``), whose card
            gives what is left as None here (layer, spatial_dims, slice_axis, multilabel,
            probabilities, output_key); the image is used as given, without the card's
            preprocessing (``pipeline.explain_volume`` applies it to volumes). A model in eval
            mode runs exactly as it is (submodules left in training mode stay so); a model
            wholly in training mode runs in eval mode, with a warning. Modes and buffers are
            restored afterwards.
        image: numpy array or tensor ``(channels, *spatial)``.
        layer: a name from ``model.named_modules()``; a list gives the mean of the
            layers' maps, each upsampled and normalised first; None = the model card's.
        target_class: the class c (output channel).
        roi: bool or float array of the image's spatial shape; None = the model's own
            prediction for c (argmax; for one output channel, logit > 0; with the
            probability-threshold target, probability > threshold).
        method: a key of ``METHODS``.
        target: "logits" or "probability-threshold" (``y = sum_p s_c(p) [s_c(p) > t]``).
        threshold: t for the probability-threshold target.
        spatial_dims: the model's spatial dims; 2 with a 3D image applies a 2D model
            slice by slice along ``slice_axis`` (normalised over the whole volume).
        slice_axis: axis of the image's spatial dims to slice along (0, 1 or 2; default 0).
        normalize: divide by the maximum over the whole map (an all-zero map stays zero).
        relu: keep only positive evidence (the methods' definition); False gives the
            signed map, for analysis.
        multilabel: the classes are independent (one sigmoid per channel, e.g. nnU-Net
            region-based models): the predicted region is sigmoid > 0.5 instead of argmax.
        probabilities: the model outputs probabilities (its last layer is a softmax or
            sigmoid), not logits: they are used as they are.
        output_key: for a model returning a tuple, list or dict (deep supervision, UNet++),
            the entry (index or key) that is the segmentation; None = the one entry at the
            input's full resolution (see ``engine.capture.select_output``).
        device: "auto" (CUDA if available), "cpu" or "cuda".
        sliding_window: "auto" (one pass when the memory estimate fits, else the largest window
            that fits; a static-shape program's own shape), a :class:`SlidingWindow` (the map of
            the model's fused sliding-window prediction, ``engine.sliding_window``), or None (one
            pass). A run that does not fit the memory raises NotEnoughMemoryError before the work.

    Returns:
        float32 array of shape ``image.shape[1:]``; all zeros, with a warning, when the
        ROI is empty.

    Example:
        >>> heat = explain(net, ct[None], layer="bottleneck", target_class=1)  # doctest: +SKIP
    """
    result = explain_detailed(
        model, image, layer=layer, target_class=target_class, roi=roi, methods=(method,), target=target,
        threshold=threshold, spatial_dims=spatial_dims, slice_axis=slice_axis, normalize=normalize, relu=relu,
        multilabel=multilabel, probabilities=probabilities, output_key=output_key, device=device,
        sliding_window=sliding_window,
    )
    for message in result.warnings:
        _warnings.warn(message, SegHiResCAMWarning, stacklevel=2)
    return result.heatmap


def explain_detailed(
    model: nn.Module,
    image,
    *,
    layer: str | Sequence[str] | None = None,
    target_class: int,
    roi=None,
    methods: Sequence[str] = ("seg-hires-grad-cam",),
    target: str = "logits",
    threshold: float = 0.5,
    spatial_dims: int | None = None,
    slice_axis: int | None = None,
    normalize: bool = True,
    relu: bool = True,
    multilabel: bool | None = None,
    probabilities: bool | None = None,
    output_key: int | str | None = None,
    device: str = "auto",
    progress: ProgressCallback | None = None,
    batch_size: int | None = None,
    sliding_window: SlidingWindow | str | None = AUTO_WINDOW,
) -> Explanation:
    """Like :func:`explain`, for several methods from one backward pass, with facts about the run.

    ``progress(fraction, message)`` is called after each batch; an exception raised in it
    (``CancelledError``) stops the run with the model and hooks left as they were.
    ``batch_size`` fixes the slices (or windows) per batch (default: sized to the free memory).
    """
    settings = ExplainSettings(
        target_class=target_class, layers=() if layer is None else layer, methods=tuple(methods), target=target,
        target_threshold=threshold, device=str(device), slice_axis=slice_axis, multilabel=multilabel,
        probabilities=probabilities, output_key=output_key, relu=relu, normalize=normalize, batch_size=batch_size,
        sliding_window=sliding_window,
    )
    return explain_with_settings(model, image, settings, roi=roi, spatial_dims=spatial_dims, progress=progress)


def explain_with_settings(
    model: nn.Module,
    image,
    settings: ExplainSettings,
    *,
    roi=None,
    spatial_dims: int | None = None,
    progress: ProgressCallback | None = None,
    plan: WindowPlan | None = None,
) -> Explanation:
    """Explain ``image`` ``(channels, *spatial)`` as ``settings`` say (the engine's own door).

    ``model`` may be a module, a TorchScript module (``torch.jit.load``) or a ``LoadedModel``, whose
    card fills what the settings leave open (layers, a class name, slice axis, multilabel,
    probabilities, output_key) and ``spatial_dims``; the image is used as given, without the card's
    preprocessing (``pipeline.explain_volume`` applies it to volumes). Otherwise ``settings.layers``
    must name at least one layer and ``settings.target_class`` must be an index; None for
    ``slice_axis``, ``multilabel``, ``probabilities`` and ``output_key`` means 0, False, False and
    the one output at full resolution. ``roi`` and ``settings.region`` give the region (see
    ``ExplainSettings.region_kind``).
    ``plan``: the way over the image already decided (``pipeline.explain_volume`` decides it with
    the model card); None decides it here from ``settings.sliding_window`` (``engine.window_plan``,
    with a ``LoadedModel``'s card), refusing before the work a run that does not fit the memory.
    """
    started = time.perf_counter()
    spatial_shape = tuple(np.shape(image))[1:]
    region = region_array(settings, roi, spatial_shape)
    if plan is None:  # (the pipeline decides it with the model card, and shows it itself)
        held = held_model(model)
        settings, spatial_dims = held.settings(settings), held.spatial_dims(spatial_dims, image)
        if not settings.layers:
            raise InputError("no layer was given; pick at least one layer to explain")
        check_layers(held.module, settings.layers)
        card = held.card
        plan = plan_windows(held.module, np.shape(image), settings, spatial_dims=spatial_dims,
                            card_window=None if card is None else window_for_card(card),
                            divisible_by=1 if card is None else card.divisible_by,
                            classes=None if card is None else len(card.class_names) or None)
        if progress is not None:
            progress(0.0, plan.describe())
    if plan.window is None:
        return explain_samples(model, image, settings, build_methods(settings.methods), roi=region,
                               spatial_dims=spatial_dims, progress=progress)
    if not isinstance(settings.target_class, int):
        raise InputError(f"the class {settings.target_class!r} is a name; the engine takes a class index, and "
                         "class names are looked up in the model card (pipeline.explain_volume, the command line)")
    windowed = explain_windows(
        model, image, layers=settings.layers, class_index=settings.target_class, window=plan.window, roi=region,
        methods=settings.methods, target=settings.target, target_threshold=settings.target_threshold,
        slice_axis=0 if settings.slice_axis is None else settings.slice_axis, relu=settings.relu,
        normalize=settings.normalize, multilabel=bool(settings.multilabel), probabilities=bool(settings.probabilities),
        device=settings.device, progress=progress, batch_size=settings.batch_size, output_key=settings.output_key,
    )
    return Explanation(windowed.maps, windowed.device, windowed.roi_voxels, time.perf_counter() - started,
                       windowed.warnings)
