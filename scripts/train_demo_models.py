"""Train the two demo U-Nets on real MRI: the MNI152 template shipped inside the nilearn wheel.

Data: the ICBM 2009a nonlinear symmetric T1 template and its grey- and white-matter
probability maps (files ``mni_icbm152_{t1,gm,wm}_tal_nlin_sym_09a_converted.nii.gz`` in
``nilearn/datasets/data``), read offline with ``nilearn.datasets.load_mni152_*`` at 1 mm (the
files themselves) and at 2 mm (nilearn's resampling of them). Labels: ``argmax(1 - gm - wm, gm,
wm)`` per voxel, i.e. 0 background (CSF and outside the brain), 1 grey matter, 2 white matter.

The models must hold wherever a user may meet the template: at 1 mm or 2 mm, cropped around the
brain or with the whole field of view. So:

- intensity is a z-score over the non-zero voxels only (``{"scheme": "zscore", "nonzero_only":
  true}``): the template is skull-stripped, its background is exactly 0, and the statistics of
  the brain do not change with how much background the field of view holds. The background stays
  0 after normalisation: the same value as the networks' zero padding, so the edge of the field
  of view is invisible to them, and the brain's mean, so the share of background in a batch
  hardly moves batch norm's statistics. (Min-max scaling, also independent of the field of view,
  was tried: with the background at the bottom of the range, batch statistics swing with the
  share of background, and the networks learned slower and less stably, white-matter Dice
  0.87 (3D) and 0.88-0.91 (2D) after as many steps.);
- every training image is a *view*: a random box of the 1 mm or 2 mm template (from a piece of
  the brain to the full field), with a random gamma on its intensities, put through
  ``SegHiResCAMLib.models.preprocess.prepare_input`` exactly as at inference (reorientation,
  normalisation of that box, resampling to the cards' 2 mm, padding). Its labels are the tissue
  probability maps carried through the same resampling, then the argmax;
- the 3D model learns from random patches of the views (2 of 32 x 64 x 64 voxels per step, two
  in three centred on brain), the 2D model from random axial slices (8 per step), each patch or
  slice from its own view, with left-right flips and a random intensity scale (which keeps the
  background at 0) per sample.

Held out: the labels of the axial slab z = +16 ... +46 mm (the 2 mm slices K 44..59 of the
bundled crop), and of 4 more 2 mm slices on each side, take part in no loss and no decision (no early
stopping, no model selection); the slab's Dice is reported. Its image is inside the 3D views,
as context for its neighbours.

Reported (and written into the cards): Dice per class on the four evaluation cases (1 mm and
2 mm, the bundled crop and the full field), computed through ``prepare_input`` and mapped back
onto each case's own grid, as a user sees it; the held-out slab; and the share of each model's
Seg-HiRes-Grad and Seg-Grad CAM (default layer) inside the brain and inside white matter.

Command (repository root; single process, one thread):

    nice -n 10 python scripts/train_demo_models.py --out SegHiResCAM/SegHiResCAMLib/data

Runs are deterministic on one machine (seeded, one thread, deterministic algorithms);
another CPU may differ in the last bits and so slightly in the numbers.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from SegHiResCAMLib.models.card import ModelCard
from SegHiResCAMLib.models.loading import LoadedModel, load_model
from SegHiResCAMLib.models.preprocess import prepare_input
from SegHiResCAMLib.models.unet import UNet
from SegHiResCAMLib.pipeline import explain_volume
from SegHiResCAMLib.volume import Volume, ijk_to_ras_from_itk, itk_geometry_from_ijk_to_ras

CLASS_NAMES = ("background", "grey matter", "white matter")
WHITE_MATTER = 2
IGNORED = 255  # label of voxels that take part in no loss (the held-out slab)
# Crop of nilearn's 2 mm grid (99 x 117 x 95, I x J x K) that holds the whole brain: the bundled image.
CROP_IJK_2MM = (slice(9, 89), slice(11, 107), slice(0, 80))
HOLDOUT_Z_MM = (16.0, 46.0)  # centres of the held-out axial slices (2 mm slices K 44..59 of the crop)
HOLDOUT_MARGIN_MM = 9.0  # slice centres closer than this to the slab are not trained on (4 slices at 2 mm)
INTENSITY = {"scheme": "zscore", "nonzero_only": True}
T1_FILE, LABEL_FILE, WM_FILE = "mni152_t1_2mm.nii.gz", "mni152_labels_2mm.nii.gz", "mni152_wm_2mm.nrrd"
METHODS = ("seg-hires-grad-cam", "seg-grad-cam")


@dataclass(frozen=True)
class Recipe:
    """How one demo model is built and trained."""

    name: str
    spatial_dims: int
    channels: tuple[int, ...]
    patch: tuple[int, int, int]  # (K, J, I) for 3D; for 2D only K = slices per step is used
    batch: int
    learning_rate: float
    steps: int


RECIPES = {
    "3d": Recipe("demo_unet3d", 3, (8, 16, 32), (32, 64, 64), 2, 3e-3, 700),
    "2d": Recipe("demo_unet2d", 2, (8, 16, 32), (8, 0, 0), 1, 3e-3, 1000),
}
VIEWS_PER_RESOLUTION = 24
FULL_FIELD_CHANCE = 0.3  # per axis: the view keeps the whole extent
SMALLEST_VIEW_MM = 128.0  # shortest side of a random view (the brain is about 145 x 180 x 155 mm)
LOG_EVERY = 200


# ---------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Template:
    """The template at one resolution: T1 as the file stores it (uint8) and the tissue maps, full field."""

    resolution: int
    t1: Volume  # (K, J, I) uint8
    grey: np.ndarray  # (K, J, I) float64 probabilities, as nilearn gives them (the argmax depends on it)
    white: np.ndarray
    brain: np.ndarray  # (K, J, I) bool, nilearn's brain mask

    @property
    def labels(self) -> np.ndarray:
        return tissue_labels(self.grey, self.white)


def tissue_labels(grey: np.ndarray, white: np.ndarray) -> np.ndarray:
    """0 background, 1 grey matter, 2 white matter: the most probable tissue per voxel."""
    return np.argmax(np.stack([1.0 - grey - white, grey, white]), axis=0).astype(np.uint8)


def _kji(image) -> np.ndarray:
    """A nibabel image's data in the project's (K, J, I) order (nibabel arrays are (I, J, K))."""
    return np.ascontiguousarray(image.get_fdata().transpose(2, 1, 0))


def load_template(resolution: int) -> Template:
    """The full-field template from the nilearn wheel at 1 or 2 mm (nilearn affines are RAS)."""
    from nilearn import datasets

    t1_img = datasets.load_mni152_template(resolution=resolution)
    # nilearn rescales the uint8 file to [0, 1]; store it back on the file's 0..255 scale. At 2 mm
    # this also makes the ~1e-17 that nilearn's spline resampling leaves around the brain 0 again.
    t1 = np.clip(np.round(_kji(t1_img) * 255.0), 0, 255).astype(np.uint8)
    grey = _kji(datasets.load_mni152_gm_template(resolution=resolution))
    white = _kji(datasets.load_mni152_wm_template(resolution=resolution))
    brain = _kji(datasets.load_mni152_brain_mask(resolution=resolution)) > 0
    affine = np.asarray(t1_img.affine, float)
    return Template(resolution, Volume(t1, affine), grey, white, brain)


def box_volume(volume: Volume, box: tuple[slice, slice, slice], array: np.ndarray | None = None) -> Volume:
    """The part of ``volume`` (or of ``array`` on its grid) inside ``box`` (K, J, I), geometry kept exact."""
    shift = np.eye(4)
    shift[:3, 3] = [s.start for s in box[::-1]]
    source = volume.array if array is None else array
    return Volume(np.ascontiguousarray(source[box]), volume.ijk_to_ras @ shift)


def bundled_box(resolution: int) -> tuple[slice, slice, slice]:
    """The bundled image's box (K, J, I) on the template's grid at ``resolution`` mm."""
    factor = 2 // resolution
    return tuple(slice(s.start * factor, s.stop * factor) for s in CROP_IJK_2MM[::-1])  # type: ignore[return-value]


def evaluation_cases(templates: dict[int, Template]) -> dict[str, tuple[Volume, np.ndarray, np.ndarray]]:
    """Case name -> (T1, labels, brain mask): 1 and 2 mm, the bundled crop and the full field."""
    cases = {}
    for resolution in (2, 1):
        template = templates[resolution]
        box = bundled_box(resolution)
        cases[f"{resolution} mm crop"] = (box_volume(template.t1, box), template.labels[box], template.brain[box])
        cases[f"{resolution} mm full field"] = (template.t1, template.labels, template.brain)
    return cases


def write_volume(array_kji: np.ndarray, ijk_to_ras: np.ndarray, path: Path) -> None:
    image = sitk.GetImageFromArray(array_kji)
    origin, spacing, direction = itk_geometry_from_ijk_to_ras(ijk_to_ras)
    image.SetOrigin(origin)
    image.SetSpacing(spacing)
    image.SetDirection(direction)
    sitk.WriteImage(image, str(path), useCompression=True)


def read_volume(path: Path) -> Volume:
    """Read a file as the project does (SimpleITK, KJI array, IJK-to-RAS)."""
    image = sitk.ReadImage(str(path))
    matrix = ijk_to_ras_from_itk(image.GetOrigin(), image.GetSpacing(), image.GetDirection())
    return Volume(sitk.GetArrayFromImage(image), matrix)


def write_bundled_files(template_2mm: Template, out: Path) -> None:
    """The demo image, its labels and the white-matter region: the bundled crop of the 2 mm template."""
    box = bundled_box(2)
    crop = box_volume(template_2mm.t1, box)
    labels = template_2mm.labels[box]
    write_volume(crop.array, crop.ijk_to_ras, out / T1_FILE)
    write_volume(labels, crop.ijk_to_ras, out / LABEL_FILE)
    write_volume((labels == WHITE_MATTER).astype(np.uint8), crop.ijk_to_ras, out / WM_FILE)


# ---------------------------------------------------------------------------- views


@dataclass(frozen=True)
class View:
    """One training image on the model's grid: ``image`` (1, K, J, I) float32, ``labels`` (K, J, I) uint8."""

    image: np.ndarray
    labels: np.ndarray


