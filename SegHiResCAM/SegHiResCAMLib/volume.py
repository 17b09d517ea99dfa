"""A voxel array that travels with its geometry (numpy only, no torch, no Slicer).

Arrays are in KJI order, as ``slicer.util.arrayFromVolume`` gives them, and the
geometry is the 4x4 IJK-to-RAS matrix that Slicer volume nodes carry.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .errors import InputError

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass(frozen=True)
class Volume:
    """An image or map on a voxel grid.

    Attributes:
        array: ``(K, J, I)`` for one channel, or ``(C, K, J, I)`` for several.
        ijk_to_ras: 4x4 matrix mapping voxel index (i, j, k, 1) to RAS millimetres.
    """

    array: np.ndarray
    ijk_to_ras: np.ndarray = field(default_factory=lambda: np.eye(4))

    def __post_init__(self) -> None:
        matrix = np.asarray(self.ijk_to_ras, dtype=float)
        if matrix.shape != (4, 4):
            raise InputError(f"ijk_to_ras must be a 4x4 matrix, got shape {matrix.shape}")
        object.__setattr__(self, "ijk_to_ras", matrix)

    @property
    def spatial_shape(self) -> tuple[int, int, int]:
        """``(K, J, I)``, whatever the number of channels."""
        return tuple(self.array.shape[-3:])  # type: ignore[return-value]

    @property
    def spacing(self) -> np.ndarray:
        """Voxel size in mm along I, J, K."""
        return np.linalg.norm(self.ijk_to_ras[:3, :3], axis=0)

    @property
    def direction_ras(self) -> np.ndarray:
        """3x3 matrix whose columns are the unit RAS directions of I, J, K."""
        return self.ijk_to_ras[:3, :3] / self.spacing

    @property
    def origin_ras(self) -> np.ndarray:
        """RAS position of voxel (0, 0, 0)."""
        return self.ijk_to_ras[:3, 3].copy()

    def with_array(self, array: np.ndarray) -> "Volume":
        """The same geometry with another array (for example the heatmap)."""
        return Volume(array, self.ijk_to_ras)


def ijk_to_ras_from_itk(origin_lps, spacing, direction_lps) -> np.ndarray:
    """Build IJK-to-RAS from ITK's LPS origin, spacing and row-major 3x3 direction."""
    ijk_to_lps = np.eye(4)
    ijk_to_lps[:3, :3] = np.asarray(direction_lps, float).reshape(3, 3) * np.asarray(spacing, float)
    ijk_to_lps[:3, 3] = origin_lps
    return LPS_TO_RAS @ ijk_to_lps


def itk_geometry_from_ijk_to_ras(ijk_to_ras: np.ndarray) -> tuple[tuple, tuple, tuple]:
    """Inverse of :func:`ijk_to_ras_from_itk`: (origin_lps, spacing, direction_lps row-major)."""
    ijk_to_lps = LPS_TO_RAS @ np.asarray(ijk_to_ras, float)
    spacing = np.linalg.norm(ijk_to_lps[:3, :3], axis=0)
    direction = ijk_to_lps[:3, :3] / spacing
    return tuple(ijk_to_lps[:3, 3]), tuple(spacing), tuple(direction.ravel())
