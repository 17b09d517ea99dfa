"""SegHiResCAM: explain a segmentation network's prediction for a segment with a class activation map.

This file only binds Slicer to the library (``SegHiResCAMLib``): module metadata, the
parameter node, the panel, a thin logic that starts the worker process, and the self-test.
torch is never imported here at module scope; the computation runs in a separate
``PythonSlicer`` process (see ``SegHiResCAMLib/worker``).
"""

import enum
import importlib.util
import logging
import os
import pathlib
import shutil
import sys
from typing import Annotated

import qt
import slicer
import vtk
# The Markups classes are in the slicer namespace when scripted modules load (LineProfile.py does the same).
from slicer import vtkMRMLMarkupsFiducialNode, vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Default, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

#: Parameter-node fields bound by hand in the widget (their widgets have no GUI connector:
#: the layer list is filled at run time, the segment selector is a Slicer widget, the
#: model field must accept folders and an emptied field, which ctkPathLineEdit's connector
#: never passes on, and the methods are a checkable list). Every other field is bound through
#: a ``SlicerParameterName`` property in the .ui file.
HAND_BOUND_PARAMETERS = ("layer", "roiSegmentId", "modelPath", "methods")

#: The additional input volume fields, for input channels 2, 3 and 4 (``panel_rules.PANEL_CHANNELS``).
EXTRA_VOLUME_FIELDS = ("extraVolume1", "extraVolume2", "extraVolume3")

#: Torch version the library needs (PyTorch extension installs it on request).
TORCH_REQUIREMENT = ">=2.1"


#
# SegHiResCAM
#


class SegHiResCAM(ScriptedLoadableModule):
    """Module metadata (title, category, help, acknowledgement)."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("SegHiResCAM")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["SegHiResCAM developers (SlicerSegHiResCAM project)"]
        self.parent.helpText = _("""
Explains why a segmentation network predicted a region: pick an image, a model, a layer, the
class and the segment (the region) to explain, and SegHiResCAM computes a class activation map
(CAM) and shows it as a heatmap over the image in the slice views (and optionally in 3D).
<p>What a CAM shows: where, in the chosen layer's features, the evidence lies that raised the
model's score for that class inside that region. Bright means the model's prediction for the
region depends on those voxels' features.</p>
<p>What it does not show: it is not a segmentation, not a probability, and not proof that the
model is right; it does not tell why features matter, nor whether a clinician would agree.
Maps are scaled to their own maximum, so brightness cannot be compared between runs. A map
that is dark everywhere means no positive evidence was found at that layer.</p>
<p>The computation runs in a separate process: Slicer stays responsive and Cancel stops it.
See the <a href="https://github.com/SegHiResCAM/SlicerSegHiResCAM#readme">documentation</a>.</p>
""")
        self.parent.acknowledgementText = _("""
Seg-HiRes-Grad CAM: T. Rheude, A. Wirtz, A. Kuijper, S. Wesarg, "Leveraging CAM algorithms for
explaining medical semantic segmentation", Machine Learning for Biomedical Imaging (MELBA), 2024
(arXiv:2409.20287). Seg-Grad CAM: K. Vinogradova, A. Dibrov, G. Myers, "Towards interpretable
semantic segmentation via gradient-weighted class activation mapping", AAAI 2020 (arXiv:2002.11434).
""")


#
# Choices
#


# The values of these enums are SegHiResCAMLib.catalog's names, in its order (a static test checks
# it); their labels come from the catalog, imported when the panel draws its lists (it is torch-free,
# but Slicer's module scan imports nothing of the library).


def _catalogChoice(listName: str, name: str):
    from SegHiResCAMLib import catalog

    return catalog.find(getattr(catalog, listName), name, listName)


class CamMethod(enum.Enum):
    """Heatmap methods offered in the panel (``catalog.METHOD_CHOICES``)."""

    SEG_HIRES_GRAD_CAM = "seg-hires-grad-cam"
    SEG_GRAD_CAM = "seg-grad-cam"
    SEG_GRAD_CAM_PP = "seg-grad-cam++"
    SEG_XGRAD_CAM = "seg-xgrad-cam"
    SEG_LAYER_CAM = "seg-layer-cam"
    KERNEL_WEIGHTED = "kernel-weighted-contribution"

    def label(self) -> str:
        return _(_catalogChoice("METHOD_CHOICES", self.value).panel_label)


class TargetKind(enum.Enum):
    """What the target sums over the region (``catalog.TARGET_CHOICES``)."""

    LOGITS = "logits"
    PROBABILITY_THRESHOLD = "probability-threshold"

    def label(self) -> str:
        return _(_catalogChoice("TARGET_CHOICES", self.value).label)


class ComputeDevice(enum.Enum):
    """Where the worker runs the model (``catalog.DEVICE_CHOICES``)."""

    AUTO = "auto"
    CUDA = "cuda"
    CPU = "cpu"

    def label(self) -> str:
        return _(_catalogChoice("DEVICE_CHOICES", self.value).label)


class RegionKind(enum.Enum):
    """Which voxels the explained prediction is summed over (``catalog.REGION_CHOICES``)."""

    MASK = "mask"
    PREDICTION = "prediction"
    WHOLE_IMAGE = "whole-image"
    POINT = "point"

    def label(self) -> str:
        return _(_catalogChoice("REGION_CHOICES", self.value).label)


class SliceAxis(enum.Enum):
    """For 2D models: the axis of the model's input grid the model is applied along; the
    volume's K, J, I unless the model card reorients or transposes the image."""

    MODEL_CARD = "card"
    K = "0"
    J = "1"
    I = "2"

    def label(self) -> str:
        return {
            "card": _("From model card"),
            "0": _("K (slices of the volume, usually axial)"),
            "1": _("J (usually coronal)"),
            "2": _("I (usually sagittal)"),
        }[self.value]

    def axis(self):
        return None if self is SliceAxis.MODEL_CARD else int(self.value)


#
# SegHiResCAMParameterNode
#