def random_box(shape: tuple[int, int, int], resolution: int, rng: np.random.Generator) -> tuple[slice, ...]:
    """A random box (K, J, I): per axis the full extent, or a random stretch of at least SMALLEST_VIEW_MM."""
    box = []
    for size in shape:
        smallest = min(size, int(SMALLEST_VIEW_MM / resolution))
        if rng.random() < FULL_FIELD_CHANCE:
            box.append(slice(0, size))
            continue
        length = int(rng.integers(smallest, size + 1))
        start = int(rng.integers(0, size - length + 1))
        box.append(slice(start, start + length))
    return tuple(box)


def make_view(template: Template, box: tuple[slice, ...], gamma: float, card: ModelCard) -> View:
    """The box of the template, its intensities raised to ``gamma``, through the inference preprocessing."""
    t1 = box_volume(template.t1, box)
    scaled = (t1.array.astype(np.float32) / 255.0) ** gamma * 255.0  # 0 stays 0: the background is untouched
    prepared = prepare_input(t1.with_array(scaled), card)
    grey = prepared.roi_to_model(template.grey[box])  # float maps: resampled linearly, padded with 0
    white = prepared.roi_to_model(template.white[box])
    labels = tissue_labels(grey, white)
    # hide the held-out slab's labels (by the z of each slice on the model's grid)
    k = np.arange(labels.shape[0], dtype=float)
    z = (prepared.model_ijk_to_ras @ np.stack([np.zeros_like(k), np.zeros_like(k), k, np.ones_like(k)]))[2]
    low, high = HOLDOUT_Z_MM
    hidden = (z > low - HOLDOUT_MARGIN_MM) & (z < high + HOLDOUT_MARGIN_MM)
    labels[hidden] = IGNORED
    return View(prepared.image, labels)


