"""The bundled demo models: they load, their cards tell the truth, and they segment the MNI152 T1.

The models and files are made by ``scripts/train_demo_models.py`` from the MNI152 template in
the nilearn wheel (see ``SegHiResCAMLib/data/README.md``). They must hold wherever a user meets
that template: at 1 mm (the file in nilearn) or 2 mm (nilearn's resampling), cropped as the bundled
image or with the whole field of view, through the same preprocessing a user's run goes through.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SegHiResCAMLib
import SimpleITK as sitk
import torch
from SegHiResCAMLib.io.images import read_image
from SegHiResCAMLib.models.loading import load_model
from SegHiResCAMLib.models.preprocess import normalize_intensity, prepare_input
from SegHiResCAMLib.pipeline import explain_volume
from SegHiResCAMLib.volume import Volume, ijk_to_ras_from_itk
from tolerances import EPS32, geometry_atol, sum_error

DATA = Path(SegHiResCAMLib.__file__).parent / "data"
MODELS = ("demo_unet3d", "demo_unet2d")
CLASS_NAMES = ["background", "grey matter", "white matter"]
WHITE_MATTER = 2
CASES = ("2 mm crop", "2 mm full field", "1 mm crop", "1 mm full field")


def read_volume(path: Path) -> Volume:
    image = sitk.ReadImage(str(path))
    matrix = ijk_to_ras_from_itk(image.GetOrigin(), image.GetSpacing(), image.GetDirection())
    return Volume(sitk.GetArrayFromImage(image), matrix)


def logits_of(loaded, volume: Volume) -> torch.Tensor:
    """Class logits ``(classes, K, J, I)`` on the volume's own grid, as a user's run sees them: the
    card's preprocessing, the network (a 2D one slice by slice), each class's logits mapped back."""
    card = loaded.card
    prepared = prepare_input(volume, card)
    image = torch.from_numpy(prepared.image)  # (1, *model grid)
    with torch.no_grad():
        if card.spatial_dims == 3:
            logits = loaded.module(image[None])[0]
        else:
            slices = image.movedim(card.slice_axis + 1, 0)  # (slices, 1, ...)
            logits = loaded.module(slices).movedim(0, card.slice_axis + 1)
    return torch.from_numpy(np.stack([prepared.heatmap_to_volume(channel) for channel in logits.numpy()]))


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


def kji(image) -> np.ndarray:
    """A nibabel image's data in (K, J, I) order."""
    return np.ascontiguousarray(image.get_fdata().transpose(2, 1, 0))


