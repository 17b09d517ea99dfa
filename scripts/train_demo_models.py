"""Train the two demo U-Nets on real MRI: the MNI152 template shipped inside the nilearn wheel.

Data: the ICBM 2009a nonlinear symmetric T1 template and its grey- and white-matter
probability maps (files ``mni_icbm152_{t1,gm,wm}_tal_nlin_sym_09a_converted.nii.gz`` in
``nilearn/datasets/data``), read offline with ``nilearn.datasets.load_mni152_*`` at 2 mm.
Labels: ``argmax(1 - gm - wm, gm, wm)`` per voxel, i.e. 0 background (CSF and outside the
brain), 1 grey matter, 2 white matter. Volumes are cropped around the brain to
80 x 96 x 80 voxels (K, J, I), divisible by 8, so no padding is needed at inference.

There is only one volume, so evaluation holds out an axial slab: slices K in
[HOLDOUT_START, HOLDOUT_STOP) (20 % of the slices, z = +16 ... +46 mm), plus MARGIN slices
on each side that are used neither for training nor for evaluation. Training sees random
patches (3D) or slices (2D) of the remaining slices only, with left-right flips and
intensity jitter, for a fixed number of steps (Adam, cosine learning-rate decay); the
held-out slab takes part in no decision (no early stopping, no model selection).
Reported: Dice per class on the held-out slab, on the training slices and on the whole volume.

Command (repository root; on one shared CPU core about 6-8 minutes for the 3D model, 3 for the 2D):

    python scripts/train_demo_models.py --out SegHiResCAM/SegHiResCAMLib/data

The image goes through ``SegHiResCAMLib.models.preprocess.normalize_intensity`` (via
``prepare_input``), the same code path the command line and Slicer use at inference.
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
from SegHiResCAMLib.models.loading import load_model
from SegHiResCAMLib.models.preprocess import prepare_input
from SegHiResCAMLib.models.unet import UNet
from SegHiResCAMLib.volume import (
    Volume,
    ijk_to_ras_from_itk,
    itk_geometry_from_ijk_to_ras,
)

CLASS_NAMES = ("background", "grey matter", "white matter")
# Crop of nilearn's 2 mm grid (99 x 117 x 95, I x J x K) that holds the whole brain.
CROP_IJK = (slice(9, 89), slice(11, 107), slice(0, 80))
HOLDOUT_START, HOLDOUT_STOP, MARGIN = 44, 60, 4
INTENSITY = {"scheme": "zscore"}
T1_FILE, LABEL_FILE, WM_FILE = "mni152_t1_2mm.nii.gz", "mni152_labels_2mm.nii.gz", "mni152_wm_2mm.nrrd"


@dataclass(frozen=True)
class Recipe:
    """How one demo model is built and trained."""

    name: str
    spatial_dims: int
    channels: tuple[int, ...]
    patch: tuple[int, int, int]  # (K, J, I); for 2D, K = slices per batch
    batch: int
    learning_rate: float
    steps: int


RECIPES = {
    "3d": Recipe("demo_unet3d", 3, (8, 16, 32), (16, 64, 64), 2, 3e-3, 800),
    "2d": Recipe("demo_unet2d", 2, (8, 16, 32, 64), (8, 96, 80), 1, 3e-3, 1000),
}
LOG_EVERY = 100


# ---------------------------------------------------------------------------- data


def template_arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The cropped 2 mm T1 (uint8, as the nilearn file stores it), labels (KJI) and IJK-to-RAS."""
    from nilearn import datasets

    t1_img = datasets.load_mni152_template(resolution=2)
    gm = datasets.load_mni152_gm_template(resolution=2).get_fdata()[CROP_IJK]
    wm = datasets.load_mni152_wm_template(resolution=2).get_fdata()[CROP_IJK]
    t1 = t1_img.get_fdata()[CROP_IJK]
    # nilearn rescales the uint8 file to [0, 1]; store it back on the file's 0..255 scale.
    t1_u8 = np.clip(np.round(t1 * 255.0), 0, 255).astype(np.uint8)
    labels = np.argmax(np.stack([1.0 - gm - wm, gm, wm]), axis=0).astype(np.uint8)
    ijk_to_ras = np.asarray(t1_img.affine, float).copy()  # nilearn affines are RAS
    ijk_to_ras[:3, 3] += ijk_to_ras[:3, :3] @ np.array([s.start for s in CROP_IJK], float)
    # nibabel arrays are (I, J, K); the project works in (K, J, I).
    return t1_u8.transpose(2, 1, 0).copy(), labels.transpose(2, 1, 0).copy(), ijk_to_ras


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


