"""One explanation run from MRML nodes to a heatmap node, through the worker process.

This is the Qt-free heart of ``SegHiResCAMLogic.process``: it writes the input volume
and the segment mask into the run's temp folder, writes the worker request, starts the
worker, forwards its progress, and when the result arrives reads the heatmap and shows
it. The output node is created (or filled) only at that last step, so a cancelled or
failed run leaves the scene exactly as it was; the temp folder goes in every outcome.

The GUI calls :meth:`ExplainJob.poll` from a timer; scripts call :meth:`ExplainJob.wait`.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .. import errors
from ..errors import CancelledError, InputError, SegHiResCAMError
from ..worker.launcher import WorkerProcess
from ..worker.protocol import DEVICES, Request

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[float, str], None]



@dataclass(frozen=True)
class ExplainOptions:
    """What to explain and how to show it.

    Attributes:
        layer: layer name (or names, averaged); None = the model card's default layer.
        target_class: output channel whose prediction is explained.
        method: a CAM method name, e.g. "seg-hires-grad-cam" or "seg-grad-cam".
        target: "logits" (default) or "probability-threshold".
        threshold: probability threshold of the "probability-threshold" target.
        device: "auto", "cuda" or "cpu".
        slice_axis: for 2D models, the axis of the model's input grid to slice along (the
            volume's 0 = K, 1 = J, 2 = I unless the model card reorients or transposes);
            None = the model card's.
        opacity: heatmap opacity in the slice views (0-1).
        lower_threshold: heatmap values below this (0-1) are transparent.
        show_3d: also show the heatmap with volume rendering in the 3D view.
        output_name: name of a new output node; None = "<input> CAM".
        trust_code: let the model's own code run (a ``.py`` builder, a MONAI bundle with
            expressions); ask the user first (``models.loading.code_to_trust``).
    """

    layer: str | list[str] | None = None
    target_class: int = 1
    method: str = "seg-hires-grad-cam"
    target: str = "logits"
    threshold: float = 0.5
    device: str = "auto"
    slice_axis: int | None = None
    opacity: float = 0.5
    lower_threshold: float = 0.2
    show_3d: bool = False
    output_name: str | None = None
    trust_code: bool = False

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise InputError(f"device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if not 0.0 <= float(self.opacity) <= 1.0:
            raise InputError(f"opacity must be between 0 and 1, got {self.opacity}")
        if not 0.0 <= float(self.lower_threshold) <= 1.0:
            raise InputError(f"lower threshold must be between 0 and 1, got {self.lower_threshold}")
        if self.slice_axis is not None and self.slice_axis not in (0, 1, 2):
            raise InputError(f"slice axis must be 0, 1 or 2 (K, J or I), got {self.slice_axis}")


class ExplainJob:
    """Explain one segment of one volume with one model, in a worker process.

    Args:
        scene: the MRML scene that holds the nodes and receives the heatmap node.
        input_volume_node: the image (``vtkMRMLScalarVolumeNode``).
        model_path: the model file (weights with their model card beside them).
        segmentation_node: the segmentation holding the region to explain, or None to
            explain the model's own prediction of the target class.
        segment_id: the segment's ID in ``segmentation_node``.
        options: what to explain and how to show it.
        output_node: a heatmap node of an earlier run to fill (refused before the run
            when this module did not make it); None = create one at the end.
        python_executable: interpreter for the worker (``PythonSlicer`` in Slicer).
        progress: called with (fraction, message) as the worker reports progress.
        volume_rendering_logic: Slicer's volume rendering logic, for "show in 3D"
            (``slicer.modules.volumerendering.logic()``); None makes a temporary one.
        temp_root: where the run's temp folder goes (``slicer.app.temporaryPath`` in
            Slicer); None = the system's.
    """

    def __init__(
        self,
        scene,
        input_volume_node,
        model_path: str | os.PathLike,
        segmentation_node=None,
        segment_id: str | None = None,
        options: ExplainOptions = ExplainOptions(),
        output_node=None,
        python_executable: str | os.PathLike | None = None,
        progress: ProgressCallback | None = None,
        volume_rendering_logic=None,
        temp_root: str | os.PathLike | None = None,
    ) -> None:
        self.scene = scene
        self.volume_rendering_logic = volume_rendering_logic
        self.input_volume_node = input_volume_node
        self.model_path = Path(model_path).expanduser().resolve()  # the worker runs in its temp folder
        self.segmentation_node = segmentation_node
        self.segment_id = segment_id
        self.options = options
        self.output_node = output_node
        self.python_executable = python_executable
        self.progress = progress
        self.temp_root = temp_root
        self.state = "new"  # new -> running -> done | failed | cancelled
        self.device: str | None = None
        self.seconds: float | None = None
        self.warnings: list[str] = []
        self.error: SegHiResCAMError | None = None
        self._worker: WorkerProcess | None = None
        self._started_at: float | None = None

    # -- lifecycle ---------------------------------------------------------------------
    def start(self) -> None:
        """Check the inputs, write them to the temp folder and start the worker."""
        if self.state != "new":
            raise RuntimeError("this job was already started; make a new ExplainJob")
        self._check_inputs()
        env = {"CUDA_VISIBLE_DEVICES": "-1"} if self.options.device == "cpu" else {}
        worker = WorkerProcess(self.python_executable, env=env, temp_root=self.temp_root)
        try:
            request = self._write_inputs(worker)
            self._started_at = time.monotonic()
            worker.start(request)
        except BaseException:
            worker.close()
            raise
        self._worker = worker
        self.state = "running"

    def poll(self) -> bool:
        """Handle the events that arrived; True once the job has ended (any outcome)."""
        if self.state != "running":
            return self.state != "new"
        return self._consume(self._worker.poll())

    def wait(self, timeout: float | None = None):
        """Block until the job ends; return the heatmap node or raise the job's error.

        Raises:
            SegHiResCAMError: the worker reported an error (its one-line message).
            CancelledError: the job was cancelled.
            TimeoutError: ``timeout`` seconds passed; the job was cancelled.
        """
        if self.state == "new":
            self.start()
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.state == "running":
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                self.cancel()
                raise TimeoutError(f"the explanation did not finish within {timeout} s and was cancelled")
            # Blocks on the worker's event queue, so this loop sleeps while the worker computes.
            step = 0.5 if remaining is None else min(remaining, 0.5)
            self._consume(self._worker.wait(timeout=step))
        return self.result()

    def _consume(self, events: list[dict[str, Any]]) -> bool:
        """Handle events in order; close the worker once the job has ended. True if ended."""
        try:
            for event in events:
                self._handle(event)
                if self.state != "running":
                    break
            if self.state == "running" and self._worker.finished:
                self._fail(SegHiResCAMError("the SegHiResCAM worker ended without sending a result"))
        except BaseException as error:
            self.state = "failed"
            self.error = error if isinstance(error, SegHiResCAMError) else None
            self._close()
            raise
        if self.state != "running":
            self._close()
        return self.state != "running"

    def cancel(self) -> None:
        """Kill the worker (and its children) and remove the temp folder; the scene is unchanged."""
        if self.state in ("done", "failed", "cancelled"):
            return
        self.state = "cancelled"
        if self._worker is not None:
            self._worker.cancel()
            self._worker = None

    def result(self):
        """The heatmap node of a finished job; raises the job's error otherwise."""
        if self.state == "done":
            return self.output_node
        if self.state == "cancelled":
            raise CancelledError("the explanation was cancelled")
        if self.state == "failed" and self.error is not None:
            raise self.error
        raise RuntimeError(f"the job has no result (state: {self.state})")

    @property
    def temp_dir(self) -> Path | None:
        """The running job's temp folder (None before start and after the end)."""
        return self._worker.temp_dir if self._worker is not None else None

    @property
    def worker_pid(self) -> int | None:
        return self._worker.pid if self._worker is not None else None

    # -- steps -------------------------------------------------------------------------
    def _check_inputs(self) -> None:
        if self.input_volume_node is None or self.input_volume_node.GetImageData() is None:
            raise InputError("select an input volume that has image data")
        if not self.model_path.exists():  # a file, or a folder (MONAI bundle, nnU-Net results)
            raise InputError(f"the model {self.model_path} does not exist; select a model file or folder")
        if self.segmentation_node is not None:
            from .segments import find_segment_id

            if not self.segment_id:
                raise InputError(f"select a segment of '{self.segmentation_node.GetName()}' to explain")
            self.segment_id = find_segment_id(self.segmentation_node, self.segment_id)  # an ID or a name
        if self.output_node is not None:
            from .heatmap_display import check_output_node

            check_output_node(self.scene, self.output_node, self.input_volume_node)

    def _write_inputs(self, worker: WorkerProcess) -> Request:
        from .segments import segment_mask
        from .volumes import write_volume_node

        image_path = worker.path("image.nrrd")
        write_volume_node(self.input_volume_node, image_path)
        roi_path = None
        if self.segmentation_node is not None:
            mask = segment_mask(self.segmentation_node, self.segment_id, self.input_volume_node)
            roi_path = worker.path("roi.nrrd")
            write_mask(mask, self.input_volume_node, roi_path)
        return Request(
            image=str(image_path),
            model=str(self.model_path),
            output=str(worker.path("heatmap.nrrd")),
            roi=str(roi_path) if roi_path is not None else None,
            roi_label=1,
            layer=self.options.layer,
            target_class=int(self.options.target_class),
            method=self.options.method,
            target=self.options.target,
            threshold=float(self.options.threshold),
            device=self.options.device,
            slice_axis=self.options.slice_axis,
            trust_code=bool(self.options.trust_code),
        )

    def _handle(self, event: dict[str, Any]) -> None:
        kind = event.get("event")
        if kind == "progress":
            if self.progress is not None:
                self.progress(float(event.get("fraction", 0.0)), str(event.get("message", "")))
        elif kind == "warning":
            message = str(event.get("message", ""))
            self.warnings.append(message)
            logger.warning("SegHiResCAM: %s", message)
        elif kind == "error":
            self._fail(error_from_event(event))
        elif kind == "result":
            self._finish(event)

    def _finish(self, event: dict[str, Any]) -> None:
        from .heatmap_display import show_heatmap

        output_path = Path(event.get("output") or self._worker.path("heatmap.nrrd"))
        heatmap = read_volume_array(output_path)
        self.output_node = show_heatmap(
            self.scene,
            heatmap,
            self.input_volume_node,
            output_node=self.output_node,
            name=self.options.output_name or f"{self.input_volume_node.GetName()} CAM",
            opacity=self.options.opacity,
            lower_threshold=self.options.lower_threshold,
            show_3d=self.options.show_3d,
            volume_rendering_logic=self.volume_rendering_logic,
        )
        self.device = event.get("device")
        self.seconds = float(event.get("seconds", time.monotonic() - (self._started_at or time.monotonic())))
        self.state = "done"

    def _fail(self, error: SegHiResCAMError) -> None:
        self.error = error
        self.state = "failed"

    def _close(self) -> None:
        if self._worker is not None:
            self._worker.close()
            self._worker = None