def make_views(templates: dict[int, Template], card: ModelCard, rng: np.random.Generator) -> list[View]:
    """VIEWS_PER_RESOLUTION random views of each resolution; the first of each is the plain full field."""
    views = []
    for resolution in (2, 1):
        template = templates[resolution]
        shape = template.t1.spatial_shape
        for index in range(VIEWS_PER_RESOLUTION):
            box = tuple(slice(0, s) for s in shape) if index == 0 else random_box(shape, resolution, rng)
            gamma = 1.0 if index == 0 else float(np.exp(rng.uniform(np.log(0.7), np.log(1.4))))
            views.append(make_view(template, box, gamma, card))
    return views


# ---------------------------------------------------------------------------- training


def loss_fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy plus mean soft Dice over the classes, both over the labelled voxels only."""
    weight = (target != IGNORED).float()
    target = torch.where(target == IGNORED, torch.zeros_like(target), target)
    voxels = weight.sum().clamp_min(1.0)
    ce = (F.cross_entropy(logits, target, reduction="none") * weight).sum() / voxels
    probabilities = logits.softmax(1) * weight.unsqueeze(1)
    one_hot = F.one_hot(target, len(CLASS_NAMES)).movedim(-1, 1).float() * weight.unsqueeze(1)
    dims = (0,) + tuple(range(2, logits.ndim))
    overlap = (probabilities * one_hot).sum(dims)
    dice = (2 * overlap + 1) / (probabilities.sum(dims) + one_hot.sum(dims) + 1)
    return ce + (1 - dice.mean())


def _patch_start(size: int, patch: int, centre: int | None, rng: np.random.Generator) -> int:
    if size <= patch:
        return 0
    if centre is None:
        return int(rng.integers(0, size - patch + 1))
    return int(np.clip(centre - patch // 2 + rng.integers(-patch // 4, patch // 4 + 1), 0, size - patch))


def _augmented(x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One sample's left-right flip (the template is symmetric) and intensity scale (background stays 0).

    Per sample, not per batch: batch norm would otherwise learn to undo a batch-wide change, which
    the running statistics used at inference cannot.
    """
    if rng.random() < 0.5:
        x, y = x[..., ::-1], y[..., ::-1]
    return x * rng.uniform(0.9, 1.1), y


