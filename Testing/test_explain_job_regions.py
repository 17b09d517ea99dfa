"""What the panel's logic runs for issue 10, with real MRML nodes (slicer-core) and the real worker:
the region at a Markups point, several methods side by side with a colour bar each, extra input
channels in the model card's order, and the one-line summary of a run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.ndimage as ndi
import slicer
import torch
import vtk

from mrml_helpers import add_segment, add_segmentation, add_volume
from SegHiResCAMLib.errors import DisplayError, InputError
from SegHiResCAMLib.jobs.explain_job import ExplainJob, JobInputs, summary_line
from SegHiResCAMLib.models.loading import load_model
from SegHiResCAMLib.mrml.compare_views import SIDE_BY_SIDE_LAYOUT_ID, show_side_by_side, side_by_side_layout
from SegHiResCAMLib.mrml.heatmap_display import OPACITY_ATTRIBUTE, set_color_legend, show_heatmap
from SegHiResCAMLib.mrml.points import markup_point_ras
from SegHiResCAMLib.mrml.scene import new_scene, node_ids
from SegHiResCAMLib.mrml.volumes import array_from_node, volume_from_node
from SegHiResCAMLib.pipeline import explain_volume
from SegHiResCAMLib.settings import DisplaySettings, ExplainSettings, RegionPoint
from SegHiResCAMLib.volume import Volume
from tolerances import EPS32, geometry_atol

MODEL = Path(__file__).resolve().parents[1] / "SegHiResCAM" / "Resources" / "Models" / "SelfTestBallUNet.pt"
IJK_TO_RAS = np.array([[-1.2, 0, 0, 20.0], [0, -1.2, 0, -5.0], [0, 0, 2.0, 7.0], [0, 0, 0, 1]])
SIZE = 32
BALL_A, BALL_B = (np.array([10.0, 10.0, 10.0]), 4.0), (np.array([21.0, 22.0, 20.0]), 5.0)


def balls(*which) -> np.ndarray:
    grid = np.indices((SIZE,) * 3)
    mask = np.zeros((SIZE,) * 3, bool)
    for centre, radius in which:
        mask |= ((grid - centre[:, None, None, None]) ** 2).sum(0) <= radius**2
    return mask


def image_of(mask: np.ndarray, seed: int = 1) -> np.ndarray:
    return (np.random.default_rng(seed).normal(100.0, 10.0, mask.shape) + 30.0 * mask).astype(np.float32)


def ras_of(kji) -> np.ndarray:
    k, j, i = kji
    return (IJK_TO_RAS @ np.array([i, j, k, 1.0]))[:3]


def scene_with_layout():
    """A scene with Slicer's layout logic watching it, as in the application."""
    scene = new_scene()
    layout_logic = slicer.vtkMRMLLayoutLogic()
    layout_logic.SetMRMLScene(scene)
    return scene, layout_logic


def cpu(**choices) -> ExplainSettings:
    return ExplainSettings(**{"target_class": 1, "device": "cpu", **choices})


# -- several methods: one node each, a colour bar each, side by side --------------------------


