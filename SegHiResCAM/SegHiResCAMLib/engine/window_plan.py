"""How a run goes over the image, decided before the work: one pass or sliding windows, and whether
it fits the memory.

``ExplainSettings.sliding_window`` is "auto", a :class:`~SegHiResCAMLib.windows.SlidingWindow` or
None (one pass). :func:`plan_windows` turns it into a :class:`WindowPlan`: the window the engine
runs (or None) and the memory estimate (``engine.memory``) it was chosen with. "auto" tiles like
the model's own inference (the card's patch size, or the fixed input shape of a static-shape
program); otherwise one pass when the one-pass estimate fits the device, else the largest cubic
window that fits. A plan that does not fit, whichever way it was asked for, is refused here with
the estimate and the ways out, before any long work.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .. import catalog
from ..errors import NotEnoughMemoryError
from ..settings import AUTO_WINDOW, ExplainSettings
from ..windows import SlidingWindow
from .capture import segmentation_output
from .device import prepared_model, resolve_device
from .memory import MemoryEstimate, auto_window, estimate_whole_volume, estimate_windows
from .tiling import tile_starts


@dataclass(frozen=True)
class WindowPlan:
    """The way one run goes over the image.

    Attributes:
        window: the tiling the engine runs (a full patch, one size per model axis), or None for one pass.
        estimate: the memory estimate of that way, or None where none was needed (a 2D model over a
            volume in one pass runs slices in batches sized to the free memory).
        windows: how many windows the tiling has (0 for one pass).
    """

    window: SlidingWindow | None
    estimate: MemoryEstimate | None = None
    windows: int = 0

    def describe(self) -> str:
        """E.g. "estimated peak about 1.2 GB of 15.6 GB available on the CPU; 64 windows of 96x96x96"."""
        way = "one pass over the whole image" if self.window is None else \
            f"{self.windows} window{'s' if self.windows != 1 else ''} of {self.window.describe()}"
        return way if self.estimate is None else f"estimated peak {self.estimate.describe()}; {way}"


def window_count(spatial: Sequence[int], window: SlidingWindow) -> int:
    """Windows of ``window`` over an image of ``spatial`` (a 2D patch over a volume: per slice)."""
    dims = window.spatial_dims
    planes = math.prod(spatial[: len(spatial) - dims])  # the slices of a 2D model over a volume
    tiled = [max(s, p) for s, p in zip(spatial[len(spatial) - dims:], window.patch_size)]
    return planes * math.prod(len(starts) for starts in tile_starts(tiled, window.patch_size, window.step))


def plan_windows(model: nn.Module, image_shape: Sequence[int], settings: ExplainSettings, *,
                 card_window: SlidingWindow | None = None, divisible_by: int = 1, spatial_dims: int | None = None,
                 classes: int | None = None) -> WindowPlan:
    """The plan for ``settings.sliding_window`` on an image of ``image_shape`` ``(C, *spatial)``.

    Args:
        model: the network (its memory is probed on a small input).
        image_shape: the image on the model's grid.
        settings: resolved for the engine (layers named).
        card_window: the model card's own tiling (``windows.window_for_card``), if it has one.
        divisible_by: the multiple the model's input sizes must be (the card's).
        spatial_dims: the model's spatial dims (2 for a 2D model over a volume); None = the image's.
        classes: the model's output channels, when known (else one small forward tells).

    Raises:
        NotEnoughMemoryError: the chosen (or forced) way does not fit the device's available memory.
        InputError: a patch with another number of axes than the model.
    """
    shape = tuple(int(s) for s in image_shape)
    spatial = shape[1:]
    dims = spatial_dims or len(spatial)
    layers = list(settings.layers)
    methods = len(settings.methods)
    device = str(resolve_device(settings.device))
    choice = settings.sliding_window
    whole_only = any(not catalog.method(name).gradient for name in settings.methods)
    sliced = dims < len(spatial)  # a 2D model over a volume

    def on_windows(window: SlidingWindow) -> WindowPlan:
        estimate = estimate_windows(model, shape, layers=layers, classes=_classes(model, shape, dims, classes, divisible_by, settings.output_key),
                                    window=window, methods=methods, batch_size=1,
                                    default_region=settings.region in (None, "prediction", "point"),
                                    target=settings.target, divisible_by=divisible_by, device=device,
                                    output_key=settings.output_key)
        return _fitting(WindowPlan(window, estimate, window_count(spatial, window)))

    if isinstance(choice, SlidingWindow):
        return on_windows(choice.for_dims(dims))
    if choice == AUTO_WINDOW and not whole_only:
        own = _static_window(model, dims) or (card_window.for_dims(dims) if card_window is not None else None)
        if own is not None and tuple(spatial[len(spatial) - dims:]) != own.patch_size:
            return on_windows(own)
        # an image of exactly the patch is one window of weights that cancel: one pass is the same run
        if not sliced:
            window, estimate = auto_window(model, shape, layers=layers, methods=methods, divisible_by=divisible_by,
                                           device=device, classes=classes or 2, output_key=settings.output_key)
            if window is None:
                return WindowPlan(None, estimate)
            return on_windows(window)  # the classes now counted, not guessed
    if sliced:
        return WindowPlan(None)  # slices run in batches sized to the free memory
    estimate = estimate_whole_volume(model, shape, layers=layers, classes=classes or 0, methods=methods,
                                     divisible_by=divisible_by, device=device, output_key=settings.output_key)
    return _fitting(WindowPlan(None, estimate))


def _fitting(plan: WindowPlan) -> WindowPlan:
    estimate = plan.estimate
    if estimate is None or estimate.fits:
        return plan
    if plan.window is None:
        way = "one pass over the whole image"
        out = "sliding windows (leave the windows on auto, or give a patch size)"
    else:
        way = f"{plan.windows} windows of {plan.window.describe()}"
        out = "a smaller patch size"
    raise NotEnoughMemoryError(
        f"this explanation ({way}) needs an estimated {estimate.describe()}, more than fits; explain a smaller crop "
        f"of the image, a shallower layer, or {out}"
    )


def _static_window(model: nn.Module, dims: int) -> SlidingWindow | None:
    """A static-shape program's own input size as the window (it runs on nothing else)."""
    fixed = getattr(model, "fixed_spatial_shape", None)
    if fixed is None or len(fixed) != dims:
        return None
    return SlidingWindow(tuple(fixed))


def _classes(model: nn.Module, shape: tuple[int, ...], dims: int, known: int | None, divisible_by: int,
             output_key: int | str | None) -> int:
    """The model's output channels: ``known``, else from one forward on a small zero input."""
    if known:
        return int(known)
    from .memory import _model_dtype, _probe_shape

    spatial = _probe_shape(shape[len(shape) - dims:], divisible_by)
    accepted = getattr(model, "accepted_shape", None)
    probe_shape = (1, shape[0], *spatial) if accepted is None else tuple(accepted((1, shape[0], *spatial)))
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    probe = torch.zeros(probe_shape, dtype=_model_dtype(model), device=device)
    with prepared_model(model, device), torch.inference_mode():
        return int(segmentation_output(model(probe), probe, 0, output_key).shape[1])
