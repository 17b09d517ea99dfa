"""Soft regions, the exact case of the issue: the demo T1 with its white-matter region multiplied by 0.5.

The target is linear in the region's weights, y = sum_p m(p) z_c(p), so the gradient, and with it the
signed map, of 0.5 m is exactly half that of m, and the normalised heatmap is the same. Exactly, not
approximately: scaling by a power of two commutes with every floating-point rounding (no overflow or
underflow at these magnitudes), so with the same kernels on the same data every intermediate value of
the 0.5 run is exactly half of the 1.0 run's. Both runs of a comparison happen in one test, in one
process, with one thread count, on one 3D volume (batch of one), so the same kernels run in the same
order; the comparisons below are therefore bitwise. (Not across thread counts: a module-scoped oracle
computed before a test changed the thread count differed by 4e-5 relative.)
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import SimpleITK as sitk

from SegHiResCAMLib.cli import main
from SegHiResCAMLib.demo_run import DATA_DIR, T1_FILE, WHITE_MATTER_FILE
from SegHiResCAMLib.io.images import read_image, read_mask
from SegHiResCAMLib.models.loading import load_model
from SegHiResCAMLib.pipeline import explain_volume

MODEL = DATA_DIR / "demo_unet3d.pt"
WHITE_MATTER = 2
WHITE_MATTER_VOXELS = 79458  # label 1 of the bundled region file


@pytest.fixture(scope="module")
def half_region(tmp_path_factory):
    """The bundled white-matter label file as weights 0.5 (float32), on the same grid."""
    labels = sitk.ReadImage(str(DATA_DIR / WHITE_MATTER_FILE))
    half = sitk.GetImageFromArray((sitk.GetArrayFromImage(labels) == 1).astype(np.float32) * 0.5)
    half.CopyInformation(labels)
    path = tmp_path_factory.mktemp("soft") / "white_matter_half.nrrd"
    sitk.WriteImage(half, str(path))
    return path


@pytest.fixture(scope="module")
def demo():
    """The demo T1, its white-matter label region, and the 3D demo model."""
    image = read_image(DATA_DIR / T1_FILE)
    return image, read_mask(DATA_DIR / WHITE_MATTER_FILE, image, label=1), load_model(MODEL)


def label_run(demo):
    """The label file's region through the library: the oracle, computed in the test that uses it."""
    image, mask, loaded = demo
    maps, explanation = explain_volume(loaded, image, target_class=WHITE_MATTER, roi=mask, device="cpu")
    return maps["seg-hires-grad-cam"].array, explanation


def test_half_weight_region_through_the_cli_is_the_label_region(half_region, demo, capsys, tmp_path):
    # Before: int(0.5) == 0 made the region "every voxel that is 0": ROI 534942 voxels, exit 0.
    _, mask, _ = demo
    label_map, explanation = label_run(demo)
    assert int(mask.sum()) == explanation.roi_voxels == WHITE_MATTER_VOXELS
    out = tmp_path / "heat.nrrd"
    code = main(["explain", "--image", str(DATA_DIR / T1_FILE), "--model", str(MODEL), "--class", "white matter",
                 "--roi", str(half_region), "--out", str(out), "--device", "cpu"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert captured.err == ""  # same grid: no warning
    assert int(re.search(r"region (\d+) voxels", captured.out).group(1)) == WHITE_MATTER_VOXELS
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(out))), label_map)  # exact, see above


def test_half_weight_region_through_the_library_gives_the_same_map_and_half_the_signed_map(half_region, demo):
    from SegHiResCAMLib.engine.explain import explain_detailed
    from SegHiResCAMLib.models.preprocess import prepare_input

    image, mask, loaded = demo
    label_map, explanation = label_run(demo)
    weights = read_mask(half_region, image)
    assert weights.dtype == np.float32
    np.testing.assert_array_equal(weights, 0.5 * mask)
    maps, soft = explain_volume(loaded, image, target_class=WHITE_MATTER, roi=weights, device="cpu")
    assert soft.roi_voxels == explanation.roi_voxels == WHITE_MATTER_VOXELS
    np.testing.assert_array_equal(maps["seg-hires-grad-cam"].array, label_map)
    # the signed map (no ReLU, no normalisation) on the model's grid is exactly half
    prepared = prepare_input(image, loaded.card)
    signed = {}
    for name, region in (("labels", mask), ("half", weights)):
        signed[name] = explain_detailed(
            loaded.module, prepared.image, layer=loaded.card.default_layer, target_class=WHITE_MATTER,
            roi=prepared.roi_to_model(region), spatial_dims=3, relu=False, normalize=False, device="cpu",
        ).heatmap
    assert np.abs(signed["labels"]).max() > 0 and (signed["labels"] < 0).any()  # a real signed map
    np.testing.assert_array_equal(signed["half"], 0.5 * signed["labels"])


def test_region_that_vanishes_on_the_models_grid_is_refused(tmp_path):
    # A one-voxel region of a 0.5 mm image is 1/64 of a voxel of a model that runs at 2 mm: nothing of it is
    # left there, and before this was explained as an all-zero map with exit 0.
    from tiny_models import brain_like_image, save_tiny_unet

    from SegHiResCAMLib.errors import InputError
    from SegHiResCAMLib.volume import Volume

    loaded = load_model(save_tiny_unet(tmp_path, spacing=(2.0, 2.0, 2.0)))
    image = Volume(brain_like_image((32, 32, 32)), np.diag([0.5, 0.5, 0.5, 1.0]))
    roi = np.zeros(image.spatial_shape, bool)
    roi[17, 17, 17] = True  # 32 -> 8 voxels samples at 1.5, 5.5, ..., 17.5: this voxel has weight 1/2 per axis
    with pytest.raises(InputError, match=r"the region \(1 voxels\) covers no voxel of the model's grid"):
        explain_volume(loaded, image, target_class=2, roi=roi, device="cpu")
    # as weights it is kept, with 1/8 of its weight on the coarse voxel (linear resampling, never thresholded)
    _, explanation = explain_volume(loaded, image, target_class=2, roi=roi * np.float32(0.5), device="cpu")
    assert explanation.roi_voxels == 1
