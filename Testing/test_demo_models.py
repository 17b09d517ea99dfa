"""The bundled demo models: they load, their cards tell the truth, and they segment the bundled T1.

The models and files are made by ``scripts/train_demo_models.py`` from the MNI152 template in
the nilearn wheel (see ``SegHiResCAMLib/data/README.md``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SegHiResCAMLib
import SimpleITK as sitk
import torch
from SegHiResCAMLib.models.loading import load_model
from SegHiResCAMLib.models.preprocess import prepare_input
from SegHiResCAMLib.volume import Volume, ijk_to_ras_from_itk
from tolerances import EPS32, geometry_atol, sum_error

DATA = Path(SegHiResCAMLib.__file__).parent / "data"
MODELS = ("demo_unet3d", "demo_unet2d")
CLASS_NAMES = ["background", "grey matter", "white matter"]


def read_volume(path: Path) -> Volume:
    image = sitk.ReadImage(str(path))
    matrix = ijk_to_ras_from_itk(image.GetOrigin(), image.GetSpacing(), image.GetDirection())
    return Volume(sitk.GetArrayFromImage(image), matrix)


def logits_of(loaded, volume: Volume) -> torch.Tensor:
    """Class logits ``(classes, K, J, I)`` on the volume's grid; a 2D model runs slice by slice."""
    card = loaded.card
    image = torch.from_numpy(prepare_input(volume, card).image)  # (1, K, J, I)
    with torch.no_grad():
        if card.spatial_dims == 3:
            return loaded.module(image[None])[0]
        slices = image.movedim(card.slice_axis + 1, 0)  # (slices, 1, ...)
        return loaded.module(slices).movedim(0, card.slice_axis + 1)


def predict(loaded, volume: Volume) -> np.ndarray:
    """Argmax labels in the volume's (K, J, I) grid."""
    return logits_of(loaded, volume).argmax(0).numpy()


def dice_tolerance(logits: torch.Tensor, prediction: np.ndarray, labels: np.ndarray, index: int) -> float:
    """How far another CPU or thread count can move a Dice computed from float32 logits.

    A logit of these U-Nets is at most 18 convolutions of at most 864 terms each deep (fewer than 2^5
    layers of 2^10 terms), so another order of the sums moves it by at most 2^15 eps32 times the magnitudes
    summed, here taken as the largest logit (batch norm keeps the activations of that order). Only voxels
    whose two largest logits are closer than twice that can change class; k of them move the Dice by at
    most 3k / (|P| + |T| - k). The card records the Dice to 4 decimals: half a unit of the last one more.
    """
    error = 2**15 * EPS32 * float(logits.abs().max())
    top = logits.topk(2, dim=0).values
    unsure = int(((top[0] - top[1]) <= 2 * error).sum())
    sizes = int((prediction == index).sum() + (labels == index).sum())
    return 3 * unsure / (sizes - unsure) + 0.5e-4


def dice(prediction: np.ndarray, labels: np.ndarray, index: int) -> float:
    p, t = prediction == index, labels == index
    return 2.0 * float((p & t).sum()) / float(p.sum() + t.sum())


@pytest.fixture(scope="module")
def t1() -> Volume:
    return read_volume(DATA / "mni152_t1_2mm.nii.gz")


@pytest.fixture(scope="module")
def labels() -> np.ndarray:
    return read_volume(DATA / "mni152_labels_2mm.nii.gz").array


@pytest.fixture(scope="module", params=MODELS)
def loaded(request):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in training, so the recorded Dice is reproduced
    yield load_model(DATA / f"{request.param}.pt")
    torch.set_num_threads(threads)


def test_demo_files_are_small():
    for name in MODELS:
        assert (DATA / f"{name}.pt").stat().st_size <= 5 * 1024 * 1024
    assert (DATA / "mni152_t1_2mm.nii.gz").stat().st_size < 1024 * 1024