@pytest.fixture(scope="module")
def template_cases(t1, tmp_path_factory) -> dict:
    """Case -> (T1 as a user reads it, tissue labels, brain mask), from the nilearn wheel.

    1 mm: nilearn's own file (uint8), read with the project's reader; its crop is the bundled
    image's box. 2 mm: the bundled crop, and the full field it was cut from (nilearn's resampled
    template on the file's 0..255 scale, uint8) written to NIfTI and read back.
    """
    datasets = pytest.importorskip("nilearn.datasets")
    cases = {}
    for resolution in (2, 1):
        grey = kji(datasets.load_mni152_gm_template(resolution=resolution))
        white = kji(datasets.load_mni152_wm_template(resolution=resolution))
        labels = np.argmax(np.stack([1.0 - grey - white, grey, white]), axis=0)
        brain = kji(datasets.load_mni152_brain_mask(resolution=resolution)) > 0
        t1_img = datasets.load_mni152_template(resolution=resolution)
        if resolution == 1:
            full = read_image(Path(datasets.__file__).parent / "data" / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz")
        else:
            path = tmp_path_factory.mktemp("mni152") / "mni152_t1_2mm_full_field.nii.gz"
            uint8 = np.round(t1_img.get_fdata() * 255.0).astype(np.uint8)  # as the bundled crop is stored
            type(t1_img)(uint8, t1_img.affine).to_filename(str(path))
            full = read_image(path)
        np.testing.assert_allclose(full.ijk_to_ras, t1_img.affine, atol=1e-6)  # labels and image share the grid
        cases[f"{resolution} mm full field"] = (full, labels, brain)
        # the bundled image's box on this grid: its first voxel's centre, its extent in mm
        start_ijk = np.linalg.solve(full.ijk_to_ras, t1.ijk_to_ras @ np.array([0.0, 0.0, 0.0, 1.0]))[:3]
        np.testing.assert_allclose(start_ijk, np.round(start_ijk), atol=1e-6)
        start = np.round(start_ijk).astype(int)[::-1]  # K, J, I
        size = np.array(t1.spatial_shape) * (2 // resolution)
        box = tuple(slice(int(a), int(a + n)) for a, n in zip(start, size))
        shift = np.eye(4)
        shift[:3, 3] = start[::-1]
        crop = Volume(np.ascontiguousarray(full.array[box]), full.ijk_to_ras @ shift)
        if resolution == 2:  # the bundled image is that crop
            np.testing.assert_array_equal(crop.array, t1.array)
            np.testing.assert_allclose(crop.ijk_to_ras, t1.ijk_to_ras, atol=1e-6)
        cases[f"{resolution} mm crop"] = (crop, labels[box], brain[box])
    return cases


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
    # statistics of the brain only: they do not change with the field of view (see below)
    assert card.intensity == {"scheme": "zscore", "nonzero_only": True}
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
    assert dice(prediction, labels, 2) >= 0.9
    assert dice(prediction, labels, 1) >= 0.9
    # the card's recorded Dice is what this file really gives (last bits may differ per CPU)
    recorded = loaded.card.extra["training"]["dice"]["2 mm crop"]
    for index, name in enumerate(CLASS_NAMES):
        assert dice(prediction, labels, index) == pytest.approx(
            recorded[name], rel=0, abs=dice_tolerance(logits, prediction, labels, index))


@pytest.mark.parametrize("resolution", [1, 2])
def test_the_cards_normalisation_does_not_depend_on_the_field_of_view(template_cases, loaded, resolution):
    """The brain gets the same numbers in the crop and in the full field, and the background stays 0."""
    crop, _, _ = template_cases[f"{resolution} mm crop"]
    full, _, _ = template_cases[f"{resolution} mm full field"]
    start = np.round(np.linalg.solve(full.ijk_to_ras, np.append(crop.origin_ras, 1.0))[:3]).astype(int)[::-1]
    box = tuple(slice(int(a), int(a + n)) for a, n in zip(start, crop.spatial_shape))
    np.testing.assert_array_equal(full.array[box], crop.array)
    assert np.count_nonzero(full.array) == np.count_nonzero(crop.array)  # the crop holds the whole brain
    on_crop = normalize_intensity(crop.array[None], loaded.card.intensity)[0]
    on_full = normalize_intensity(full.array[None], loaded.card.intensity)[0]
    # The same non-zero values, in the same (C) order, feed the mean and the std of both. Should the
    # summation still differ (another SIMD path), numpy's float32 pairwise sum errs by at most
    # (16 + 3 + ceil(log2(n / 128))) eps relative (blocks of 128 summed in 8 interleaved partial sums,
    # then halved), in the mean and in the std; z = (x - mean) / std carries that as (mean / std + |z|).
    values = crop.array[crop.array != 0].astype(np.float64)
    pairwise_terms = 19 + int(np.ceil(np.log2(max(values.size / 128, 1.0))))
    atol = 2 * pairwise_terms * EPS32 * (values.mean() / values.std() + np.abs(on_full).max())
    np.testing.assert_allclose(on_crop, on_full[box], rtol=0, atol=atol)
    assert not on_full[full.array == 0].any()  # the background is 0, as the networks' zero padding


@pytest.mark.parametrize("case", CASES)
def test_white_matter_holds_at_1_and_2_mm_cropped_and_full_field(template_cases, loaded, case):
    volume, labels, _ = template_cases[case]
    prediction = predict(loaded, volume)
    assert prediction.shape == labels.shape
    assert dice(prediction, labels, WHITE_MATTER) >= 0.9
    assert dice(prediction, labels, 1) >= 0.85


@pytest.mark.parametrize("case", ["1 mm full field", "2 mm full field"])
def test_bottleneck_seg_hires_grad_cam_lies_in_the_brain_on_the_full_field(template_cases, loaded, case):
    """The map of a user's run (no region given: the model's own white matter) is not about the background."""
    volume, labels, brain = template_cases[case]
    maps, _ = explain_volume(loaded, volume, target_class="white matter", methods=("seg-hires-grad-cam",),
                             device="cpu")
    heat = maps["seg-hires-grad-cam"].array.astype(np.float64)
    assert loaded.card.default_layer == "bottleneck"
    assert heat.sum() > 0
    assert heat[brain].sum() / heat.sum() >= 0.9
    assert heat[labels == WHITE_MATTER].sum() / heat.sum() >= 0.4


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