def training_slices(depth: int) -> np.ndarray:
    """Axial slices (K) that training may use: all but the held-out slab and its margins."""
    k = np.arange(depth)
    return k[(k < HOLDOUT_START - MARGIN) | (k >= HOLDOUT_STOP + MARGIN)]


# ---------------------------------------------------------------------------- maths


def dice_per_class(prediction: np.ndarray, labels: np.ndarray, where: np.ndarray | None = None) -> dict[str, float]:
    """Dice of each class between two label arrays, optionally only where ``where`` is true."""
    if where is not None:
        prediction, labels = prediction[where], labels[where]
    scores = {}
    for index, name in enumerate(CLASS_NAMES):
        p, t = prediction == index, labels == index
        total = int(p.sum() + t.sum())
        scores[name] = round(2.0 * int((p & t).sum()) / total, 4) if total else 1.0
    return scores


def loss_fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy plus mean soft Dice loss over the classes (the brain is small in the box)."""
    ce = F.cross_entropy(logits, target)
    probabilities = logits.softmax(1)
    one_hot = F.one_hot(target, len(CLASS_NAMES)).movedim(-1, 1).float()
    dims = (0,) + tuple(range(2, logits.ndim))
    overlap = (probabilities * one_hot).sum(dims)
    dice = (2 * overlap + 1) / (probabilities.sum(dims) + one_hot.sum(dims) + 1)
    return ce + (1 - dice.mean())


@torch.no_grad()
def predict_labels(model: torch.nn.Module, image: np.ndarray, spatial_dims: int) -> np.ndarray:
    """Argmax labels of a (1, K, J, I) image; a 2D model runs slice by slice along K."""
    model.eval()
    x = torch.from_numpy(image)
    if spatial_dims == 3:
        logits = model(x[None])[0]
    else:
        logits = torch.cat([model(x[:, k : k + 16].movedim(1, 0)) for k in range(0, x.shape[1], 16)]).movedim(0, 1)
    return logits.argmax(0).numpy().astype(np.uint8)


def evaluate(model: torch.nn.Module, image: np.ndarray, labels: np.ndarray, spatial_dims: int) -> dict:
    prediction = predict_labels(model, image, spatial_dims)
    k = np.arange(labels.shape[0])[:, None, None]
    holdout = np.broadcast_to((k >= HOLDOUT_START) & (k < HOLDOUT_STOP), labels.shape)
    train = np.broadcast_to(np.isin(k, training_slices(labels.shape[0])), labels.shape)
    return {
        "held_out_slab": dice_per_class(prediction, labels, holdout),
        "training_slices": dice_per_class(prediction, labels, train),
        "whole_volume": dice_per_class(prediction, labels),
    }


# ---------------------------------------------------------------------------- training


def sample_batch(
    image: np.ndarray, labels: np.ndarray, recipe: Recipe, rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random patches (3D) or slices (2D) from the training slices, flipped and jittered."""
    allowed = training_slices(labels.shape[0])
    pk, pj, pi = recipe.patch
    images, targets = [], []
    for _ in range(recipe.batch):
        if recipe.spatial_dims == 3:
            # a patch lies wholly below or wholly above the held-out slab and its margins
            starts = [k for k in allowed if all(k + d in allowed for d in range(pk))]
            k0 = int(rng.choice(starts))
            j0 = int(rng.integers(0, labels.shape[1] - pj + 1))
            i0 = int(rng.integers(0, labels.shape[2] - pi + 1))
            region = (slice(k0, k0 + pk), slice(j0, j0 + pj), slice(i0, i0 + pi))
            x, y = image[(slice(None),) + region], labels[region]
        else:
            ks = np.sort(rng.choice(allowed, size=pk, replace=False))
            x, y = image[:, ks].swapaxes(0, 1), labels[ks]  # (slices, 1, J, I)
        x = x.copy()
        if rng.random() < 0.5:  # left-right flip: the template is symmetric
            x, y = x[..., ::-1].copy(), y[..., ::-1].copy()
        x = x * rng.uniform(0.9, 1.1) + rng.uniform(-0.1, 0.1)
        images.append(x)
        targets.append(y)
    if recipe.spatial_dims == 3:
        return torch.from_numpy(np.stack(images)).float(), torch.from_numpy(np.stack(targets)).long()
    return torch.from_numpy(np.concatenate(images)).float(), torch.from_numpy(np.concatenate(targets)).long()