@parameterNodeWrapper
class SegHiResCAMParameterNode:
    """Every user choice of the panel (saved with the scene).

    inputVolume - the image the model segments (input channel 1).
    extraVolume1..3 - the images of input channels 2..4 of a multi-channel model (card order).
    modelPath - the model file (weights + model card, or TorchScript).
    layer - the explained layer ("" = the model card's default).
    targetClass - the output channel whose prediction is explained.
    region - which voxels are explained: a segment, the prediction, the whole image, or the
        prediction at a point.
    roiSegmentation, roiSegmentId - the segment explained (region "A segment").
    regionPoint, pointRadius - the point list whose last point is explained (region "point"), and
        the sphere's radius in mm where the model predicts nothing at the point.
    methods, target, targetThreshold - the heatmap methods (one heatmap each, from one run) and the
        target (targetThreshold: the probability t of the probability-threshold target).
    device, sliceAxis - where and how to compute (sliceAxis only for 2D models).
    slidingWindowsAuto, patchSize - how the model runs over the image: auto (the card's tiling, or
        windows only when the whole image does not fit the memory), else windows of patchSize voxels
        along every axis (0 = the whole image in one pass); see ``panel_rules.sliding_window_choice``.
    outputHeatmap - the volume that receives the (first method's) heatmap (none = create one).
    opacity, lowerThreshold, showIn3D, showColorLegend - how the heatmap is shown (live).
    sideBySide - with several methods, one linked view per heatmap.
    """

    inputVolume: vtkMRMLScalarVolumeNode
    extraVolume1: vtkMRMLScalarVolumeNode
    extraVolume2: vtkMRMLScalarVolumeNode
    extraVolume3: vtkMRMLScalarVolumeNode
    modelPath: pathlib.Path
    layer: str = ""
    targetClass: Annotated[int, WithinRange(0, 255)] = 1
    # "A segment" by default: a scene saved before the region choice existed keeps explaining its segment.
    region: RegionKind = RegionKind.MASK
    roiSegmentation: vtkMRMLSegmentationNode
    roiSegmentId: str = ""
    regionPoint: vtkMRMLMarkupsFiducialNode
    pointRadius: Annotated[float, WithinRange(0.5, 100.0)] = 10.0
    methods: Annotated[list[CamMethod], Default(generator=lambda: [CamMethod.SEG_HIRES_GRAD_CAM])]
    target: TargetKind = TargetKind.LOGITS
    # Strictly inside (0, 1): ExplainSettings refuses 0 and 1, which would select every voxel or none.
    targetThreshold: Annotated[float, WithinRange(0.01, 0.99)] = 0.5
    device: ComputeDevice = ComputeDevice.AUTO
    sliceAxis: SliceAxis = SliceAxis.MODEL_CARD
    slidingWindowsAuto: bool = True
    patchSize: Annotated[int, WithinRange(0, 1024)] = 0
    outputHeatmap: vtkMRMLScalarVolumeNode
    opacity: Annotated[float, WithinRange(0.0, 1.0)] = 0.5
    lowerThreshold: Annotated[float, WithinRange(0.0, 1.0)] = 0.2
    showIn3D: bool = False
    showColorLegend: bool = True
    sideBySide: bool = True


def _hasModelPath(path) -> bool:
    return path is not None and str(path) not in ("", ".")


#
# SegHiResCAMWidget
#


class SegHiResCAMWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The panel: inputs, method, output display, Apply/Cancel with progress."""

    POLL_INTERVAL_MS = 200

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._job = None
        self._startingRun = False
        self._layersForModel = None
        self._layerProblem = ""  # why the current model's layers could not be listed, as shown
        self._layerJob = None  # the worker listing the current model's layers, polled from a timer
        self._layersPrevious = None  # the model path the layer was chosen with, while a listing runs
        self._modelChannels = 1  # input channels of the current model (from its listing or card)
        self._shownDisplay = None  # (node ids, opacity, threshold, show3D, legend) last applied
        self._lastHeatmapIds = []  # the last run's heatmaps (one per method), for the live display
        self._pollTimer = None
        self._layerTimer = None

    def setup(self) -> None:
        """Load the .ui, bind it, create the logic."""
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/SegHiResCAM.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = SegHiResCAMLogic()

        from SegHiResCAMLib.mrml.heatmap_display import HEATMAP_ATTRIBUTE

        # Only heatmaps this module made can be overwritten; "Create new" marks its new node too.
        self.ui.outputHeatmapSelector.addAttribute("vtkMRMLScalarVolumeNode", HEATMAP_ATTRIBUTE, "1")

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.layerComboBox.connect("currentIndexChanged(int)", self.onLayerChanged)
        self.ui.roiSegmentSelector.connect("currentSegmentChanged(QString)", self.onSegmentChanged)
        # Its hidden segmentation box can pick a segmentation by itself: the parameter node's wins.
        self.ui.roiSegmentSelector.connect("currentNodeChanged(vtkMRMLNode*)", lambda node: self._syncSegmentSelector())
        self.ui.modelPathLineEdit.connect("currentPathChanged(QString)", self.onModelPathEdited)
        self.ui.modelPathLineEdit.connect("validInputChanged(bool)", self.onModelPathValidityChanged)
        self.ui.modelFolderButton.connect("clicked()", self.onBrowseModelFolder)
        self.ui.progressBar.visible = False
        self._fillMethodList()
        self.ui.methodsListWidget.connect("itemChanged(QListWidgetItem*)", self.onMethodsChanged)
        # One click places one point; the point list's last point is the one explained.
        self.ui.pointPlaceWidget.placeMultipleMarkups = slicer.qSlicerMarkupsPlaceWidget.ForcePlaceSingleMarkup

        self._pollTimer = qt.QTimer()
        self._pollTimer.setInterval(self.POLL_INTERVAL_MS)
        self._pollTimer.connect("timeout()", self.onPollJob)
        self._layerTimer = qt.QTimer()
        self._layerTimer.setInterval(self.POLL_INTERVAL_MS)
        self._layerTimer.connect("timeout()", self.onPollLayers)

        self.initializeParameterNode()

    def cleanup(self) -> None:
        """Stop a running job and drop observers when the module is destroyed."""
        self._cancelJob()
        self._cancelLayerJob()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            if self._parameterNodeGuiTag is not None:
                self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
                self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)

    def onSceneStartClose(self, caller, event) -> None:
        self._cancelJob()
        self._cancelLayerJob()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        """Get the module's parameter node and pick a first input volume."""
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            firstVolumeNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolumeNode:
                self._parameterNode.inputVolume = firstVolumeNode

    def setParameterNode(self, inputParameterNode) -> None:
        """Bind the GUI to a parameter node (SlicerParameterName widgets + the hand-bound ones).

        ``inputParameterNode`` is a wrapper fresh from ``logic.getParameterNode()``, bound
        here once: Slicer 5.8's ``connectGui`` returns no tag (Slicer 5.10 does, since commit
        b5a65a49a0), and there the one binding of a fresh wrapper has tag 0
        (parameterNodeWrapper/wrapper.py, ``_nextParameterGUIsTag``). Without that tag every
        re-entry would stack another set of bindings.
        """
        if self._parameterNode:
            if self._parameterNodeGuiTag is not None:
                self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
                self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
        previousNode = self._parameterNode.parameterNode if self._parameterNode else None
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            if self._parameterNode.parameterNode is not previousNode:
                self._layersForModel = None  # another scene's node: its saved layer is kept on first look
            tag = self._parameterNode.connectGui(self.ui)
            self._parameterNodeGuiTag = 0 if tag is None else tag
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
            self._onParameterNodeModified()

    # -- keeping the GUI in step -------------------------------------------------------
    def _onParameterNodeModified(self, caller=None, event=None) -> None:
        self._syncModelPath()
        self._refreshLayerList()  # cheap unless the model path changed; the listing itself runs in a worker
        self._syncSegmentSelector()
        self._syncRegionRows()
        self._syncMethodList()
        self._syncExtraVolumeRows()
        self.ui.targetThresholdSliderWidget.enabled = bool(
            self._parameterNode and self._parameterNode.target == TargetKind.PROBABILITY_THRESHOLD
        )
        self._syncLayerSelection()
        self._applyLiveDisplay()
        self._checkCanApply()

    def _checkCanApply(self) -> None:
        if self._job is not None or self._startingRun:
            return  # the button is a Cancel button while a job runs, and off while one starts
        p = self._parameterNode
        missing = []
        if not (p and p.inputVolume):
            missing.append(_("an input volume"))
        if p and any(getattr(p, name) is None for name in EXTRA_VOLUME_FIELDS[: self._extraChannelCount()]):
            missing.append(_("an image for each input channel"))
        if not (p and _hasModelPath(p.modelPath)):
            missing.append(_("a model file or folder"))
        if p and p.region == RegionKind.MASK and not (p.roiSegmentation and p.roiSegmentId):
            missing.append(_("a segmentation and a segment (or another region)"))
        if p and p.region == RegionKind.POINT and not p.regionPoint:
            missing.append(_("a point list"))  # an empty one is refused at Apply, with what to do
        if p and not list(p.methods):
            missing.append(_("a method"))
        self.ui.applyButton.enabled = not missing
        self.ui.applyButton.toolTip = (
            _("Compute the heatmap.") if not missing else _("Select {items}.").format(items=", ".join(missing))
        )

    def _syncSegmentSelector(self) -> None:
        """Show the parameter node's segmentation and segment; drop a segment ID it does not have."""
        from SegHiResCAMLib.panel_rules import segment_id_to_keep

        p = self._parameterNode
        segmentation = p.roiSegmentation if p else None
        selector = self.ui.roiSegmentSelector
        selector.enabled = segmentation is not None
        if selector.currentNode() != segmentation:
            selector.setCurrentNode(segmentation)
        if p is None:
            return
        segmentIds = list(segmentation.GetSegmentation().GetSegmentIDs()) if segmentation is not None else None
        kept = segment_id_to_keep(segmentIds, p.roiSegmentId, selector.currentSegmentID() or "")
        if kept and selector.currentSegmentID() != kept:
            selector.setCurrentSegmentID(kept)
        if p.roiSegmentId != kept:
            self._parameterNode.roiSegmentId = kept

    def onSegmentChanged(self, segmentId) -> None:
        """The user's pick (the selector lists only the shown segmentation's segments)."""
        p = self._parameterNode
        if p is None or self.ui.roiSegmentSelector.currentNode() != p.roiSegmentation:
            return  # a segment of the selector's own pick of a segmentation, not the user's: ignored
        if p.roiSegmentId != (segmentId or ""):
            self._parameterNode.roiSegmentId = segmentId or ""

    def _syncRegionRows(self) -> None:
        """Show the rows of the chosen region kind only: the segment's, or the point's."""
        kind = self._parameterNode.region if self._parameterNode else RegionKind.MASK
        rows = {
            RegionKind.MASK: (self.ui.roiSegmentationLabel, self.ui.roiSegmentationSelector, self.ui.roiSegmentLabel,
                              self.ui.roiSegmentSelector),
            RegionKind.POINT: (self.ui.regionPointLabel, self.ui.regionPointSelector, self.ui.pointPlaceWidget,
                               self.ui.pointRadiusLabel, self.ui.pointRadiusSliderWidget),
        }
        for rowKind, widgets in rows.items():
            for widget in widgets:
                widget.visible = kind == rowKind
        point = self._parameterNode.regionPoint if self._parameterNode else None
        if self.ui.pointPlaceWidget.currentNode() != point:
            self.ui.pointPlaceWidget.setCurrentNode(point)

    def _fillMethodList(self) -> None:
        """One checkable row per method of the catalog (LoadModulesDialog.py in Slicer's ExtensionWizard
        makes its checkable QListWidget the same way)."""
        for method in CamMethod:
            item = qt.QListWidgetItem(method.label())
            item.setData(qt.Qt.UserRole, method.value)
            item.setFlags(item.flags() | qt.Qt.ItemIsUserCheckable)
            item.setCheckState(qt.Qt.Unchecked)
            self.ui.methodsListWidget.addItem(item)

    def _syncMethodList(self) -> None:
        chosen = {method.value for method in self._parameterNode.methods} if self._parameterNode else set()
        listWidget = self.ui.methodsListWidget
        wasBlocked = listWidget.blockSignals(True)
        try:
            for row in range(listWidget.count):
                item = listWidget.item(row)
                state = qt.Qt.Checked if item.data(qt.Qt.UserRole) in chosen else qt.Qt.Unchecked
                if item.checkState() != state:
                    item.setCheckState(state)
        finally:
            listWidget.blockSignals(wasBlocked)

    def onMethodsChanged(self, item=None) -> None:
        """The checked methods, in the catalog's order (the first is shown in front and fills the output)."""
        if self._parameterNode is None:
            return
        listWidget = self.ui.methodsListWidget
        checked = [CamMethod(listWidget.item(row).data(qt.Qt.UserRole)) for row in range(listWidget.count)
                   if listWidget.item(row).checkState() == qt.Qt.Checked]
        if checked != list(self._parameterNode.methods):
            self._parameterNode.methods = checked

    def _extraChannelCount(self) -> int:
        from SegHiResCAMLib.panel_rules import extra_channels_to_show

        return extra_channels_to_show(self._modelChannels)[0]

    def _syncExtraVolumeRows(self) -> None:
        """One image selector per input channel beyond the first that the model takes (card order)."""
        count = self._extraChannelCount()
        rows = [(self.ui.extraVolume1Label, self.ui.extraVolume1Selector),
                (self.ui.extraVolume2Label, self.ui.extraVolume2Selector),
                (self.ui.extraVolume3Label, self.ui.extraVolume3Selector)]
        for index, widgets in enumerate(rows):
            for widget in widgets:
                widget.visible = index < count

    def _extraVolumes(self) -> list:
        p = self._parameterNode
        return [getattr(p, name) for name in EXTRA_VOLUME_FIELDS[: self._extraChannelCount()]]

    def _syncModelPath(self) -> None:
        """Show the parameter node's model path ("" for none, never ".")."""
        from SegHiResCAMLib.panel_rules import model_path_text

        text = model_path_text(self._parameterNode.modelPath) if self._parameterNode else ""
        field = self.ui.modelPathLineEdit
        current = field.currentPath
        # The same path in other words ("C:/m" for "C:\\m") is left as typed: no jump under the cursor.
        if current != text and not (current and text and pathlib.Path(current) == pathlib.Path(text)):
            wasBlocked = field.blockSignals(True)
            field.currentPath = text
            field.blockSignals(wasBlocked)

    def onModelPathEdited(self, path) -> None:
        """A file or folder typed, pasted, browsed or picked from the history."""
        if self._parameterNode and path and self._parameterNode.modelPath != pathlib.Path(path):
            self._parameterNode.modelPath = pathlib.Path(path)

    def onModelPathValidityChanged(self, valid) -> None:
        # ctkPathLineEdit never reports an emptied field as a path: an emptied field means no model.
        if not valid and not self.ui.modelPathLineEdit.currentPath and self._parameterNode:
            if _hasModelPath(self._parameterNode.modelPath):
                self._parameterNode.modelPath = pathlib.Path()

    def onBrowseModelFolder(self) -> None:
        """ctkPathLineEdit's own button opens files only: folders (MONAI bundle, nnU-Net results) come from here."""
        current = self.ui.modelPathLineEdit.currentPath
        folder = qt.QFileDialog.getExistingDirectory(
            slicer.util.mainWindow(), _("Select a model folder (MONAI bundle, nnU-Net results)"),
            current if os.path.isdir(current) else os.path.dirname(current),
        )
        if folder:
            self.ui.modelPathLineEdit.currentPath = folder  # reaches the parameter node as a typed path does

    def _refreshLayerList(self) -> None:
        """Start listing the model's layers (with output shapes) when the model path changed.

        The listing runs in a worker process polled from a timer (``onPollLayers``), so the panel
        never waits for a Python process and torch to start. Until it ends, the list offers the model
        card's default layer and the layer already chosen; a model whose layers cannot be listed
        says why in the status line (not in a dialog: the path may be half typed) and the panel
        stays usable with the card's default. A new model clears a layer it does not have.
        """
        p = self._parameterNode
        path = str(p.modelPath) if p and _hasModelPath(p.modelPath) else ""
        if path == self._layersForModel:
            return
        self._cancelLayerJob()
        previous, self._layersForModel = self._layersForModel, path
        self._layersPrevious = previous
        self._modelChannels = 1
        if not (path and os.path.exists(path)):
            self._showLayers(None, "")
            return
        try:
            described, job, self._modelChannels = self.logic.startLayerListing(path)
        except Exception as error:  # any failure of the model's own files: reported, the panel goes on
            self._showLayers(None, self._layerProblemText(path, error))
            return
        if job is None:
            self._showLayers(described, "")
            return
        self._layerJob = job
        self._showLayers(None, "", listing=True)
        self._layerTimer.start()

    def onPollLayers(self) -> None:
        """Timer tick of the layer listing: show the layers (or why not) once the worker answered."""
        from SegHiResCAMLib.panel_rules import layer_choices

        job = self._layerJob
        if job is None:
            self._layerTimer.stop()
            return
        problem = ""
        try:
            ended = job.poll()
        except Exception as error:  # reading the worker's answer failed (the job closed itself): reported
            ended, problem = True, self._layerProblemText(self._layersForModel, error)
        if not ended:
            return
        self._layerTimer.stop()
        self._layerJob = None
        if job.state == "done" and not problem:
            listing = job.result()
            self._modelChannels = int(listing.get("in_channels", self._modelChannels))
            self._showLayers(layer_choices(listing), "")
        else:
            self._showLayers(None, problem or self._layerProblemText(
                self._layersForModel, job.error or _("the listing stopped")))
        self._syncExtraVolumeRows()
        self._checkCanApply()

    def _cancelLayerJob(self) -> None:
        if self._layerJob is not None:
            self._layerJob.cancel()
            self._layerJob = None
        if self._layerTimer is not None:
            self._layerTimer.stop()

    @staticmethod
    def _layerProblemText(path, error) -> str:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        return _("Cannot list the layers of {path}: {message}").format(path=path, message=message)

    def _showLayers(self, described, problem: str, listing: bool = False) -> None:
        """Fill the layer list (None: the card's default only) and keep the chosen layer if the model has it."""
        from SegHiResCAMLib.panel_rules import extra_channels_to_show, layer_to_keep

        if problem:
            logging.warning(f"SegHiResCAM: {problem}")
        channelNote = extra_channels_to_show(self._modelChannels)[1]
        shown = problem or channelNote
        if shown or self.ui.statusLabel.text == self._layerProblem:
            self.ui.statusLabel.text = shown
        self._layerProblem = shown
        combo = self.ui.layerComboBox
        wasBlocked = combo.blockSignals(True)
        try:
            combo.clear()
            combo.addItem(_("Model card's default layer (listing the layers...)") if listing
                          else _("Model card's default layer"), "")
            for name, description in described or []:
                combo.addItem(f"{name}  {description}", name)
        finally:
            combo.blockSignals(wasBlocked)
        p = self._parameterNode
        if p is not None and not listing:
            layers = [name for name, _description in described] if described is not None else None
            kept = layer_to_keep(p.layer, self._layersPrevious, self._layersForModel or "", layers)
            if kept != p.layer:
                self._parameterNode.layer = kept
        self._syncLayerSelection()

    def _syncLayerSelection(self) -> None:
        layer = self._parameterNode.layer if self._parameterNode else ""
        combo = self.ui.layerComboBox
        index = combo.findData(layer)
        if index < 0 and layer:  # a layer typed in a script, not in the list: keep it selectable
            combo.addItem(layer, layer)
            index = combo.count - 1
        if index >= 0 and combo.currentIndex != index:
            wasBlocked = combo.blockSignals(True)
            combo.currentIndex = index
            combo.blockSignals(wasBlocked)

    def onLayerChanged(self, index) -> None:
        if self._parameterNode is None or index < 0:
            return
        layer = self.ui.layerComboBox.itemData(index) or ""
        if self._parameterNode.layer != layer:
            self._parameterNode.layer = layer

    def _shownHeatmaps(self) -> list:
        """The output heatmap and the other heatmaps of the last run that are still in the scene."""
        p = self._parameterNode
        nodes = [p.outputHeatmap] if p and p.outputHeatmap is not None else []
        nodes += [slicer.mrmlScene.GetNodeByID(nodeId) for nodeId in self._lastHeatmapIds]
        unique = {node.GetID(): node for node in nodes if node is not None and self.logic.isHeatmap(node)}
        return list(unique.values())

    def _displayState(self, nodes) -> tuple:
        p = self._parameterNode
        return (tuple(node.GetID() for node in nodes), float(p.opacity), float(p.lowerThreshold), bool(p.showIn3D),
                bool(p.showColorLegend))

    def _applyLiveDisplay(self) -> None:
        """Opacity, threshold, 3D and colour bar act at once on the heatmaps already shown (3D: the first only)."""
        p = self._parameterNode
        nodes = self._shownHeatmaps() if p and self._job is None else []
        if not nodes or self._displayState(nodes) == self._shownDisplay:
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to update the heatmap display.")):
            for index, node in enumerate(nodes):
                self.logic.updateDisplay(node, opacity=p.opacity, lowerThreshold=p.lowerThreshold,
                                         showIn3D=p.showIn3D and index == 0, colorLegend=p.showColorLegend)
        self._shownDisplay = self._displayState(nodes)

    # -- running -----------------------------------------------------------------------
    def onApplyButton(self) -> None:
        """Apply starts a job; while it runs the same button cancels it.

        The questions (install PyTorch? run the model's code?) come first, each without the
        wait cursor; the button stays off until the job runs, because installing PyTorch
        pumps Qt events and a second click would start a second installation.
        """
        if self._job is not None:
            self._cancelJob()
            self.ui.statusLabel.text = _("Cancelled; the scene was left as it was.")
            return
        if self._startingRun:
            return
        self._startingRun = True
        self.ui.applyButton.enabled = False
        try:
            self._startJob()
        finally:
            self._startingRun = False
            if self._job is None:
                self._checkCanApply()

    def _startJob(self) -> None:
        p = self._parameterNode
        # The trust question reads file names and configs only, so it comes before any installation.
        with slicer.util.tryWithErrorDisplay(_("Failed to read the model."), waitCursor=True):
            codeToTrust = self.logic.modelCodeToTrust(p.modelPath)
        trustCode = self._askToTrustModelCode(codeToTrust)
        if trustCode is None:
            return
        if self.logic.torchInstallable() and not slicer.util.confirmOkCancelDisplay(
            _("SegHiResCAM needs PyTorch, which is not installed yet. Install it now through the PyTorch "
              "extension? This downloads up to a few gigabytes and may take several minutes."),
            windowTitle=_("SegHiResCAM"),
        ):
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to install PyTorch."), waitCursor=True):
            self.logic.ensureTorch(askConfirmation=False)
        with slicer.util.tryWithErrorDisplay(_("Failed to start the explanation."), waitCursor=True):
            settings, display = self.logic.settingsFromParameterNode(p)
            useSegment = p.region == RegionKind.MASK
            self._job = self.logic.start(
                p.inputVolume,
                p.modelPath,
                settings,
                display,
                segmentationNode=p.roiSegmentation if useSegment else None,
                segmentId=(p.roiSegmentId or None) if useSegment else None,
                outputVolume=p.outputHeatmap,
                trustCode=trustCode,
                progressCallback=self._onProgress,
                extraVolumes=self._extraVolumes(),
            )
            self._setRunning(True)
            self._pollTimer.start()
        self.ui.modelPathLineEdit.addCurrentPathToHistory()  # settingKey keeps no history by itself

    def _askToTrustModelCode(self, reason):
        """False when the model runs no code of its own (``reason`` None), True when the user trusts it, None to stop."""
        if reason is None:
            return False
        question = _("{reason}\n\nRun this model's code? Only do so for models from a source you trust.")
        return True if slicer.util.confirmOkCancelDisplay(question.format(reason=reason)) else None

    def _onProgress(self, fraction: float, message: str) -> None:
        self.ui.progressBar.value = int(round(100 * fraction))
        self.ui.progressBar.format = f"{message} (%p%)" if message else "%p%"

    def onPollJob(self) -> None:
        """Timer tick: handle the worker's events; finish the job when it ends."""
        job = self._job
        if job is None:
            self._pollTimer.stop()
            return
        try:
            ended = job.poll()
        except Exception as error:  # a failure while showing the result: report, never leave the timer running
            self._endJob()
            self.ui.statusLabel.text = _("Failed: {message}").format(message=str(error).splitlines()[0] if str(error) else type(error).__name__)
            slicer.util.errorDisplay(_("Failed to show the heatmap."), detailedText=str(error))
            return
        if not ended:
            return
        self._endJob()
        if job.state == "done":
            p = self._parameterNode
            self._lastHeatmapIds = [node.GetID() for node in job.output_nodes.values()]
            p.outputHeatmap = job.output_node
            # show_heatmap already applied these display values.
            self._shownDisplay = self._displayState(self._shownHeatmaps())
            if job.display.side_by_side and len(job.output_nodes) > 1:
                slicer.util.resetSliceViews()  # fit the new views to the image
            self.ui.statusLabel.text = _("Done: {summary}.").format(summary=job.summary) + (
                "" if not job.warnings else " " + _("Warnings: {w}").format(w="; ".join(job.warnings)))
        elif job.state == "failed":
            message = str(job.error) if job.error is not None else _("unknown error")
            self.ui.statusLabel.text = _("Failed: {message}").format(message=message)
            slicer.util.errorDisplay(message, windowTitle=_("SegHiResCAM"))

    def _cancelJob(self) -> None:
        if self._job is not None:
            self._job.cancel()
            self._endJob()

    def _endJob(self) -> None:
        self._job = None
        if self._pollTimer is not None:
            self._pollTimer.stop()
        self._setRunning(False)

    def _setRunning(self, running: bool) -> None:
        self.ui.applyButton.text = _("Cancel") if running else _("Apply")
        self.ui.applyButton.toolTip = _("Stop the computation; nothing is added to the scene.") if running else ""
        self.ui.applyButton.enabled = True
        self.ui.progressBar.visible = running
        if running:
            self.ui.progressBar.value = 0
            self.ui.progressBar.format = _("starting the worker (%p%)")
            self.ui.statusLabel.text = _("Running...")
        sections = (self.ui.inputsCollapsibleButton, self.ui.regionCollapsibleButton, self.ui.methodCollapsibleButton)
        for section in sections:
            section.enabled = not running
        if not running:
            self._checkCanApply()

    def onReload(self) -> None:
        """Reload the library too (Slicer reloads only this file)."""
        self._cancelJob()
        for name in [n for n in sys.modules if n == "SegHiResCAMLib" or n.startswith("SegHiResCAMLib.")]:
            del sys.modules[name]
        ScriptedLoadableModuleWidget.onReload(self)


