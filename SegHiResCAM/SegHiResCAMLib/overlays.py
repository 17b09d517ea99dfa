"""PNG pictures of a heatmap over its image, drawn by Slicer's own slice-view code.

The drawing is done by :func:`SegHiResCAMLib.mrml.render.render_slice_png` (MRML from the
``slicer-core`` wheel, offscreen), so the pictures are what Slicer's slice views show. That
package is optional for the command line: without it the caller gets the reason and writes
the heatmap files only.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .volume import Volume

ORIENTATIONS = ("axial", "coronal", "sagittal")


def rendering_unavailable() -> str | None:
    """Why slice pictures cannot be drawn here, or None when they can."""
    try:
        from .mrml import render  # noqa: F401  (imports slicer, vtk)
    except ImportError as error:
        return (
            f"slice pictures need the slicer-core package ({error}); install it with "
            "pip install 'seghirescam[slicer]'"
        )
    return None


def peak_ras(heatmap: Volume) -> np.ndarray:
    """RAS position of the map's hottest voxel (the first one, if several)."""
    k, j, i = np.unravel_index(int(np.argmax(heatmap.array)), heatmap.array.shape)
    return (heatmap.ijk_to_ras @ np.array([i, j, k, 1.0]))[:3]


def render_overlays(
    image: Volume,
    heatmap: Volume,
    stem: str | Path,
    orientations: Sequence[str] = ORIENTATIONS,
    *,
    single_path: str | Path | None = None,
    point_ras: Sequence[float] | None = None,
) -> tuple[list[Path], str | None]:
    """Write one PNG per orientation: the image, with the heatmap as a coloured overlay.

    Args:
        image: the explained image (greyscale background).
        heatmap: its map, on the same grid, values in [0, 1].
        stem: file names are ``<stem>_<orientation>.png``.
        orientations: any of "axial", "coronal", "sagittal".
        single_path: with one orientation, write exactly this file instead.
        point_ras: an (R, A, S) point every slice passes through; None = the image's centre.

    Returns:
        ``(paths written, None)``, or ``([], reason)`` when slice pictures cannot be drawn here.
    """
    reason = rendering_unavailable()
    if reason is not None:
        return [], reason
    import slicer

    from .mrml.heatmap_display import show_heatmap
    from .mrml.render import render_slice_png
    from .mrml.scene import new_scene
    from .mrml.volumes import update_node_from_volume

    scene = new_scene(view_3d=False)
    try:
        image_node = slicer.vtkMRMLScalarVolumeNode()
        image_node.SetName("image")
        scene.AddNode(image_node)
        update_node_from_volume(image_node, Volume(np.asarray(image.array, np.float32), image.ijk_to_ras))
        image_node.CreateDefaultDisplayNodes()
        # A fixed, robust window (1st..99th percentile), as Slicer's auto window/level would choose.
        low, high = np.percentile(image.array, [1.0, 99.0])
        display = image_node.GetDisplayNode()
        display.AutoWindowLevelOff()
        display.SetWindowLevelMinMax(float(low), float(high) if high > low else float(low) + 1.0)
        heat_node = show_heatmap(scene, np.asarray(heatmap.array, np.float32), image_node, show_3d=False)
        written: list[Path] = []
        for orientation in orientations:
            if single_path is not None and len(orientations) == 1:
                path = Path(single_path)
            else:
                path = Path(f"{stem}_{orientation}.png")
            render_slice_png(scene, image_node, heat_node, path, orientation=orientation.capitalize(),
                             offset_ras=None if point_ras is None else [float(v) for v in point_ras])
            written.append(path)
    finally:
        scene.Clear(1)
    return written, None
