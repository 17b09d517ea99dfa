"""Which volume a run may overwrite: only heatmaps this module made, never renamed (slicer-core scenes).

The panel's output selector lists only volumes carrying HEATMAP_ATTRIBUTE (qMRMLNodeComboBox's
attribute filter, which also marks the volume its "Create new" action makes); the logic
refuses any other volume before the run, and names only the nodes it creates.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")
vtk = pytest.importorskip("vtk")

from mrml_helpers import add_volume, oblique_ijk_to_ras  # noqa: E402

from SegHiResCAMLib.errors import InputError  # noqa: E402
from SegHiResCAMLib.jobs.explain_job import ExplainJob, JobInputs  # noqa: E402
from SegHiResCAMLib.settings import ExplainSettings  # noqa: E402
from SegHiResCAMLib.mrml.heatmap_display import HEATMAP_ATTRIBUTE, is_heatmap_node, show_heatmap  # noqa: E402
from SegHiResCAMLib.mrml.scene import new_scene, node_ids  # noqa: E402
from SegHiResCAMLib.mrml.volumes import volume_from_node  # noqa: E402

from test_explain_job import MODEL, ball_scene  # noqa: E402

SHAPE = (6, 8, 10)


@pytest.fixture
def scene():
    return new_scene()


@pytest.fixture
def reference(scene):
    return add_volume(scene, np.arange(np.prod(SHAPE), dtype=np.float32).reshape(SHAPE), oblique_ijk_to_ras(), name="CT")


@pytest.fixture
def heat():
    return np.linspace(0.0, 1.0, int(np.prod(SHAPE)), dtype=np.float32).reshape(SHAPE)


def empty_heatmap_node(scene, name: str) -> slicer.vtkMRMLScalarVolumeNode:
    """What the output selector's "Create new volume" makes: an empty volume with the filter's attribute."""
    node = slicer.vtkMRMLScalarVolumeNode()
    node.SetName(name)
    node.SetAttribute(HEATMAP_ATTRIBUTE, "1")
    scene.AddNode(node)
    return node


def test_a_volume_of_the_users_is_refused_as_output_and_left_untouched(scene, reference, heat):
    other = add_volume(scene, np.full(SHAPE, 7.0, np.float32), oblique_ijk_to_ras(), name="T2")
    before, ids = volume_from_node(other), node_ids(scene)
    with pytest.raises(InputError, match="'T2' is not a heatmap made by SegHiResCAM"):
        show_heatmap(scene, heat, reference, output_node=other, name="CT heatmap")
    assert other.GetName() == "T2" and other.GetAttribute(HEATMAP_ATTRIBUTE) is None
    np.testing.assert_array_equal(volume_from_node(other).array, before.array)
    assert node_ids(scene) == ids


def test_a_heatmap_given_as_output_keeps_the_name_the_user_gave_it(scene, reference, heat):
    node = show_heatmap(scene, heat, reference, name="CT heatmap", show_3d=False)
    assert node.GetName() == "CT heatmap" and is_heatmap_node(node)
    node.SetName("tumour, decoder.0")
    again = show_heatmap(scene, heat[::-1].copy(), reference, output_node=node, name="CT heatmap", show_3d=False)
    assert again is node and node.GetName() == "tumour, decoder.0"
    np.testing.assert_array_equal(volume_from_node(node).array, heat[::-1])


def test_an_empty_volume_made_by_the_selector_is_filled_and_keeps_its_name(scene, reference, heat):
    node = empty_heatmap_node(scene, "CAM")
    filled = show_heatmap(scene, heat, reference, output_node=node, name="CT heatmap", show_3d=False)
    assert filled is node and node.GetName() == "CAM"
    np.testing.assert_array_equal(volume_from_node(node).array, heat)


def test_a_new_heatmap_carries_the_attribute_when_it_enters_the_scene(scene, reference, heat):
    # A selector filtering on the attribute decides when the node is added; set later, it is missed.
    marked_on_arrival = {}

    @vtk.calldata_type(vtk.VTK_OBJECT)
    def record(caller, event, node):
        if node.IsA("vtkMRMLScalarVolumeNode"):
            marked_on_arrival[node.GetName()] = node.GetAttribute(HEATMAP_ATTRIBUTE)

    tag = scene.AddObserver(slicer.vtkMRMLScene.NodeAddedEvent, record)
    try:
        show_heatmap(scene, heat, reference, name="CT heatmap", show_3d=False)
    finally:
        scene.RemoveObserver(tag)
    assert marked_on_arrival == {"CT heatmap": "1"}


def test_the_job_refuses_a_users_volume_before_any_work_and_changes_nothing(tmp_path):
    scene, volume, segmentation, segment_id, _ = ball_scene()
    other = add_volume(scene, np.full((32, 32, 32), 3.0, np.float32), np.eye(4), name="Prior CT")
    before, ids = volume_from_node(other), node_ids(scene)
    job = ExplainJob(scene, JobInputs(volume, MODEL, segmentation, segment_id),
                     ExplainSettings(target_class=1, device="cpu"), output_node=other, temp_root=tmp_path)
    with pytest.raises(InputError, match="'Prior CT' is not a heatmap made by SegHiResCAM"):
        job.start()
    assert job.state == "new" and list(tmp_path.iterdir()) == [], "no worker, no temp folder"
    assert other.GetName() == "Prior CT"
    np.testing.assert_array_equal(volume_from_node(other).array, before.array)
    assert node_ids(scene) == ids


@pytest.mark.process
def test_the_job_fills_a_selector_made_volume_keeps_its_name_and_works_under_the_temp_root(tmp_path):
    scene, volume, segmentation, segment_id, near = ball_scene()
    node = empty_heatmap_node(scene, "CAM")
    job = ExplainJob(scene, JobInputs(volume, MODEL, segmentation, segment_id),
                     ExplainSettings(target_class=1, device="cpu"), output_node=node, temp_root=tmp_path)
    job.start()
    assert Path(job.temp_dir).parent == tmp_path
    assert job.wait(timeout=120) is node
    assert node.GetName() == "CAM" and is_heatmap_node(node)
    heat = volume_from_node(node).array
    assert heat[near].sum() / heat.sum() > 0.8
    assert list(tmp_path.iterdir()) == [], "the run's temp folder is gone"