def test_sample_t1_is_ras_2mm_and_fits_the_networks(t1, loaded):
    # the file's geometry is float32 (NIfTI); spacing and direction are read back through float64 products
    np.testing.assert_allclose(t1.spacing, [2.0, 2.0, 2.0], rtol=0, atol=geometry_atol(2.0, np.float32))
    np.testing.assert_allclose(t1.direction_ras, np.eye(3), rtol=0, atol=geometry_atol(1.0, np.float32))
    assert all(size % loaded.card.divisible_by == 0 for size in t1.spatial_shape)


def test_card_matches_the_network(loaded):
    card, module = loaded.card, loaded.module
    names = dict(module.named_modules())
    assert list(card.class_names) == CLASS_NAMES
    assert card.outputs == "logits"
    assert card.layers[0] == "bottleneck" and card.layers[-1] == "head"
    assert all(layer in names for layer in card.layers)
    assert card.spatial_dims == module.spatial_dims == card.network["args"]["spatial_dims"]
    assert card.divisible_by == 2 ** (len(card.network["args"]["channels"]) - 1)
    assert names["head"].out_channels == len(card.class_names)
    assert card.spacing == (2.0, 2.0, 2.0) and card.orientation == "RAS"
    assert card.intensity == {"scheme": "zscore"}
    training = card.extra["training"]
    assert {"trained_on", "dice", "command", "seed"} <= set(training)


def test_outputs_are_logits_not_probabilities(t1, loaded):
    image = torch.from_numpy(prepare_input(t1, loaded.card).image)
    x = image[None, :, 40:48] if loaded.card.spatial_dims == 3 else image[:, 40:41].movedim(1, 0)
    with torch.no_grad():
        output = loaded.module(x)
    # softmax outputs would sum to one over classes (within 3 float32 roundings) and stay in [0, 1]
    assert float((output.sum(1) - 1).abs().max()) > float(sum_error(3, 1.0))
    assert output.min() < 0 or output.max() > 1


def test_prediction_on_bundled_t1_finds_white_matter(t1, labels, loaded):
    logits = logits_of(loaded, t1)
    prediction = logits.argmax(0).numpy()
    assert prediction.shape == labels.shape
    assert dice(prediction, labels, 2) >= 0.8
    assert dice(prediction, labels, 1) >= 0.8
    # the card's recorded whole-volume Dice is what this file really gives (last bits may differ per CPU)
    recorded = loaded.card.extra["training"]["dice"]["whole_volume"]
    for index, name in enumerate(CLASS_NAMES):
        assert dice(prediction, labels, index) == pytest.approx(
            recorded[name], rel=0, abs=dice_tolerance(logits, prediction, labels, index))


def test_bundled_labels_are_the_nilearn_tissue_maps(t1, labels):
    datasets = pytest.importorskip("nilearn.datasets")
    gm_img = datasets.load_mni152_gm_template(resolution=2)
    wm_img = datasets.load_mni152_wm_template(resolution=2)
    # where the bundled grid starts inside nilearn's 2 mm grid
    offset = np.linalg.solve(gm_img.affine, np.append(t1.origin_ras, 1.0))[:3]
    start = np.round(offset).astype(int)
    # a float64 solve of a 4x4 system, its condition number times a few roundings of the position
    np.testing.assert_allclose(offset, start, rtol=0,
                               atol=np.linalg.cond(gm_img.affine) * geometry_atol(np.abs(gm_img.affine).max()))
    k, j, i = t1.spatial_shape
    crop = (slice(start[0], start[0] + i), slice(start[1], start[1] + j), slice(start[2], start[2] + k))
    gm = gm_img.get_fdata()[crop].transpose(2, 1, 0)
    wm = wm_img.get_fdata()[crop].transpose(2, 1, 0)
    expected = np.argmax(np.stack([1.0 - gm - wm, gm, wm]), axis=0)
    np.testing.assert_array_equal(labels, expected)
    wm_roi = read_volume(DATA / "mni152_wm_2mm.nrrd")
    np.testing.assert_array_equal(wm_roi.array, expected == 2)
    np.testing.assert_allclose(wm_roi.ijk_to_ras, t1.ijk_to_ras, rtol=0, atol=geometry_atol(t1.ijk_to_ras, np.float32))