def sample_batch(views: list[View], recipe: Recipe, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """3D: ``batch`` patches, 2D: ``patch[0]`` axial slices, each from its own random view."""
    images, targets = [], []
    if recipe.spatial_dims == 3:
        for _ in range(recipe.batch):
            view = views[int(rng.integers(len(views)))]
            shape = view.labels.shape
            brain = np.flatnonzero((view.labels > 0) & (view.labels != IGNORED))
            centre = None
            if brain.size and rng.random() < 2 / 3:
                centre = np.unravel_index(int(brain[rng.integers(brain.size)]), shape)
            region = []
            for axis, (size, patch) in enumerate(zip(shape, recipe.patch)):
                start = _patch_start(size, patch, None if centre is None else int(centre[axis]), rng)
                region.append(slice(start, start + patch))
            x, y = view.image[(slice(None), *region)], view.labels[tuple(region)]
            # a view shorter than the patch is padded with background, as zero padding at inference
            pad = [(0, p - s) for p, s in zip(recipe.patch, y.shape)]
            x, y = _augmented(np.pad(x, [(0, 0)] + pad), np.pad(y, pad), rng)
            images.append(x)
            targets.append(y)
    else:
        plane = tuple(max(view.labels.shape[axis] for view in views) for axis in (1, 2))
        for _ in range(recipe.patch[0]):
            view = views[int(rng.integers(len(views)))]
            labelled = np.flatnonzero((view.labels != IGNORED).any(axis=(1, 2)))
            k = int(rng.choice(labelled))
            pad = [(0, p - s) for p, s in zip(plane, view.labels.shape[1:])]
            x, y = _augmented(np.pad(view.image[:, k], [(0, 0)] + pad), np.pad(view.labels[k], pad), rng)
            images.append(x)
            targets.append(y)
    x, y = np.stack(images), np.stack(targets)
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)), torch.from_numpy(y.astype(np.int64))


