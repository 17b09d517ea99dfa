"""MRML glue, node adapters only: volume and segmentation nodes <-> numpy, heatmap display,
offscreen slice rendering. (What drives a worker from the scene lives in ``SegHiResCAMLib.jobs``.)

Uses only MRML classes that the slicer-core wheel also has (no qt, no ``slicer.app``, no
``slicer.mrmlScene``), so the same code runs in Slicer and in pytest. Every function takes
the scene explicitly; inside Slicer pass ``slicer.mrmlScene``. The submodules import
``slicer``, so import them only where slicer (or slicer-core) is installed:

>>> from SegHiResCAMLib.mrml import new_scene, show_heatmap, segment_mask
"""

from __future__ import annotations

from ..lazy import lazy_getattr

_LAZY = {
    "new_scene": "scene",
    "node_ids": "scene",
    "remove_nodes_added_since": "scene",
    "register_segmentation_converters": "scene",
    "volume_from_node": "volumes",
    "update_node_from_volume": "volumes",
    "array_from_node": "volumes",
    "ijk_to_ras_of_node": "volumes",
    "write_volume_node": "volumes",
    "read_volume_node": "volumes",
    "read_volume_array": "volumes",
    "write_mask_like": "volumes",
    "segment_mask": "segments",
    "segment_names": "segments",
    "find_segment_id": "segments",
    "show_heatmap": "heatmap_display",
    "heatmap_node_name": "heatmap_display",
    "set_heatmap_opacity": "heatmap_display",
    "set_lower_threshold": "heatmap_display",
    "set_show_in_3d": "heatmap_display",
    "heat_color_node": "heatmap_display",
    "set_color_legend": "heatmap_display",
    "show_side_by_side": "compare_views",
    "markup_point_ras": "points",
    "render_slice_png": "render",
    "render_slice_rgb": "render",
    "read_png": "render",
    "write_png": "render",
}

__all__ = sorted(_LAZY)


__getattr__ = lazy_getattr(__name__, _LAZY)