def write_mask(mask: np.ndarray, reference_volume_node, path: str | os.PathLike) -> str:
    """Write a boolean ``(K, J, I)`` mask as a uint8 label file (1 inside) with the reference's geometry."""
    import slicer

    from ..volume import Volume
    from .volumes import ijk_to_ras_of_node, update_node_from_volume, write_volume_node

    # A node outside any scene: writing it leaves the user's scene untouched.
    node = slicer.vtkMRMLLabelMapVolumeNode()
    update_node_from_volume(node, Volume(np.asarray(mask).astype(np.uint8), ijk_to_ras_of_node(reference_volume_node)))
    return write_volume_node(node, path)


def read_volume_array(path: str | os.PathLike) -> np.ndarray:
    """The voxels (KJI order) of a volume file, read through a private scene, not the user's."""
    import slicer

    from .volumes import array_from_node, read_volume_node

    scratch = slicer.vtkMRMLScene()
    try:
        return array_from_node(read_volume_node(scratch, path))
    finally:
        scratch.Clear(1)


def error_from_event(event: dict[str, Any]) -> SegHiResCAMError:
    """The exception for a worker error event, of the class the worker named when it is ours."""
    message = str(event.get("message") or "the SegHiResCAM worker failed without a message")
    message = message.strip().splitlines()[0] if message.strip() else message
    name = event.get("type") or event.get("error_type")
    cls = getattr(errors, name, None) if isinstance(name, str) else None
    if not (isinstance(cls, type) and issubclass(cls, SegHiResCAMError)):
        cls = SegHiResCAMError
    return cls(message)