def train(recipe: Recipe, image: np.ndarray, labels: np.ndarray, seed: int) -> tuple[UNet, dict]:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = UNet(recipe.spatial_dims, 1, len(CLASS_NAMES), recipe.channels)
    optimiser = torch.optim.Adam(model.parameters(), lr=recipe.learning_rate)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, recipe.steps)
    started = time.perf_counter()
    for step in range(1, recipe.steps + 1):
        model.train()
        x, y = sample_batch(image, labels, recipe, rng)
        loss = loss_fn(model(x), y)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        schedule.step()
        if step % LOG_EVERY == 0:  # progress only: nothing below depends on it
            scores = evaluate(model, image, labels, recipe.spatial_dims)["training_slices"]
            print(f"{recipe.name} step {step} loss {loss.item():.4f} training-slice Dice {scores} "
                  f"({time.perf_counter() - started:.0f} s)", flush=True)
    model.eval()
    facts = {"steps": recipe.steps, "seconds": round(time.perf_counter() - started, 1)}
    return model, facts


def model_card(recipe: Recipe, dice: dict, facts: dict, seed: int, command: str) -> ModelCard:
    levels = len(recipe.channels)
    decoders = [f"decoder.{n}" for n in range(levels - 1)]
    return ModelCard(
        name=f"Demo {recipe.spatial_dims}D U-Net: grey and white matter on the MNI152 T1 (2 mm)",
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
                "trained_on": "MNI ICBM152 2009a nonlinear symmetric T1 template (nilearn 0.14.1 wheel), "
                "2 mm, cropped to 80x96x80 (KJI); labels argmax(1 - gm - wm, gm, wm) of the template's "
                "tissue probability maps",
                "held_out": f"axial slices K {HOLDOUT_START}..{HOLDOUT_STOP - 1} (z +16..+46 mm), "
                f"margin {MARGIN} slices each side unused",
                "dice": dice,
                "steps": facts["steps"],
                "seconds": facts["seconds"],
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
    parser.add_argument("--threads", type=int, default=1, help="results are reproducible for a fixed count")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    args.out.mkdir(parents=True, exist_ok=True)

    t1, labels, ijk_to_ras = template_arrays()
    write_volume(t1, ijk_to_ras, args.out / T1_FILE)
    write_volume(labels, ijk_to_ras, args.out / LABEL_FILE)
    write_volume((labels == 2).astype(np.uint8), ijk_to_ras, args.out / WM_FILE)
    volume = read_volume(args.out / T1_FILE)  # train on the file exactly as users will load it
    command = " ".join(["python scripts/train_demo_models.py", *(sys.argv[1:] if argv is None else argv)])

    summary = {}
    for key in ("3d", "2d") if args.models == "both" else (args.models,):
        recipe = RECIPES[key]
        card_stub = model_card(recipe, {}, {"steps": 0, "seconds": 0}, args.seed, command)
        image = prepare_input(volume, card_stub).image  # (1, K, J, I), normalised as at inference
        model, facts = train(recipe, image, labels, args.seed)
        dice = evaluate(model, image, labels, recipe.spatial_dims)
        weights = args.out / f"{recipe.name}.pt"
        torch.save(model.state_dict(), weights)
        model_card(recipe, dice, facts, args.seed, command).save(weights.with_suffix(".json"))
        reloaded = load_model(weights)  # the committed pair must load through the project's loader
        check = evaluate(reloaded.module, image, labels, recipe.spatial_dims)
        if check != dice:
            raise RuntimeError(f"{weights.name} gives other Dice after reloading: {check} vs {dice}")
        summary[recipe.name] = {"dice": dice, "steps": facts["steps"], "seconds": facts["seconds"],
                                "bytes": weights.stat().st_size}
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
