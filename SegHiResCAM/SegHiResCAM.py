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
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

#: Parameter-node fields bound by hand in the widget (their widgets have no GUI connector:
#: the layer list is filled at run time, the segment selector is a Slicer widget, and the
#: model field must accept folders and an emptied field, which ctkPathLineEdit's connector
#: never passes on). Every other field is bound through a ``SlicerParameterName`` property
#: in the .ui file.
HAND_BOUND_PARAMETERS = ("layer", "roiSegmentId", "modelPath")

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

    inputVolume - the image the model segments.
    modelPath - the model file (weights + model card, or TorchScript).
    layer - the explained layer ("" = the model card's default).
    targetClass - the output channel whose prediction is explained.
    roiSegmentation, roiSegmentId - the region (segment) explained; none = the model's prediction.
    method, target, targetThreshold - the heatmap method and the target (targetThreshold: the
        probability t of the probability-threshold target).
    device, sliceAxis - where and how to compute (sliceAxis only for 2D models).
    outputHeatmap - the volume that receives the heatmap (none = create one).
    opacity, lowerThreshold, showIn3D - how the heatmap is shown (live).
    """

    inputVolume: vtkMRMLScalarVolumeNode
    modelPath: pathlib.Path
    layer: str = ""
    targetClass: Annotated[int, WithinRange(0, 255)] = 1
    roiSegmentation: vtkMRMLSegmentationNode
    roiSegmentId: str = ""
    method: CamMethod = CamMethod.SEG_HIRES_GRAD_CAM
    target: TargetKind = TargetKind.LOGITS
    # Strictly inside (0, 1): ExplainSettings refuses 0 and 1, which would select every voxel or none.
    targetThreshold: Annotated[float, WithinRange(0.01, 0.99)] = 0.5
    device: ComputeDevice = ComputeDevice.AUTO
    sliceAxis: SliceAxis = SliceAxis.MODEL_CARD
    outputHeatmap: vtkMRMLScalarVolumeNode
    opacity: Annotated[float, WithinRange(0.0, 1.0)] = 0.5
    lowerThreshold: Annotated[float, WithinRange(0.0, 1.0)] = 0.2
    showIn3D: bool = False


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
        self._shownDisplay = None  # (node id, opacity, threshold, show3D) last applied
        self._pollTimer = None

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

        self._pollTimer = qt.QTimer()
        self._pollTimer.setInterval(self.POLL_INTERVAL_MS)
        self._pollTimer.connect("timeout()", self.onPollJob)

        self.initializeParameterNode()

    def cleanup(self) -> None:
        """Stop a running job and drop observers when the module is destroyed."""
        self._cancelJob()
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
        self._refreshLayerList()  # cheap unless the model path changed
        self._syncSegmentSelector()
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
        if not (p and _hasModelPath(p.modelPath)):
            missing.append(_("a model file or folder"))
        if p and p.roiSegmentation and not p.roiSegmentId:
            missing.append(_("a segment"))
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
        """Fill the layer list from the model (with output shapes), or from its card without torch.

        A model that cannot be listed leaves the card's default only, says why in the status
        line (not in a dialog: the path may be half typed) and lets the rest of the panel's
        update run; ``slicer.util.tryWithErrorDisplay`` would re-raise and abort it. A new
        model clears a layer it does not have.
        """
        from SegHiResCAMLib.panel_rules import layer_to_keep

        p = self._parameterNode
        path = str(p.modelPath) if p and _hasModelPath(p.modelPath) else ""
        if path == self._layersForModel:
            return
        previous, self._layersForModel = self._layersForModel, path
        described, problem = None, ""
        if path and os.path.exists(path):
            slicer.app.setOverrideCursor(qt.Qt.WaitCursor)
            try:
                described = self.logic.describeLayers(path)
            except Exception as error:  # any failure of the model's own loading: reported, the panel goes on
                problem = _("Cannot list the layers of {path}: {message}").format(
                    path=path, message=str(error).splitlines()[0] if str(error) else type(error).__name__
                )
                logging.warning(f"SegHiResCAM: {problem}")
            finally:
                slicer.app.restoreOverrideCursor()
        if problem or self.ui.statusLabel.text == self._layerProblem:
            self.ui.statusLabel.text = problem
        self._layerProblem = problem
        combo = self.ui.layerComboBox
        wasBlocked = combo.blockSignals(True)
        try:
            combo.clear()
            combo.addItem(_("Model card's default layer"), "")
            for name, description in described or []:
                combo.addItem(f"{name}  {description}", name)
        finally:
            combo.blockSignals(wasBlocked)
        if p is not None:
            layers = [name for name, _description in described] if described is not None else None
            kept = layer_to_keep(p.layer, previous, path, layers)
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

    def _applyLiveDisplay(self) -> None:
        """Opacity, threshold and 3D act at once on the heatmap already shown."""
        p = self._parameterNode
        node = p.outputHeatmap if p else None
        if node is None or self._job is not None or not self.logic.isHeatmap(node):
            return
        wanted = (node.GetID(), float(p.opacity), float(p.lowerThreshold), bool(p.showIn3D))
        if wanted == self._shownDisplay:
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to update the heatmap display.")):
            self.logic.updateDisplay(node, opacity=p.opacity, lowerThreshold=p.lowerThreshold, showIn3D=p.showIn3D)
        self._shownDisplay = wanted

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
            self._job = self.logic.start(
                p.inputVolume,
                p.modelPath,
                settings,
                display,
                segmentationNode=p.roiSegmentation,
                segmentId=p.roiSegmentId or None,
                outputVolume=p.outputHeatmap,
                trustCode=trustCode,
                progressCallback=self._onProgress,
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
            # show_heatmap already applied these display values.
            self._shownDisplay = (job.output_node.GetID(), float(p.opacity), float(p.lowerThreshold), bool(p.showIn3D))
            p.outputHeatmap = job.output_node
            self.ui.statusLabel.text = _("Done on {device} in {seconds:.1f} s.").format(
                device=job.device or "?", seconds=job.seconds or 0.0
            ) + ("" if not job.warnings else " " + _("Warnings: {w}").format(w="; ".join(job.warnings)))
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
        for section in (self.ui.inputsCollapsibleButton, self.ui.methodCollapsibleButton):
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
        """(name, "Type  C×D×H×W") for each explainable layer, the model card's choices first.

        The shapes come from the worker process (Slicer's own process never loads torch for
        them); without torch, or before the model's code is trusted, only the model card's layers
        are listed, without shapes.
        """
        from SegHiResCAMLib.models.card import ModelCard, find_card  # json only, no torch

        card = find_card(pathlib.Path(modelPath))
        recommended = list(ModelCard.load(card).layers) if card else []
        if not self.torchAvailable():
            return [(name, _("(install PyTorch to see shapes)")) for name in recommended]
        if self.modelCodeToTrust(modelPath) is not None:  # never run untrusted code just to list layers
            return [(name, _("(shapes appear once the model's code is trusted)")) for name in recommended]
        listing = self.layerListing(modelPath)
        described = {
            row["name"]: f"{row['type']}  {'×'.join(map(str, row['output_shape'][1:]))}"
            for row in listing["layers"]
            # containers and unused modules have no output to explain; "unusable" says why a layer
            # cannot be explained (called several times, no tensor out): `seghirescam layers` shows it
            if row["output_shape"] and not row["unusable"]
        }
        first = [name for name in listing["default_layers"] if name in described]  # the card's picks, starred
        return [(name, described[name] + "  ★") for name in first] + [
            (name, text) for name, text in described.items() if name not in first
        ]

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
        """The panel's choices as (ExplainSettings, DisplaySettings): the one place they are read."""
        from SegHiResCAMLib.settings import DisplaySettings, ExplainSettings

        p = parameterNode
        explainSettings = ExplainSettings(
            target_class=int(p.targetClass),
            layers=(p.layer,) if p.layer else (),
            methods=(p.method.value,),
            target=p.target.value,
            target_threshold=float(p.targetThreshold),
            device=p.device.value,
            slice_axis=p.sliceAxis.axis(),
        )
        displaySettings = DisplaySettings(
            opacity=float(p.opacity), lower_threshold=float(p.lowerThreshold), show_3d=bool(p.showIn3D)
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
    ):
        """Start an explanation in the worker process and return the running ``ExplainJob`` at once.

        :param settings: what to explain (``SegHiResCAMLib.settings.ExplainSettings``).
        :param display: how to show it (``DisplaySettings``); None = the defaults.
        :param segmentationNode, segmentId: the region; None = the model's own prediction.
        :param outputVolume: scalar volume to fill with the first method's heatmap; None = create one.
        :param trustCode: let the model's own code run; see ``modelCodeToTrust``.
        :param progressCallback: called with (fraction, message).
        :return: the job: ``poll()`` it from a timer (True once it ended), ``wait()`` for the heatmap
            node, ``cancel()`` to stop; ``job.output_nodes`` holds one heatmap node per method.
        """
        from SegHiResCAMLib.jobs.explain_job import ExplainJob, JobInputs
        from SegHiResCAMLib.settings import DisplaySettings

        self.ensureTorch(askConfirmation=True)  # in testing mode it refuses instead of installing
        job = ExplainJob(
            slicer.mrmlScene,
            JobInputs(inputVolume, modelPath, segmentationNode, segmentId, trust_code=bool(trustCode)),
            settings,
            display if display is not None else DisplaySettings(),
            output_node=outputVolume,
            python_executable=self.pythonExecutable(),
            progress=progressCallback,
            volume_rendering_logic=slicer.modules.volumerendering.logic(),
            temp_root=slicer.app.temporaryPath,  # the user's Slicer temp folder, not the system's
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
    ):
        """Compute the heatmap of a segment's prediction and show it (blocking by default).

        :param inputVolume: the image the model segments.
        :param modelPath: model file (weights + model card beside it, or TorchScript).
        :param segmentationNode: segmentation holding the region; None = the model's own prediction.
        :param segmentId: the segment's ID (or name) in ``segmentationNode``.
        :param outputVolume: scalar volume to fill; None = create one (only when the run succeeds).
        :param layer: layer name, or list of names (averaged); None = the model card's default.
        :param targetClass: the output channel explained.
        :param method: a method name ("seg-hires-grad-cam", "seg-grad-cam", ...) or ``CamMethod``.
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
        :raises SegHiResCAMError: with the worker's one-line message when the run fails.
        """
        from SegHiResCAMLib.settings import DisplaySettings, ExplainSettings

        settings = ExplainSettings(
            target_class=int(targetClass),
            layers=() if not layer else layer,
            methods=(method.value if isinstance(method, CamMethod) else str(method),),
            target=target.value if isinstance(target, TargetKind) else str(target),
            target_threshold=float(threshold),
            device=device.value if isinstance(device, ComputeDevice) else str(device),
            slice_axis=sliceAxis,
        )
        display = DisplaySettings(opacity=float(opacity), lower_threshold=float(lowerThreshold), show_3d=bool(showIn3D))
        job = self.start(inputVolume, modelPath, settings, display, segmentationNode, segmentId, outputVolume,
                         trustCode, progressCallback)
        if not waitForCompletion:
            return job
        heatmap = job.wait()
        logging.info(f"SegHiResCAM: heatmap computed on {job.device} in {job.seconds:.2f} s")
        return heatmap

    @staticmethod
    def isHeatmap(node) -> bool:
        """True for a volume node that SegHiResCAM made and showed as a heatmap."""
        from SegHiResCAMLib.mrml.heatmap_display import HEATMAP_ATTRIBUTE

        return node is not None and node.GetImageData() is not None and node.GetAttribute(HEATMAP_ATTRIBUTE) == "1"

    def updateDisplay(self, heatmapNode, opacity: float, lowerThreshold: float, showIn3D: bool) -> None:
        """Change how a shown heatmap looks (opacity, transparent below a value, 3D rendering)."""
        from SegHiResCAMLib.mrml import heatmap_display

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