#
# SegHiResCAMLogic
#


class SegHiResCAMLogic(ScriptedLoadableModuleLogic):
    """Everything the panel does, callable from the Python console without the GUI.

    Example (Slicer Python console)::

        import SegHiResCAM
        logic = SegHiResCAM.SegHiResCAMLogic()
        heatmap = logic.process(volumeNode, "/path/model.pt", segmentationNode, "Segment_1",
                                layer="decoder.2", targetClass=1, device="cpu")

        # Two methods, the predicted lesion at the last point of a point list:
        heatmap = logic.process(volumeNode, "/path/model.pt", method=["seg-hires-grad-cam", "seg-grad-cam"],
                                pointNode=pointListNode, targetClass=1)

        # Without blocking, with the settings object every door uses:
        from SegHiResCAMLib.settings import ExplainSettings
        job = logic.start(volumeNode, "/path/model.pt", ExplainSettings(target_class=1, layers=("decoder.2",)))
        # ... job.poll() from a timer until True, then job.result() (job.cancel() stops it)
    """

    #: True while PyTorch is being installed (shared by every logic: the panel's and the console's).
    _installingTorch = False

    def getParameterNode(self):
        return SegHiResCAMParameterNode(super().getParameterNode())

    @staticmethod
    def torchAvailable() -> bool:
        """True when torch is installed in Slicer's Python (checked without importing it)."""
        return importlib.util.find_spec("torch") is not None

    @classmethod
    def torchInstallable(cls) -> bool:
        """True when torch is missing and the PyTorch extension (PyTorchUtils) can install it."""
        return not cls.torchAvailable() and importlib.util.find_spec("PyTorchUtils") is not None

    def ensureTorch(self, askConfirmation: bool = True) -> None:
        """Make sure PyTorch ``TORCH_REQUIREMENT`` is installed, through the PyTorch extension (never pip directly).

        Never installs in testing mode (PyTorch Utils would install gigabytes without asking
        there), and never twice at a time.

        Raises:
            MissingDependencyError: the installed torch is too old, the PyTorch extension is
                missing, installation was declined, is running already, or the application
                runs in testing mode.
        """
        from SegHiResCAMLib.dependencies import unmet_requirement
        from SegHiResCAMLib.errors import MissingDependencyError

        if self.torchAvailable():
            old = unmet_requirement("torch", TORCH_REQUIREMENT)
            if old is not None:
                raise MissingDependencyError(
                    f"PyTorch {old} is installed but SegHiResCAM needs torch{TORCH_REQUIREMENT}: in the 'PyTorch Utils' "
                    f"module, uninstall it and install it again with the version requirement {TORCH_REQUIREMENT}, "
                    "then restart Slicer."
                )
            return
        if SegHiResCAMLogic._installingTorch:
            raise MissingDependencyError("PyTorch is being installed; wait until it finishes, then try again.")
        if slicer.app.testingEnabled():
            raise MissingDependencyError(
                "PyTorch is not installed, and SegHiResCAM never installs it in testing mode; install it from the "
                "'PyTorch Utils' module first."
            )
        try:
            import PyTorchUtils
        except ModuleNotFoundError as error:
            raise MissingDependencyError(
                "SegHiResCAM needs PyTorch, which comes with the 'PyTorch' extension: install it from the "
                "Extensions Manager, restart Slicer, and try again."
            ) from error
        torchLogic = PyTorchUtils.PyTorchUtilsLogic()
        if not torchLogic.torchInstalled():
            SegHiResCAMLogic._installingTorch = True
            try:
                torch = torchLogic.installTorch(askConfirmation=askConfirmation, torchVersionRequirement=TORCH_REQUIREMENT)
            finally:
                SegHiResCAMLogic._installingTorch = False
            if torch is None:
                raise MissingDependencyError(
                    "PyTorch was not installed, and SegHiResCAM cannot run without it; install it from the "
                    "'PyTorch Utils' module and try again."
                )

    @staticmethod
    def pythonExecutable() -> str:
        """Slicer's own Python launcher, which runs the worker process."""
        executable = shutil.which("PythonSlicer")
        if executable is None:
            candidate = os.path.join(os.path.dirname(sys.executable), "PythonSlicer" + (".exe" if os.name == "nt" else ""))
            executable = candidate if os.path.isfile(candidate) else None
        if executable is None:
            from SegHiResCAMLib.errors import MissingDependencyError

            raise MissingDependencyError("Slicer's PythonSlicer program was not found; reinstall Slicer.")
        return executable

    def describeLayers(self, modelPath) -> list:
        """(name, "Type  C×D×H×W") for each explainable layer, the model card's choices first (blocking).

        The shapes come from the worker process (Slicer's own process never loads torch for
        them); without torch, or before the model's code is trusted, only the model card's layers
        are listed, without shapes. The panel runs the same listing without blocking
        (``startLayerListing``).
        """
        from SegHiResCAMLib.panel_rules import layer_choices

        described, job, _channels = self.startLayerListing(modelPath)
        return described if job is None else layer_choices(job.wait(300.0))

    def startLayerListing(self, modelPath) -> tuple:
        """Start listing a model's layers; returns ``(rows, job, inputChannels)`` at once.

        Without torch, or before the model's code is trusted, ``rows`` are the model card's layers
        without shapes and ``job`` is None; otherwise ``rows`` is None and ``job`` a started
        ``LayersJob``: ``poll()`` it from a timer, then ``panel_rules.layer_choices(job.result())``
        gives the rows and ``job.result()["in_channels"]`` the channels. ``inputChannels`` is the
        model card's (1 without a card).
        """
        from SegHiResCAMLib.jobs.layers_job import LayersJob
        from SegHiResCAMLib.models.card import ModelCard, find_card  # json only, no torch

        cardPath = find_card(pathlib.Path(modelPath))
        card = ModelCard.load(cardPath) if cardPath else None
        recommended, channels = (list(card.layers), card.in_channels) if card else ([], 1)
        if not self.torchAvailable():
            return [(name, _("(install PyTorch to see shapes)")) for name in recommended], None, channels
        if self.modelCodeToTrust(modelPath) is not None:  # never run untrusted code just to list layers
            untrusted = _("(shapes appear once the model's code is trusted)")
            return [(name, untrusted) for name in recommended], None, channels
        job = LayersJob(modelPath, python_executable=self.pythonExecutable(), temp_root=slicer.app.temporaryPath)
        job.start()
        return None, job, channels

    @staticmethod
    def modelCodeToTrust(modelPath):
        """Why loading the model would run code that comes with it (ask the user first), or None.

        Torch-free: reads file names and configs only.
        """
        from SegHiResCAMLib.models.trust import code_to_trust

        return code_to_trust(modelPath)

    def layerListing(self, modelPath, trustCode: bool = False, timeout: float = 300.0) -> dict:
        """The worker's layer listing: "layers" (name, type, output_shape for a small example input),
        "default_layers" (the model card's), "example_shape", "class_names", "spatial_dims"."""
        from SegHiResCAMLib.jobs.layers_job import LayersJob

        job = LayersJob(modelPath, trust_code=trustCode, python_executable=self.pythonExecutable(),
                        temp_root=slicer.app.temporaryPath)
        return job.wait(timeout)

    def listLayers(self, modelPath, trustCode: bool = False) -> list:
        """The model's layers, each with ``name``, ``type`` and ``output_shape`` (listed by the worker)."""
        import types

        return [
            types.SimpleNamespace(**{**row, "output_shape": tuple(row["output_shape"]) if row["output_shape"] else None})
            for row in self.layerListing(modelPath, trustCode)["layers"]
        ]

    @staticmethod
    def settingsFromParameterNode(parameterNode) -> tuple:
        """The panel's choices as (ExplainSettings, DisplaySettings): the one place they are read.

        The region at a point is the point list's last point, in the input volume's own frame.

        Raises:
            InputError: a choice the settings refuse, or a point list without a placed point.
        """
        from SegHiResCAMLib.mrml.points import markup_point_ras
        from SegHiResCAMLib.panel_rules import sliding_window_choice
        from SegHiResCAMLib.settings import DisplaySettings, ExplainSettings, RegionPoint

        p = parameterNode
        point = None
        if p.region == RegionKind.POINT:
            ras, _label = markup_point_ras(p.regionPoint, p.inputVolume)
            point = RegionPoint(ras, float(p.pointRadius))
        explainSettings = ExplainSettings(
            target_class=int(p.targetClass),
            layers=(p.layer,) if p.layer else (),
            methods=tuple(method.value for method in p.methods),
            target=p.target.value,
            target_threshold=float(p.targetThreshold),
            device=p.device.value,
            slice_axis=p.sliceAxis.axis(),
            region=p.region.value,
            point=point,
            sliding_window=sliding_window_choice(bool(p.slidingWindowsAuto), int(p.patchSize)),
        )
        displaySettings = DisplaySettings(
            opacity=float(p.opacity), lower_threshold=float(p.lowerThreshold), show_3d=bool(p.showIn3D),
            color_legend=bool(p.showColorLegend), side_by_side=bool(p.sideBySide),
        )
        return explainSettings, displaySettings

    def start(
        self,
        inputVolume: vtkMRMLScalarVolumeNode,
        modelPath,
        settings,
        display=None,
        segmentationNode=None,
        segmentId=None,
        outputVolume=None,
        trustCode: bool = False,
        progressCallback=None,
        extraVolumes=(),
    ):
        """Start an explanation in the worker process and return the running ``ExplainJob`` at once.

        :param settings: what to explain (``SegHiResCAMLib.settings.ExplainSettings``; a point region
            is ``ExplainSettings(point=RegionPoint(...))``, see ``pointFromMarkups``).
        :param display: how to show it (``DisplaySettings``); None = the defaults.
        :param segmentationNode, segmentId: the region; None = the settings' region kind (by default
            the model's own prediction).
        :param outputVolume: scalar volume to fill with the first method's heatmap; None = create one.
        :param trustCode: let the model's own code run; see ``modelCodeToTrust``.
        :param progressCallback: called with (fraction, message).
        :param extraVolumes: the images of input channels 2, 3, ... of a multi-channel model, in the
            model card's channel order.
        :return: the job: ``poll()`` it from a timer (True once it ended), ``wait()`` for the heatmap
            node, ``cancel()`` to stop; ``job.output_nodes`` holds one heatmap node per method.
        """
        from SegHiResCAMLib.jobs.explain_job import ExplainJob, JobInputs
        from SegHiResCAMLib.settings import DisplaySettings

        self.ensureTorch(askConfirmation=True)  # in testing mode it refuses instead of installing
        layoutManager = slicer.app.layoutManager()  # None without a main window
        job = ExplainJob(
            slicer.mrmlScene,
            JobInputs(inputVolume, modelPath, segmentationNode, segmentId, trust_code=bool(trustCode),
                      extra_volume_nodes=tuple(extraVolumes)),
            settings,
            display if display is not None else DisplaySettings(),
            output_node=outputVolume,
            python_executable=self.pythonExecutable(),
            progress=progressCallback,
            volume_rendering_logic=slicer.modules.volumerendering.logic(),
            temp_root=slicer.app.temporaryPath,  # the user's Slicer temp folder, not the system's
            layout_node=layoutManager.layoutLogic().GetLayoutNode() if layoutManager else None,
        )
        job.start()
        return job

    def process(
        self,
        inputVolume: vtkMRMLScalarVolumeNode,
        modelPath,
        segmentationNode=None,
        segmentId=None,
        outputVolume=None,
        layer=None,
        targetClass: int = 1,
        method="seg-hires-grad-cam",
        device="auto",
        sliceAxis=None,
        opacity: float = 0.5,
        lowerThreshold: float = 0.2,
        showIn3D: bool = False,
        waitForCompletion: bool = True,
        progressCallback=None,
        trustCode: bool = False,
        target: str = "logits",
        threshold: float = 0.5,
        region=None,
        pointNode=None,
        pointRadius: float = 10.0,
        extraVolumes=(),
    ):
        """Compute the heatmap of a segment's prediction and show it (blocking by default).

        :param inputVolume: the image the model segments.
        :param modelPath: model file (weights + model card beside it, or TorchScript).
        :param segmentationNode: segmentation holding the region; None = the model's own prediction.
        :param segmentId: the segment's ID (or name) in ``segmentationNode``.
        :param outputVolume: scalar volume to fill; None = create one (only when the run succeeds).
        :param layer: layer name, or list of names (averaged); None = the model card's default.
        :param targetClass: the output channel explained.
        :param method: a method name ("seg-hires-grad-cam", "seg-grad-cam", ...) or ``CamMethod``, or a
            list of them: one heatmap each from one run (the first is returned and shown in front).
        :param device: "auto", "cuda", "cpu" or ``ComputeDevice``.
        :param sliceAxis: for 2D models, array axis 0/1/2 (K/J/I); None = the model card's.
        :param opacity, lowerThreshold, showIn3D: how the heatmap is shown.
        :param waitForCompletion: True blocks and returns the heatmap node; False returns the
            running ``ExplainJob`` as ``start`` does (``start`` is the way to run without blocking).
        :param progressCallback: called with (fraction, message).
        :param target: "logits" (the sum of the class logits over the region) or
            "probability-threshold" (the sum of the class probabilities above ``threshold``), or ``TargetKind``.
        :param threshold: the target threshold of the "probability-threshold" target, strictly between 0 and 1.
        :param trustCode: let the model's own code run (a ``.py`` builder, a MONAI bundle with
            expressions); see ``modelCodeToTrust``.
        :param region: "prediction", "whole-image", "point" or "mask" (or ``RegionKind``); None = from
            what is given (a point, a segment, else the model's prediction).
        :param pointNode, pointRadius: a Markups point list whose last point is the region's point, and the
            sphere's radius in mm where the model predicts nothing there.
        :param extraVolumes: the images of input channels 2, 3, ... of a multi-channel model (card order).
        :raises SegHiResCAMError: with the worker's one-line message when the run fails.
        """
        from SegHiResCAMLib.settings import DisplaySettings, ExplainSettings, RegionPoint

        methods = method if isinstance(method, (list, tuple)) else (method,)
        point = None
        if pointNode is not None:
            point = RegionPoint(self.pointFromMarkups(pointNode, inputVolume), float(pointRadius))
        settings = ExplainSettings(
            target_class=int(targetClass),
            layers=() if not layer else layer,
            methods=tuple(m.value if isinstance(m, CamMethod) else str(m) for m in methods),
            target=target.value if isinstance(target, TargetKind) else str(target),
            target_threshold=float(threshold),
            device=device.value if isinstance(device, ComputeDevice) else str(device),
            slice_axis=sliceAxis,
            region=region.value if isinstance(region, RegionKind) else region,
            point=point,
        )
        display = DisplaySettings(opacity=float(opacity), lower_threshold=float(lowerThreshold), show_3d=bool(showIn3D))
        job = self.start(inputVolume, modelPath, settings, display, segmentationNode, segmentId, outputVolume,
                         trustCode, progressCallback, extraVolumes)
        if not waitForCompletion:
            return job
        heatmap = job.wait()
        logging.info(f"SegHiResCAM: {job.summary}")
        return heatmap

    @staticmethod
    def pointFromMarkups(markupsNode, volumeNode) -> tuple:
        """(R, A, S) of the point list's last placed point in the volume's own frame (for ``RegionPoint``)."""
        from SegHiResCAMLib.mrml.points import markup_point_ras

        return markup_point_ras(markupsNode, volumeNode)[0]

    @staticmethod
    def showSideBySide(heatmapNodes, referenceVolume) -> list:
        """One linked slice view per heatmap, each over ``referenceVolume`` (e.g. ``job.output_nodes.values()``)."""
        from SegHiResCAMLib.mrml.compare_views import show_side_by_side

        layoutManager = slicer.app.layoutManager()
        views = show_side_by_side(slicer.mrmlScene, referenceVolume, list(heatmapNodes),
                                  layoutManager.layoutLogic().GetLayoutNode() if layoutManager else None)
        if layoutManager:
            layoutManager.resetSliceViews()  # fit the new views to the image
        return views

    @staticmethod
    def isHeatmap(node) -> bool:
        """True for a volume node that SegHiResCAM made and showed as a heatmap."""
        from SegHiResCAMLib.mrml.heatmap_display import HEATMAP_ATTRIBUTE

        return node is not None and node.GetImageData() is not None and node.GetAttribute(HEATMAP_ATTRIBUTE) == "1"

    def updateDisplay(self, heatmapNode, opacity: float, lowerThreshold: float, showIn3D: bool,
                      colorLegend=None) -> None:
        """Change how a shown heatmap looks (opacity, transparent below a value, 3D rendering, colour bar;
        ``colorLegend`` None leaves the colour bar as it is)."""
        from SegHiResCAMLib.mrml import heatmap_display

        if colorLegend is not None:
            heatmap_display.set_color_legend(slicer.mrmlScene, heatmapNode, bool(colorLegend))
        heatmap_display.set_heatmap_opacity(slicer.mrmlScene, heatmapNode, opacity)
        heatmap_display.set_lower_threshold(slicer.mrmlScene, heatmapNode, lowerThreshold)
        heatmap_display.set_show_in_3d(
            slicer.mrmlScene, heatmapNode, showIn3D, volume_rendering_logic=slicer.modules.volumerendering.logic()
        )


