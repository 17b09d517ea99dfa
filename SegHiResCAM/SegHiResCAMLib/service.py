"""The application service: one request in, heatmap files (or a layer list) and a result out.

:func:`run_request` is the single path from files to heatmaps that every door runs: the command
line (in its own process), the demo, the worker process that the Slicer panel starts, and later
the cohort runner. It reads the image files (one per model input channel) and the region, checks
the outputs before any long work, loads the model, runs :func:`~SegHiResCAMLib.pipeline.explain_volume`
with the request's :class:`~SegHiResCAMLib.settings.ExplainSettings`, and writes one heatmap file
per method. A "layers" request lists the model's layers instead.

Importing this module does not import torch (the command line's ``--help`` stays fast); the run does.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .errors import InputError, InternalError, SegHiResCAMError
from .progress import ProgressCallback
from .settings import ExplainSettings
from .volume import Volume
from .warning_relay import distinct, relayed_warnings
from .worker.protocol import ExplainRequest, LayersRequest, Request

WarnCallback = Callable[[str], None]

# File types a heatmap is written as; the longest match wins (".nii.gz" before ".gz").
HEATMAP_SUFFIXES = (".nii.gz", ".nrrd", ".nhdr", ".nii", ".mha", ".mhd", ".png")


@dataclass(frozen=True)
class ExplainResult:
    """What an explain request produced.

    Attributes:
        image: the image as read (channels stacked on the first image's grid).
        maps: method -> heatmap on the image's grid.
        outputs: method -> the file written.
        settings: the settings as run: the model card's defaults filled in (layers, class index).
        device, seconds, roi_voxels, warnings: facts about the run.
        class_name: the model card's name of the class explained ("" when the card names none).
        region: the region given as a file, on the image's grid (weights or a mask), for pictures;
            None when the region came from the model (its prediction, a point).
    """

    image: Volume
    maps: dict[str, Volume]
    outputs: dict[str, Path]
    settings: ExplainSettings
    device: str
    seconds: float
    roi_voxels: int
    warnings: tuple[str, ...] = ()
    class_name: str = ""
    region: Any = None

    @property
    def output(self) -> Path:
        """The first method's file."""
        return next(iter(self.outputs.values()))

    def event(self) -> dict[str, Any]:
        """The fields of the worker's "result" event."""
        return {"output": str(self.output), "outputs": {m: str(p) for m, p in self.outputs.items()},
                "device": self.device, "seconds": round(self.seconds, 3), "roi_voxels": self.roi_voxels,
                "methods": list(self.settings.methods), "layers": list(self.settings.layers),
                "target_class": self.settings.target_class, "class_name": self.class_name}


@dataclass(frozen=True)
class LayersResult:
    """A model's layers (``engine.layers.LayerInfo``) for a probe input, with its card's facts."""

    model: str
    spatial_dims: int
    class_names: tuple[str, ...]
    default_layers: tuple[str, ...]
    example_shape: tuple[int, ...]
    layers: tuple[Any, ...]
    in_channels: int = 1

    def event(self) -> dict[str, Any]:
        """The fields of the worker's "result" event (each layer as a JSON object)."""
        return {"model": self.model, "spatial_dims": self.spatial_dims, "class_names": list(self.class_names),
                "in_channels": self.in_channels,
                "default_layers": list(self.default_layers), "example_shape": list(self.example_shape),
                "layers": [_jsonable(asdict(info)) for info in self.layers]}


def run_request(request: Request, progress: ProgressCallback | None = None,
                warn: WarnCallback | None = None, *, model: Any = None) -> ExplainResult | LayersResult:
    """Run one request (:class:`ExplainRequest` or :class:`LayersRequest`).

    ``progress(fraction, message)`` follows the run (raise ``CancelledError`` from it to stop);
    ``warn(message)`` receives each distinct warning once: the engine's notes and SegHiResCAM's own
    ``warnings.warn`` (:class:`~SegHiResCAMLib.errors.SegHiResCAMWarning`); other libraries' warnings
    go to the debug log (:mod:`~SegHiResCAMLib.warning_relay`).
    ``model``: the request's model already loaded (a ``LoadedModel`` of ``request.model`` with
    ``request.trust_code``), so that a process explaining many cases loads it once; None loads it.

    Raises:
        SegHiResCAMError: a problem the user can fix (a one-sentence message), or an
            :class:`InternalError` naming the step that failed unexpectedly.
    """
    relay = distinct(warn or (lambda message: None))
    with relayed_warnings(relay):
        if isinstance(request, LayersRequest):
            return _list_layers(request)
        return _explain(request, progress or (lambda fraction, message: None), relay, model)


def method_outputs(out: str | Path, methods: Sequence[str]) -> tuple[Path, ...]:
    """One file name per method: ``out`` itself for one method; for several,
    ``<stem>_<method><suffix>`` beside it (``heat.nii.gz`` -> ``heat_seg-grad-cam.nii.gz``)."""
    path = Path(out)
    if len(methods) == 1:
        return (path,)
    suffix = next((s for s in HEATMAP_SUFFIXES if path.name.lower().endswith(s)), path.suffix)
    stem = path.name[: len(path.name) - len(suffix)] if suffix else path.name
    return tuple(path.with_name(f"{stem}_{method}{suffix}") for method in methods)


def inputs_of(request: ExplainRequest) -> dict[str, str | None]:
    """Every input file or folder of a request, by the role a message names it with."""
    images = {"the image" if len(request.images) == 1 else f"image {index + 1}": path
              for index, path in enumerate(request.images)}
    return {**images, "the region file": request.roi, "the model": request.model}


def load_model_for(path: str | Path, *, trust_code: bool = False):
    """``load_model``, imported only when needed (it imports torch)."""
    from .models.loading import load_model

    return load_model(path, trust_code=trust_code)


@contextmanager
def _step(stage: str) -> Iterator[None]:
    """Name the step of a failure that is not the user's (a bug): InternalError(stage)."""
    try:
        yield
    except SegHiResCAMError:
        raise
    except Exception as error:  # noqa: BLE001 - anything else is ours to report, with the step
        raise InternalError.during(stage, error) from error


def _explain(request: ExplainRequest, progress: ProgressCallback, relay: WarnCallback, model: Any) -> ExplainResult:
    from .io.channels import read_channels
    from .io.images import read_mask, write_image
    from .io.outputs import check_distinct_outputs, check_output_path
    from .pipeline import explain_volume, settings_for_model

    started = time.perf_counter()
    settings = request.settings
    with _step("checking the output files"):  # before any reading or loading
        inputs = inputs_of(request)
        outputs = {method: check_output_path(path, inputs) for method, path in zip(settings.methods, request.outputs)}
        check_distinct_outputs(list(outputs.values()))
    with _step("reading the image"):
        progress(0.0, f"reading {', '.join(Path(path).name for path in request.images)}")
        image = read_channels(request.images)
    with _step("reading the region"):
        roi = None if request.roi is None else read_mask(request.roi, image, label=request.roi_label)
        settings.region_kind(roi is not None)  # a contradiction is refused before the slow part
        if settings.point is not None:
            from .point_region import point_voxel

            name = f"the image {Path(request.images[0]).name}"
            point_voxel(image.ijk_to_ras, image.spatial_shape, settings.point.ras, name)
    with _step("loading the model"):
        progress(0.0, f"loading the model {Path(request.model).name}")
        loaded = model if model is not None else load_model_for(request.model, trust_code=request.trust_code)
        _check_channels(loaded.card, image, len(request.images))
    with _step("explaining"):
        maps, explanation = explain_volume(loaded, image, settings, roi=roi, progress=progress)
        for message in explanation.warnings:
            relay(message)
    with _step("writing the heatmaps"):
        for method, path in outputs.items():
            write_image(maps[method], path)
    resolved = settings_for_model(settings, loaded.card)
    names = loaded.card.class_names
    return ExplainResult(image, maps, outputs, resolved, explanation.device, time.perf_counter() - started,
                         int(explanation.roi_voxels), explanation.warnings,
                         names[resolved.target_class] if resolved.target_class < len(names) else "", roi)


def _check_channels(card, image: Volume, files: int) -> None:
    channels = image.array.shape[0] if image.array.ndim == 4 else 1
    if channels != card.in_channels:
        raise InputError(
            f"the model {card.name!r} takes {card.in_channels} image channel{'s' if card.in_channels != 1 else ''} "
            f"but {files} image{'s were' if files != 1 else ' was'} given; give one image per channel "
            "(panel: the additional input volumes; command line: one --image each), in the order of the model card"
        )


def _list_layers(request: LayersRequest) -> LayersResult:
    from .engine.layers import list_layers, probe_shape

    with _step("loading the model"):
        loaded = load_model_for(request.model, trust_code=request.trust_code)
    card = loaded.card
    shape = probe_shape(loaded.module, card.example_shape(request.size))
    with _step("listing the layers"):
        infos = list_layers(loaded.module, shape)
    return LayersResult(card.name, card.spatial_dims, card.class_names, card.layers, tuple(shape), tuple(infos),
                        card.in_channels)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    return value
