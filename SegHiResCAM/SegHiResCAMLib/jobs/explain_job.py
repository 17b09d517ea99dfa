"""One explanation from MRML nodes to heatmap nodes, through the worker process.

This is the Qt-free heart of ``SegHiResCAMLogic.start`` / ``process``: it writes the input
volume and the segment mask into the run's temp folder, writes the worker request (paths +
:class:`~SegHiResCAMLib.settings.ExplainSettings`), starts the worker, forwards its progress, and
when the result arrives reads one heatmap per method and shows it as
:class:`~SegHiResCAMLib.settings.DisplaySettings` say. Heatmap nodes are created (or filled) only
at that last step, all or none, so a cancelled or failed run leaves the scene exactly as it was;
the temp folder goes in every outcome.

The GUI calls :meth:`ExplainJob.poll` from a timer; scripts call :meth:`ExplainJob.wait`.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import catalog
from ..errors import DisplayError, InputError, SegHiResCAMError
from ..settings import DisplaySettings, ExplainSettings
from ..worker.launcher import WorkerProcess
from ..worker.protocol import ExplainRequest
from .worker_job import ProgressCallback, WorkerJob

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class JobInputs:
    """What an explanation reads from the scene and the disk.

    Attributes:
        volume_node: the image (``vtkMRMLScalarVolumeNode``).
        model_path: the model file or folder.
        segmentation_node: the segmentation holding the region to explain, or None (the settings'
            region kind then decides: by default the model's own prediction of the class).
        segment_id: the segment's ID or name in ``segmentation_node``.
        trust_code: let the model's own code run (ask the user first: ``models.trust.code_to_trust``).
        extra_volume_nodes: the images of input channels 2, 3, ... of a multi-channel model, in the
            model card's channel order (``volume_node`` is channel 1 and gives the heatmaps' grid;
            an image on another grid is resampled onto it, with a warning).

    The region at a point is a choice, not a node: ``ExplainSettings.point`` (a Markups point is
    read into it with ``mrml.points.markup_point_ras``).
    """

    volume_node: Any
    model_path: str | os.PathLike
    segmentation_node: Any = None
    segment_id: str | None = None
    trust_code: bool = False
    extra_volume_nodes: tuple = ()


class ExplainJob(WorkerJob):
    """Explain one region of one volume with one model, in a worker process.

    Args:
        scene: the MRML scene that holds the nodes and receives the heatmap nodes.
        inputs: the image, model and region (:class:`JobInputs`).
        settings: what to explain; several methods give one heatmap node each.
        display: how to show the heatmaps.
        output_node: a heatmap node of an earlier run to fill with the first method's heatmap
            (refused before the run when this module did not make it); None = create one at the end
            (named ``mrml.heatmap_display.heatmap_node_name``).
        python_executable: interpreter for the worker (``PythonSlicer`` in Slicer).
        progress: called with (fraction, message) as the worker reports progress.
        volume_rendering_logic: Slicer's volume rendering logic, for "show in 3D"
            (``slicer.modules.volumerendering.logic()``); None makes a temporary one.
        temp_root: where the run's temp folder goes (``slicer.app.temporaryPath`` in Slicer);
            None = the system's.
        layout_node: the scene's view layout, for ``display.side_by_side``; None = the scene's first.

    Attributes:
        output_nodes: method -> heatmap node, once done; ``output_node`` is the first method's.
        device: the device that ran, once done.
        summary: one line saying what ran, once done: methods, layer, class, region and its size,
            device and time (the panel's status line).
    """

    what = "explanation"

    def __init__(
        self,
        scene,
        inputs: JobInputs,
        settings: ExplainSettings,
        display: DisplaySettings = DisplaySettings(),
        *,
        output_node=None,
        python_executable: str | os.PathLike | None = None,
        progress: ProgressCallback | None = None,
        volume_rendering_logic=None,
        temp_root: str | os.PathLike | None = None,
        layout_node=None,
    ) -> None:
        super().__init__(python_executable, progress, env={"CUDA_VISIBLE_DEVICES": "-1"} if settings.device == "cpu"
                         else {}, temp_root=temp_root)
        self.scene = scene
        self.inputs = inputs
        self.model_path = Path(inputs.model_path).expanduser().resolve()  # the worker runs in its temp folder
        self.segment_id = inputs.segment_id
        self.settings = settings
        self.display = display
        self.output_node = output_node
        self.output_nodes: dict[str, Any] = {}
        self.volume_rendering_logic = volume_rendering_logic
        self.layout_node = layout_node
        self.device: str | None = None
        self.summary = ""

    def _check_inputs(self) -> None:
        volume = self.inputs.volume_node
        if volume is None or volume.GetImageData() is None:
            raise InputError("select an input volume that has image data")
        for channel, extra in enumerate(self.inputs.extra_volume_nodes, start=2):
            if extra is None or extra.GetImageData() is None:
                raise InputError(f"select an image volume for input channel {channel} of the model")
        if self.settings.point is not None:
            from ..mrml.volumes import ijk_to_ras_of_node
            from ..point_region import point_voxel

            shape = tuple(reversed(volume.GetImageData().GetDimensions()))
            point_voxel(ijk_to_ras_of_node(volume), shape, self.settings.point.ras, f"the image '{volume.GetName()}'")
        if not self.model_path.exists():  # a file, or a folder (MONAI bundle, nnU-Net results)
            raise InputError(f"the model {self.model_path} does not exist; select a model file or folder")
        segmentation = self.inputs.segmentation_node
        if segmentation is not None:
            from ..mrml.segments import find_segment_id

            if not self.segment_id:
                raise InputError(f"select a segment of '{segmentation.GetName()}' to explain")
            self.segment_id = find_segment_id(segmentation, self.segment_id)  # an ID or a name
        self.settings.region_kind(segmentation is not None)
        if self.output_node is not None:
            from ..mrml.heatmap_display import check_output_node

            check_output_node(self.scene, self.output_node, volume)
        if self._side_by_side() and self._layout() is None:
            raise DisplayError("this scene has no view layout to show the heatmaps side by side; turn side by side off")

    def _side_by_side(self) -> bool:
        return self.display.side_by_side and len(self.settings.methods) > 1

    def _layout(self):
        return self.layout_node if self.layout_node is not None else self.scene.GetFirstNodeByClass("vtkMRMLLayoutNode")

    def _request(self, worker: WorkerProcess) -> ExplainRequest:
        from ..mrml.segments import segment_mask
        from ..mrml.volumes import write_mask_like, write_volume_node

        image_path = worker.path("image.nrrd")
        write_volume_node(self.inputs.volume_node, image_path)
        images = [str(image_path)]
        for channel, extra in enumerate(self.inputs.extra_volume_nodes, start=2):
            images.append(write_volume_node(extra, worker.path(f"channel_{channel}.nrrd")))
        roi_path = None
        if self.inputs.segmentation_node is not None:
            mask = segment_mask(self.inputs.segmentation_node, self.segment_id, self.inputs.volume_node)
            roi_path = worker.path("roi.nrrd")
            write_mask_like(mask, self.inputs.volume_node, roi_path)
        outputs = tuple(str(worker.path(f"heatmap_{index}.nrrd")) for index in range(len(self.settings.methods)))
        return ExplainRequest(
            images=tuple(images), model=str(self.model_path), outputs=outputs, settings=self.settings,
            roi=None if roi_path is None else str(roi_path), roi_label=None if roi_path is None else 1,
            trust_code=bool(self.inputs.trust_code),
        )

    def _finish(self, event: dict[str, Any]) -> None:
        from ..mrml.heatmap_display import heatmap_node_name, show_heatmap
        from ..mrml.scene import node_ids, remove_nodes_added_since
        from ..mrml.volumes import read_volume_array, update_node_from_volume, volume_from_node

        written = event.get("outputs") or {self.settings.methods[0]: event.get("output")}
        layers = tuple(event.get("layers") or self.settings.layers)
        reference = self.inputs.volume_node
        ids_before = node_ids(self.scene)
        previous = volume_from_node(self.output_node) if _has_voxels(self.output_node) else None
        shown: dict[str, Any] = {}
        try:
            # The first method is shown last, so it is the one in front in the slice views.
            for method in reversed(self.settings.methods):
                first = method == self.settings.methods[0]
                name = self.display.output_name if first and self.display.output_name else heatmap_node_name(
                    reference.GetName(), method, layers)
                shown[method] = show_heatmap(
                    self.scene, read_volume_array(Path(written[method])), reference,
                    output_node=self.output_node if first else None, name=name,
                    opacity=self.display.opacity, lower_threshold=self.display.lower_threshold,
                    show_3d=self.display.show_3d and first, volume_rendering_logic=self.volume_rendering_logic,
                    color_legend=self.display.color_legend,
                )
        except BaseException:
            if previous is not None:
                update_node_from_volume(self.output_node, previous)
            remove_nodes_added_since(self.scene, ids_before)
            raise
        self.output_nodes = {method: shown[method] for method in self.settings.methods}
        self.output_node = self.output_nodes[self.settings.methods[0]]
        self.device = event.get("device")
        self.summary = summary_line(self.settings, event, self._region_text())
        if self._side_by_side():
            self._show_side_by_side()
        self.state = "done"

    def _show_side_by_side(self) -> None:
        """The heatmaps are made; a layout that cannot be made is reported, and the run still counts."""
        from ..mrml.compare_views import show_side_by_side

        try:
            show_side_by_side(self.scene, self.inputs.volume_node, list(self.output_nodes.values()), self._layout())
        except SegHiResCAMError as error:
            message = f"the heatmaps were made but could not be shown side by side: {error}"
            self.warnings.append(message)
            logger.warning("SegHiResCAM: %s", message)

    def _region_text(self) -> str:
        """The region in words, as the user chose it."""
        if self.inputs.segmentation_node is not None:
            from ..mrml.segments import segment_names

            name = segment_names(self.inputs.segmentation_node).get(self.segment_id, self.segment_id)
            return f"the segment '{name}'"
        kind = self.settings.region_kind(False)
        if kind == "point":
            return "the prediction at the point ({:.1f}, {:.1f}, {:.1f})".format(*self.settings.point.ras)
        return catalog.find(catalog.REGION_CHOICES, kind, "region").label.lower()

    def _result(self):
        return self.output_node


def summary_line(settings: ExplainSettings, event: dict[str, Any], region: str) -> str:
    """What a finished run did, in one line: methods, layer(s), class, region and its size, device, time.

    ``event`` is the worker's "result" event (the layers and class as run, after the model card's
    defaults; the region's size in voxels of the model's output grid).
    """
    methods = ", ".join(catalog.method(name).label for name in settings.methods)
    layers = list(event.get("layers") or settings.layers)
    layer_text = f"layer{'s' if len(layers) > 1 else ''} {' + '.join(layers)}" if layers else "the default layer"
    target_class = event.get("target_class", settings.target_class)
    class_name = event.get("class_name")
    class_text = f"class {target_class}" + (f" ({class_name})" if class_name else "")
    voxels = event.get("roi_voxels")
    size = f" ({voxels:,} voxels)" if isinstance(voxels, int) else ""
    return (f"{methods} at {layer_text}, {class_text}; region: {region}{size}; "
            f"{event.get('device', '?')}, {float(event.get('seconds') or 0.0):.1f} s")


def _has_voxels(node) -> bool:
    return node is not None and node.GetImageData() is not None and node.GetImageData().GetPointData().GetScalars() \
        is not None