def train(recipe: Recipe, views: list[View], steps: int, seed: int, progress) -> UNet:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed + 1)
    model = UNet(recipe.spatial_dims, 1, len(CLASS_NAMES), recipe.channels)
    optimiser = torch.optim.Adam(model.parameters(), lr=recipe.learning_rate)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, steps)
    started = time.perf_counter()
    for step in range(1, steps + 1):
        model.train()
        x, y = sample_batch(views, recipe, rng)
        loss = loss_fn(model(x), y)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        schedule.step()
        if step % LOG_EVERY == 0:  # progress only: nothing below depends on it
            model.eval()
            progress(step, loss.item(), time.perf_counter() - started, model)
    model.eval()
    return model


# ---------------------------------------------------------------------------- evaluation


def dice_per_class(prediction: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Dice of each class between two label arrays."""
    scores = {}
    for index, name in enumerate(CLASS_NAMES):
        p, t = prediction == index, labels == index
        total = int(p.sum() + t.sum())
        scores[name] = round(2.0 * int((p & t).sum()) / total, 4) if total else 1.0
    return scores


@torch.no_grad()
def predict_labels(loaded: LoadedModel, volume: Volume) -> np.ndarray:
    """The model's labels on the volume's own grid: card preprocessing, logits mapped back, argmax."""
    card = loaded.card
    prepared = prepare_input(volume, card)
    x = torch.from_numpy(prepared.image)
    if card.spatial_dims == 3:
        logits = loaded.module(x[None])[0]
    else:
        slices = x.movedim(card.slice_axis + 1, 0)
        logits = torch.cat([loaded.module(slices[n:n + 16]) for n in range(0, len(slices), 16)])
        logits = logits.movedim(0, card.slice_axis + 1)
    back = np.stack([prepared.heatmap_to_volume(channel) for channel in logits.numpy()])
    return back.argmax(0).astype(np.uint8)


def evaluate(loaded: LoadedModel, cases: dict) -> dict[str, dict[str, float]]:
    """Dice per class on each evaluation case, and on the held-out slab of the 2 mm full field."""
    scores = {}
    for name, (volume, labels, _) in cases.items():
        prediction = predict_labels(loaded, volume)
        scores[name] = dice_per_class(prediction, labels)
        if name == "2 mm full field":
            z = (volume.ijk_to_ras @ np.array([[0.0], [0.0], [1.0], [0.0]]))[2, 0] * np.arange(labels.shape[0])
            z = z + volume.ijk_to_ras[2, 3]
            slab = (z >= HOLDOUT_Z_MM[0]) & (z <= HOLDOUT_Z_MM[1])
            scores["held-out slab (2 mm)"] = dice_per_class(prediction[slab], labels[slab])
    return scores


def map_shares(loaded: LoadedModel, cases: dict, wm_roi: np.ndarray) -> dict[str, dict[str, dict[str, float]]]:
    """Share of each map (default layer) inside the brain and the white matter, per case and method.

    The region explained is the model's own white-matter prediction, as for a user who brings only
    an image; on the bundled crop also the bundled white-matter region, as the demo does.
    """
    shares: dict[str, dict[str, dict[str, float]]] = {}
    for name, (volume, labels, brain) in cases.items():
        runs = [(name, None)]
        if name == "2 mm crop":
            runs.append(("2 mm crop, demo region", wm_roi))
        for label, roi in runs:
            maps, _ = explain_volume(loaded, volume, target_class=WHITE_MATTER, roi=roi, methods=METHODS, device="cpu")
            shares[label] = {}
            for method, heat in maps.items():
                values = heat.array.astype(np.float64)
                total = values.sum()
                shares[label][method] = {
                    "brain": round(float(values[brain].sum() / total), 3) if total > 0 else None,
                    "white matter": round(float(values[labels == WHITE_MATTER].sum() / total), 3) if total > 0 else None,
                }
    return shares


# ---------------------------------------------------------------------------- cards


def model_card(recipe: Recipe, facts: dict, seed: int, command: str) -> ModelCard:
    levels = len(recipe.channels)
    decoders = [f"decoder.{n}" for n in range(levels - 1)]
    return ModelCard(
        name=f"Demo {recipe.spatial_dims}D U-Net: grey and white matter on the MNI152 T1 (1 or 2 mm, any field of view)",
        spatial_dims=recipe.spatial_dims,
        in_channels=1,
        class_names=CLASS_NAMES,
        spacing=(2.0, 2.0, 2.0),
        orientation="RAS",
        intensity=dict(INTENSITY),
        layers=("bottleneck", *decoders, "head"),
        outputs="logits",
        slice_axis=0,
        divisible_by=2 ** (levels - 1),
        network={
            "name": "SegHiResCAM.UNet",
            "args": {"spatial_dims": recipe.spatial_dims, "in_channels": 1, "out_channels": len(CLASS_NAMES),
                     "channels": list(recipe.channels)},
        },
        extra={
            "training": {
                "trained_on": "MNI ICBM152 2009a nonlinear symmetric T1 template (nilearn 0.14.1 wheel) at 1 mm "
                f"and 2 mm: {VIEWS_PER_RESOLUTION} views each (the full field and random boxes of at least "
                f"{SMALLEST_VIEW_MM:.0f} mm, random gamma), through the card's preprocessing; labels "
                "argmax(1 - gm - wm, gm, wm) of the template's tissue probability maps",
                "held_out": f"labels of axial slices z {HOLDOUT_Z_MM[0]:+.0f}..{HOLDOUT_Z_MM[1]:+.0f} mm, "
                f"and of slices less than {HOLDOUT_MARGIN_MM:.0f} mm from them, take part in no loss",
                **facts,
                "seed": seed,
                "command": command,
                "torch": torch.__version__,
            },
            "data_credit": "MNI ICBM152 template: Fonov et al. 2009, 2011; McConnell Brain Imaging Centre, "
            "Montreal Neurological Institute, McGill University (see README.md beside this file)",
        },
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for weights, cards and sample files")
    parser.add_argument("--models", choices=("3d", "2d", "both"), default="both")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=None, help="override the recipe's steps (trials only)")
    parser.add_argument("--threads", type=int, default=1, help="results are reproducible for a fixed count")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    args.out.mkdir(parents=True, exist_ok=True)
    command = " ".join(["python scripts/train_demo_models.py", *(sys.argv[1:] if argv is None else argv)])

    templates = {resolution: load_template(resolution) for resolution in (1, 2)}
    write_bundled_files(templates[2], args.out)
    cases = evaluation_cases(templates)
    # the demo's region, read back from the file exactly as the demo will load it
    wm_roi = read_volume(args.out / WM_FILE).array.astype(bool)

    summary = {}
    for key in ("3d", "2d") if args.models == "both" else (args.models,):
        recipe = RECIPES[key]
        steps = args.steps or recipe.steps
        card = model_card(recipe, {}, args.seed, command)
        wall, cpu = time.perf_counter(), time.process_time()
        views = make_views(templates, card, np.random.default_rng(args.seed))

        def progress(step: int, loss: float, seconds: float, model: UNet, card: ModelCard = card) -> None:
            scores = evaluate(LoadedModel(model, card, args.out, "state-dict"), cases)
            white = " ".join(f"{name} {s['white matter']:.3f}" for name, s in scores.items())
            print(f"{recipe.name} step {step} loss {loss:.4f} white-matter Dice: {white} ({seconds:.0f} s)", flush=True)

        model = train(recipe, views, steps, args.seed, progress)
        # views, training and the progress lines; wall time depends on what else the CPU runs
        facts = {"steps": steps, "seconds": round(time.perf_counter() - wall), "cpu_seconds": round(time.process_time() - cpu)}
        loaded = LoadedModel(model, card, args.out, "state-dict")
        dice = evaluate(loaded, cases)
        weights = args.out / f"{recipe.name}.pt"
        torch.save(model.state_dict(), weights)
        model_card(recipe, {"dice": dice, **facts}, args.seed, command).save(weights.with_suffix(".json"))
        reloaded = load_model(weights)  # the committed pair must load through the project's loader
        check = evaluate(reloaded, cases)
        if check != dice:
            raise RuntimeError(f"{weights.name} gives other Dice after reloading: {check} vs {dice}")
        shares = map_shares(reloaded, cases, wm_roi)
        model_card(recipe, {"dice": dice, "map_share": shares, **facts}, args.seed, command).save(weights.with_suffix(".json"))
        summary[recipe.name] = {"dice": dice, "map_share": shares, **facts, "bytes": weights.stat().st_size}
        print(json.dumps({recipe.name: summary[recipe.name]}, indent=1), flush=True)
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