@pytest.mark.process
def test_several_methods_side_by_side_each_with_its_colour_bar_and_a_summary_line():
    scene, layout_logic = scene_with_layout()
    ball = balls(BALL_A)
    volume = add_volume(scene, image_of(ball), IJK_TO_RAS, name="Ball image")
    segmentation = add_segmentation(scene)
    segment_id = add_segment(segmentation, ball, IJK_TO_RAS, "ball", "Ball")
    methods = ("seg-hires-grad-cam", "seg-grad-cam")
    job = ExplainJob(scene, JobInputs(volume, MODEL, segmentation, segment_id), cpu(methods=methods),
                     DisplaySettings(opacity=0.4, side_by_side=True))
    job.wait(timeout=120)

    nodes = [job.output_nodes[method] for method in methods]
    assert [node.GetName() for node in nodes] == ["Ball image Seg-HiRes-Grad CAM decoder.0 heatmap",
                                                  "Ball image Seg-Grad CAM decoder.0 heatmap"]
    expected, _ = explain_volume(load_model(MODEL), volume_from_node(volume), cpu(methods=methods), roi=ball)
    for method, node in zip(methods, nodes):
        # the worker is another process, maybe with another thread count: within the float32 reordering
        # bound of this U-Net's 26 layers of at most 432 terms (see test_explain_job), at the map's scale 1
        np.testing.assert_allclose(array_from_node(node), expected[method].array, rtol=0, atol=26 * 432 * EPS32)
        legend = slicer.vtkSlicerColorLogic.GetColorLegendDisplayNode(node)
        assert legend is not None and legend.GetVisibility() and legend.GetPrimaryDisplayNode() is node.GetDisplayNode()
        assert legend.GetTitleText() == node.GetName()
    # One linked axial view per heatmap, each with the image behind it.
    assert layout_logic.GetLayoutNode().GetViewArrangement() == SIDE_BY_SIDE_LAYOUT_ID
    views = composites_by_name(scene)
    for index, node in enumerate(nodes, start=1):
        view = views[f"SegHiResCAM{index}"]
        assert (view.GetBackgroundVolumeID(), view.GetForegroundVolumeID()) == (volume.GetID(), node.GetID())
        assert view.GetLinkedControl() and view.GetForegroundOpacity() == 0.4  # exact: VTK keeps the double
        assert slice_node(scene, f"SegHiResCAM{index}").GetOrientation() == "Axial"
    # The status line: methods, layer, class, region and size, device, time.
    assert job.summary.startswith("Seg-HiRes-Grad CAM, Seg-Grad CAM at layer decoder.0, class 1 (ball); "
                                  "region: the segment 'Ball' (")
    assert f"({int(ball.sum()):,} voxels); cpu, " in job.summary and job.summary.endswith(" s")


