"""Three-plane pictures: the layout follows the patient's axes whatever the volume's orientation."""

from __future__ import annotations

import numpy as np
import pytest

from SegHiResCAMLib.pictures import hottest_voxel, intensity_window, plane, save_three_planes
from SegHiResCAMLib.volume import Volume

SHAPE = (10, 12, 14)  # K, J, I


def _volumes():
    """The same patient in an RAS-ordered and an LPS-ordered array (flipped I and J)."""
    rng = np.random.default_rng(0)
    ras_array = rng.random(SHAPE).astype(np.float32)
    ras = Volume(ras_array, np.diag([2.0, 3.0, 4.0, 1.0]))
    lps_matrix = np.diag([-2.0, -3.0, 4.0, 1.0])
    lps_matrix[:3, 3] = [2.0 * (SHAPE[2] - 1), 3.0 * (SHAPE[1] - 1), 0.0]  # same RAS positions
    lps = Volume(np.ascontiguousarray(ras_array[:, ::-1, ::-1]), lps_matrix)
    return ras, lps


def test_planes_are_identical_for_the_same_patient_in_ras_and_lps_arrays():
    ras, lps = _volumes()
    hot_ras = np.zeros(SHAPE, np.float32)
    hot_ras[7, 9, 11] = 1.0  # right (high i), anterior (high j), superior (high k)
    hot_lps = np.ascontiguousarray(hot_ras[:, ::-1, ::-1])
    for name in ("axial", "coronal", "sagittal"):
        a = plane(ras, hot_ras, name, (7, 9, 11))
        b = plane(lps, hot_lps, name, (7, SHAPE[1] - 1 - 9, SHAPE[2] - 1 - 11))
        assert np.array_equal(a.image, b.image) and np.array_equal(a.heat, b.heat)
        # exact: dyadic spacings and origins times whole voxel indices
        assert a.letters == b.letters and a.position == b.position


def test_letters_and_the_hot_voxel_side_match_radiological_layout():
    ras, _ = _volumes()
    heat = np.zeros(SHAPE, np.float32)
    heat[7, 9, 11] = 1.0  # R, A, S of the centre
    expected = {"axial": ("R", "L", "A", "P"), "coronal": ("R", "L", "S", "I"), "sagittal": ("P", "A", "S", "I")}
    for name, letters in expected.items():
        cut = plane(ras, heat, name, (7, 9, 11))
        assert cut.letters == letters
        row, column = np.argwhere(cut.heat == 1.0)[0]
        rows, columns = cut.heat.shape
        # The hot voxel is right/anterior/superior: on the side of the letter naming that direction.
        left, right, top, _ = letters
        horizontal = "left" if column < columns / 2 else "right"
        assert {"left": left, "right": right}[horizontal] in ("R", "A")
        assert row < rows / 2 and top in ("A", "S")
    axial = plane(ras, heat, "axial", (7, 9, 11))
    assert axial.position == ("S", 28.0)  # k = 7 at 4 mm, exact
    assert axial.extent == (0.0, 14 * 2.0, 0.0, 12 * 3.0)  # mm across (R-L) and up (A-P)


def test_hottest_voxel_prefers_the_region_and_the_window_uses_the_images_intensities():
    heat = np.zeros(SHAPE)
    heat[1, 1, 1], heat[5, 5, 5] = 1.0, 0.5
    region = np.zeros(SHAPE, bool)
    region[4:7, 4:7, 4:7] = True
    assert hottest_voxel(heat, region) == (5, 5, 5)
    assert hottest_voxel(heat) == (1, 1, 1)
    values = np.arange(1000, dtype=np.float64).reshape(10, 10, 10)
    # exact: the same np.percentile of the same float64 values
    assert intensity_window(values) == (np.percentile(values, 0.5), np.percentile(values, 99.5))


def test_picture_file_is_written(tmp_path):
    ras, _ = _volumes()
    heat = np.zeros(SHAPE, np.float32)
    heat[3:6, 4:8, 5:9] = 1.0
    path = save_three_planes(tmp_path / "p.png", ras, heat, title="model · layer · method · class · region",
                             region=heat > 0)
    from PIL import Image

    with Image.open(path) as picture:
        assert picture.size[0] > 600 and picture.size[1] > 200