#
# SegHiResCAMTest
#


class SegHiResCAMTest(ScriptedLoadableModuleTest):
    """Runs the logic on CPU with a tiny model shipped in Resources/Models (seconds)."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        # As SlicerTotalSegmentator's self-test does without its heavy dependencies: skip with a
        # logged reason. Never install PyTorch (gigabytes) from a test.
        if not SegHiResCAMLogic.torchAvailable():
            logging.warning("SegHiResCAM self-test skipped: PyTorch is not installed (install it with 'PyTorch Utils').")
            return
        self.setUp()
        self.test_heatmap_has_input_geometry_and_mass_on_the_evidence()
        self.setUp()
        self.test_missing_segment_gives_clear_error_and_no_node()
        self.setUp()
        self.test_a_point_on_the_ball_and_two_methods_give_two_named_heatmaps()

    def _syntheticBall(self):
        """A 32³ noisy volume with one bright ball (the evidence) and a segment covering the ball."""
        import numpy as np

        rng = np.random.default_rng(1)
        size, centre, radius = 32, np.array([12.0, 18.0, 15.0]), 5.0
        grid = np.indices((size, size, size))
        ball = ((grid - centre[:, None, None, None]) ** 2).sum(0) <= radius**2
        image = rng.normal(100.0, 10.0, (size,) * 3) + 30.0 * ball
        ijkToRAS = np.array([[-1.2, 0, 0, 20.0], [0, -1.2, 0, -5.0], [0, 0, 2.0, 7.0], [0, 0, 0, 1]])
        volume = slicer.util.addVolumeFromArray(image.astype(np.float32), ijkToRAS=ijkToRAS, name="SelfTestImage")
        labelmap = slicer.util.addVolumeFromArray(
            ball.astype(np.uint8), ijkToRAS=ijkToRAS, name="SelfTestBall", nodeClassName="vtkMRMLLabelMapVolumeNode"
        )
        segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "SelfTestSegmentation")
        segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
        slicer.modules.segmentations.logic().ImportLabelmapToSegmentationNode(labelmap, segmentation)
        slicer.mrmlScene.RemoveNode(labelmap)
        segmentId = segmentation.GetSegmentation().GetNthSegmentID(0)
        return volume, segmentation, segmentId, ball, grid, centre, radius

    def _modelPath(self) -> str:
        return os.path.join(os.path.dirname(__file__), "Resources", "Models", "SelfTestBallUNet.pt")

    def test_heatmap_has_input_geometry_and_mass_on_the_evidence(self):
        import numpy as np

        self.delayDisplay("Explaining a synthetic ball with the tiny self-test model on CPU")
        volume, segmentation, segmentId, ball, grid, centre, radius = self._syntheticBall()
        logic = SegHiResCAMLogic()
        heatmap = logic.process(
            volume, self._modelPath(), segmentation, segmentId, targetClass=1, method="seg-hires-grad-cam", device="cpu"
        )
        self.assertIsNotNone(heatmap)
        self.assertEqual(heatmap.GetImageData().GetDimensions(), volume.GetImageData().GetDimensions())
        expected, actual = vtk.vtkMatrix4x4(), vtk.vtkMatrix4x4()
        volume.GetIJKToRASMatrix(expected)
        heatmap.GetIJKToRASMatrix(actual)
        for row in range(4):
            for col in range(4):
                self.assertAlmostEqual(actual.GetElement(row, col), expected.GetElement(row, col), places=6)
        values = slicer.util.arrayFromVolume(heatmap)
        self.assertTrue(np.isfinite(values).all())
        self.assertAlmostEqual(float(values.max()), 1.0, places=4)
        near = ((grid - centre[:, None, None, None]) ** 2).sum(0) <= (radius + 4) ** 2
        share = float(values[near].sum() / values.sum())
        self.assertGreater(share, 0.6, f"only {share:.0%} of the heatmap lies on the ball")
        self.delayDisplay(f"Test passed: {share:.0%} of the heatmap on the evidence")

    def test_a_point_on_the_ball_and_two_methods_give_two_named_heatmaps(self):
        import numpy as np

        self.delayDisplay("Explaining the predicted ball at a markup point with two methods")
        volume, _segmentation, _segmentId, _ball, _grid, centre, _radius = self._syntheticBall()
        ijkToRAS = vtk.vtkMatrix4x4()
        volume.GetIJKToRASMatrix(ijkToRAS)
        k, j, i = centre
        r, a, s, _one = ijkToRAS.MultiplyPoint([i, j, k, 1.0])
        points = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "Lesion")
        points.AddControlPoint(r, a, s, "L-1")
        logic = SegHiResCAMLogic()
        job = logic.process(volume, self._modelPath(), method=["seg-hires-grad-cam", "seg-grad-cam"], pointNode=points,
                            device="cpu", waitForCompletion=False)
        first = job.wait()
        self.assertEqual(len(job.output_nodes), 2)
        self.assertIs(first, job.output_nodes["seg-hires-grad-cam"])
        self.assertIn("Seg-Grad CAM", job.output_nodes["seg-grad-cam"].GetName())
        self.assertAlmostEqual(float(np.max(slicer.util.arrayFromVolume(first))), 1.0, places=4)
        self.assertIn("region: the prediction at the point", job.summary)

    def test_missing_segment_gives_clear_error_and_no_node(self):
        from SegHiResCAMLib.errors import InputError

        volume, segmentation, _segmentId, *_ = self._syntheticBall()
        before = slicer.mrmlScene.GetNumberOfNodes()
        with self.assertRaises(InputError) as caught:
            SegHiResCAMLogic().process(volume, self._modelPath(), segmentation, "NoSuchSegment", device="cpu")
        # The exact class: a MissingDependencyError (no torch) is a SegHiResCAMError too.
        self.assertIs(type(caught.exception), InputError)
        self.assertIn("NoSuchSegment", str(caught.exception))
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), before)