def composites_by_name(scene) -> dict:
    return {node.GetLayoutName(): node for node in (scene.GetNthNodeByClass(i, "vtkMRMLSliceCompositeNode")
                                                   for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode")))}


def slice_node(scene, name: str):
    return next(node for node in (scene.GetNthNodeByClass(i, "vtkMRMLSliceNode")
                                  for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceNode")))
                if node.GetLayoutName() == name)


def heatmap_scene(count: int = 3):
    scene, layout_logic = scene_with_layout()
    reference = add_volume(scene, image_of(balls(BALL_A)), IJK_TO_RAS, name="CT")
    rng = np.random.default_rng(0)
    heatmaps = [show_heatmap(scene, rng.random((SIZE,) * 3), reference, name=f"h{n}", opacity=0.1 * (n + 1),
                             show_3d=False) for n in range(count)]
    return scene, layout_logic, reference, heatmaps


def test_side_by_side_again_reuses_its_views_and_follows_the_new_order():
    scene, layout_logic, reference, heatmaps = heatmap_scene()
    assert show_side_by_side(scene, reference, heatmaps) == ["SegHiResCAM1", "SegHiResCAM2", "SegHiResCAM3"]
    before = node_ids(scene)
    show_side_by_side(scene, reference, heatmaps[::-1])
    assert node_ids(scene) == before
    views = composites_by_name(scene)
    assert [views[f"SegHiResCAM{n}"].GetForegroundVolumeID() for n in (1, 2, 3)] == [h.GetID() for h in heatmaps[::-1]]
    # exact: the double read from the attribute's text is the double set
    assert views["SegHiResCAM1"].GetForegroundOpacity() == float(heatmaps[2].GetAttribute(OPACITY_ATTRIBUTE))
    assert layout_logic.GetViewNodes().GetNumberOfItems() == 3
    assert side_by_side_layout(2).count('class="vtkMRMLSliceNode"') == 2


def test_side_by_side_refuses_a_volume_that_is_not_a_heatmap_and_a_scene_without_layout():
    scene, _, reference, heatmaps = heatmap_scene(1)
    with pytest.raises(InputError, match="'CT' is not a SegHiResCAM heatmap"):
        show_side_by_side(scene, reference, [heatmaps[0], reference])
    bare = new_scene()
    other = add_volume(bare, np.zeros((4, 4, 4), np.float32), np.eye(4), name="CT")
    heat = show_heatmap(bare, np.zeros((4, 4, 4)), other, show_3d=False)
    with pytest.raises(DisplayError, match="no view layout"):
        show_side_by_side(bare, other, [heat])
    job = ExplainJob(bare, JobInputs(other, MODEL), cpu(methods=("seg-hires-grad-cam", "seg-grad-cam")),
                     DisplaySettings(side_by_side=True))
    with pytest.raises(DisplayError, match="no view layout"):
        job.start()
    assert job.state == "new"


def test_the_colour_bar_can_be_hidden_and_shown_again_without_a_second_legend():
    scene, _, reference, (heatmap,) = heatmap_scene(1)
    assert slicer.vtkSlicerColorLogic.GetColorLegendDisplayNode(heatmap) is None  # off unless asked for
    set_color_legend(scene, heatmap, True)
    legend = slicer.vtkSlicerColorLogic.GetColorLegendDisplayNode(heatmap)
    set_color_legend(scene, heatmap, False)
    assert not legend.GetVisibility()
    show_heatmap(scene, np.ones((SIZE,) * 3), reference, output_node=heatmap, show_3d=False, color_legend=True)
    assert legend.GetVisibility() and slicer.vtkSlicerColorLogic.GetNumberOfColorLegendDisplayNodes(heatmap) == 1


# -- the region at a Markups point ------------------------------------------------------------


def test_a_markup_point_is_read_in_the_images_own_frame():
    scene = new_scene()
    volume = add_volume(scene, np.zeros((4, 4, 4), np.float32), IJK_TO_RAS)
    transform = slicer.vtkMRMLLinearTransformNode()
    scene.AddNode(transform)
    to_parent = np.array([[0, -1, 0, 12.0], [1, 0, 0, -3.0], [0, 0, 1, 5.5], [0, 0, 0, 1]])
    matrix = vtk.vtkMatrix4x4()
    matrix.DeepCopy(to_parent.ravel())
    transform.SetMatrixTransformToParent(matrix)
    volume.SetAndObserveTransformNodeID(transform.GetID())
    points = slicer.vtkMRMLMarkupsFiducialNode()
    scene.AddNode(points)
    points.AddControlPoint(1.0, 2.0, 3.0, "F-1")
    points.AddControlPoint(-7.0, 4.0, 9.0, "F-2")  # the last placed point is the one used
    ras, label = markup_point_ras(points, volume)
    np.testing.assert_allclose(ras, (np.linalg.inv(to_parent) @ [-7.0, 4.0, 9.0, 1.0])[:3], rtol=0,
                               atol=geometry_atol(np.abs(to_parent) @ [7.0, 4.0, 9.0, 1.0]))  # float64 matrices
    assert label == "F-2"
    empty = slicer.vtkMRMLMarkupsFiducialNode()
    empty.SetName("P")
    scene.AddNode(empty)
    with pytest.raises(InputError, match="the point list 'P' has no placed point"):
        markup_point_ras(empty, volume)


@pytest.mark.process
def test_a_markup_point_on_one_ball_explains_that_ball_through_the_worker():
    scene = new_scene()
    image = image_of(balls(BALL_A, BALL_B))
    volume = add_volume(scene, image, IJK_TO_RAS, name="Two balls")
    points = slicer.vtkMRMLMarkupsFiducialNode()
    scene.AddNode(points)
    points.AddControlPoint(*ras_of(BALL_B[0]), "F-1")
    ras, _ = markup_point_ras(points, volume)
    settings = cpu(point=RegionPoint(ras, radius_mm=6.0))
    job = ExplainJob(scene, JobInputs(volume, MODEL), settings)
    heat = array_from_node(job.wait(timeout=120))

    loaded = load_model(MODEL)
    x = (image - image.mean()) / image.std()  # the card's z-score, by hand
    with torch.no_grad():
        predicted = (loaded.module(torch.from_numpy(x)[None, None]).argmax(1) == 1)[0].numpy()
    labels, count = ndi.label(predicted)
    assert count == 2
    component = labels == labels[tuple(BALL_B[0].astype(int))]
    expected, _ = explain_volume(loaded, volume_from_node(volume), cpu(), roi=component)
    np.testing.assert_allclose(heat, expected["seg-hires-grad-cam"].array, rtol=0,
                               atol=26 * 432 * EPS32)  # worker process: as above
    assert job.warnings == [] and f"({int(component.sum()):,} voxels)" in job.summary
    assert "region: the prediction at the point (" in job.summary


def test_a_point_outside_the_image_is_refused_before_any_process_starts():
    scene = new_scene()
    volume = add_volume(scene, np.zeros((8, 8, 8), np.float32), IJK_TO_RAS, name="Small")
    before = node_ids(scene)
    job = ExplainJob(scene, JobInputs(volume, MODEL), cpu(point=RegionPoint((500.0, 0.0, 0.0))))
    with pytest.raises(InputError, match=r"the point \(500.0, 0.0, 0.0\) lies outside the image 'Small'"):
        job.start()
    assert job.state == "new" and job.worker_pid is None and node_ids(scene) == before


# -- extra input channels ---------------------------------------------------------------------


def two_channel_model(folder: Path) -> Path:
    """The self-test model with a second input channel in front that it ignores (zero weights):
    its output depends on channel 2 only."""
    card = json.loads(MODEL.with_suffix(".json").read_text(encoding="utf-8"))
    state = torch.load(MODEL, weights_only=True)
    first = state["encoder.0.0.weight"]
    state["encoder.0.0.weight"] = torch.cat([torch.zeros_like(first), first], dim=1)
    card["in_channels"] = card["network"]["args"]["in_channels"] = 2
    weights = folder / "two_channel.pt"
    torch.save(state, weights)
    weights.with_suffix(".json").write_text(json.dumps(card), encoding="utf-8")
    return weights


@pytest.mark.process
def test_extra_channel_volumes_reach_the_model_in_the_cards_order(tmp_path):
    model = two_channel_model(tmp_path)
    scene = new_scene()
    noise = add_volume(scene, image_of(np.zeros((SIZE,) * 3, bool), seed=2), IJK_TO_RAS, name="Noise")
    ball = balls(BALL_A)
    with_ball = add_volume(scene, image_of(ball), IJK_TO_RAS, name="Ball")
    job = ExplainJob(scene, JobInputs(noise, model, extra_volume_nodes=(with_ball,)), cpu())
    heat = array_from_node(job.wait(timeout=120))

    loaded = load_model(model)
    stacked = Volume(np.stack([array_from_node(noise), array_from_node(with_ball)]), IJK_TO_RAS)
    expected, explanation = explain_volume(loaded, stacked, cpu())
    np.testing.assert_allclose(heat, expected["seg-hires-grad-cam"].array, rtol=0,
                               atol=26 * 432 * EPS32)  # worker process: as above
    assert explanation.roi_voxels > 0 and heat.max() == 1.0  # channel 2's ball is predicted; max / max is 1
    swapped, swapped_explanation = explain_volume(loaded, Volume(stacked.array[::-1].copy(), IJK_TO_RAS), cpu())
    assert swapped_explanation.roi_voxels == 0 and not swapped["seg-hires-grad-cam"].array.any()  # the order matters


def test_a_missing_extra_channel_volume_is_refused_before_any_process_starts():
    scene = new_scene()
    volume = add_volume(scene, np.zeros((8, 8, 8), np.float32), IJK_TO_RAS)
    job = ExplainJob(scene, JobInputs(volume, MODEL, extra_volume_nodes=(None,)), cpu())
    with pytest.raises(InputError, match="select an image volume for input channel 2 of the model"):
        job.start()
    assert job.state == "new"


# -- the status line --------------------------------------------------------------------------


def test_the_summary_line_names_every_fact_of_the_run():
    event = {"layers": ["bottleneck", "decoder.0"], "target_class": 2, "class_name": "white matter",
             "roi_voxels": 12345, "device": "cuda:0", "seconds": 3.04}
    line = summary_line(cpu(methods=("seg-grad-cam",)), event, "the whole image")
    assert line == ("Seg-Grad CAM at layers bottleneck + decoder.0, class 2 (white matter); region: the whole image "
                    "(12,345 voxels); cuda:0, 3.0 s")
