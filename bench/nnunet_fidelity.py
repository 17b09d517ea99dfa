"""Compare SegHiResCAM with nnU-Net v2 itself on a folder that nnU-Net planned and trained (prints, never asserts).

nnU-Net plans, preprocesses and trains (on CPU, a few hundred iterations, two folds) a tiny
dataset derived from the bundled MNI152 T1 and its tissue labels; then, on an anisotropic test
image (1.2 x 1.2 x 5 mm, with a zero-valued hole inside the brain), nnU-Net's own predictor
(no mirroring) and SegHiResCAM give: the preprocessed input, the fused sliding-window logits of
the fold ensemble, and the segmentation on the test image's grid. Printed: their differences and
the per-class Dice, and the same for the previous behaviour (linear resampling, each channel's
own non-zero mask, the first fold, one pass over the whole padded volume).

nnunetv2 is not a dependency (its own dependencies pull a torchvision build that breaks a CPU
torch). It installs beside, without dependencies, into folders put on PYTHONPATH for this script:

    pip install --no-deps --target /tmp/nnunet-site nnunetv2 acvl-utils batchgenerators \\
        batchgeneratorsv2 scikit-image imageio lazy-loader tifffile blosc2 numexpr ndindex msgpack \\
        py-cpuinfo httpx httpcore anyio h11 sniffio connected-components-3d fft-conv-pytorch seaborn
    PYTHONPATH=/tmp/nnunet-site:SegHiResCAM python bench/nnunet_fidelity.py [--work DIR] [--iterations N]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

DATA = Path(__file__).resolve().parents[1] / "SegHiResCAM" / "SegHiResCAMLib" / "data"
DATASET = "Dataset900_MNITiny"


def write_dataset(raw: Path) -> Path:
    """Five brain-masked variants of the MNI T1 (2 mm) with its tissue labels, as nnU-Net's raw layout."""
    t1 = sitk.ReadImage(str(DATA / "mni152_t1_2mm.nii.gz"))
    labels = sitk.ReadImage(str(DATA / "mni152_labels_2mm.nii.gz"))
    image = sitk.GetArrayFromImage(t1).astype(np.float32)
    label = sitk.GetArrayFromImage(labels).astype(np.uint8)
    brain = label > 0
    image = image * brain
    rng = np.random.default_rng(0)
    variants = [
        (image, label),
        (image[:, :, ::-1], label[:, :, ::-1]),
        (image * 1.4 + 10.0 * brain, label),
        (np.pad(image, ((4, 0), (0, 6), (3, 3)))[:80, 6:, :80], np.pad(label, ((4, 0), (0, 6), (3, 3)))[:80, 6:, :80]),
        (image * (1 + 0.05 * rng.standard_normal(image.shape)).astype(np.float32) * brain, label),
    ]
    folder = raw / DATASET
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    for index, (img, lab) in enumerate(variants):
        for array, path in ((img.astype(np.float32), folder / "imagesTr" / f"case_{index:03d}_0000.nii.gz"),
                            (lab.astype(np.uint8), folder / "labelsTr" / f"case_{index:03d}.nii.gz")):
            out = sitk.GetImageFromArray(np.ascontiguousarray(array))
            out.CopyInformation(t1)
            sitk.WriteImage(out, str(path))
    (folder / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "T1"}, "labels": {"background": 0, "grey matter": 1, "white matter": 2},
        "numTraining": len(variants), "file_ending": ".nii.gz", "name": DATASET}))
    return folder


def anisotropic_test_image(path: Path) -> sitk.Image:
    """The masked T1 resampled to 1.2 x 1.2 x 5 mm (linear), with a zero hole inside the white matter."""
    t1 = sitk.ReadImage(str(DATA / "mni152_t1_2mm.nii.gz"), sitk.sitkFloat32)
    labels = sitk.ReadImage(str(DATA / "mni152_labels_2mm.nii.gz"))
    masked = sitk.GetImageFromArray(sitk.GetArrayFromImage(t1) * (sitk.GetArrayFromImage(labels) > 0))
    masked.CopyInformation(t1)
    spacing = (1.2, 1.2, 5.0)
    size = [int(round(n * s / t)) for n, s, t in zip(t1.GetSize(), t1.GetSpacing(), spacing)]
    resampled = sitk.Resample(masked, size, sitk.Transform(), sitk.sitkLinear, t1.GetOrigin(), spacing,
                              t1.GetDirection(), 0.0, sitk.sitkFloat32)
    array = sitk.GetArrayFromImage(resampled)
    centre = [s // 2 for s in array.shape]
    array[centre[0] - 1:centre[0] + 1, centre[1] + 8:centre[1] + 14, centre[2] - 12:centre[2] - 6] = 0.0
    out = sitk.GetImageFromArray(array)
    out.CopyInformation(resampled)
    sitk.WriteImage(out, str(path))
    return out


def small_plans(preprocessed: Path) -> None:
    """A tiny network and a patch smaller than the image, so that several windows tile it."""
    path = preprocessed / DATASET / "nnUNetPlans.json"
    plans = json.loads(path.read_text())
    config = plans["configurations"]["3d_fullres"]
    config.update(patch_size=[48, 48, 48], batch_size=2)
    arch = config["architecture"]["arch_kwargs"]
    arch.update(n_stages=4, features_per_stage=[8, 16, 32, 64], kernel_sizes=[[3, 3, 3]] * 4,
                strides=[[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]], n_conv_per_stage=[2, 2, 2, 2],
                n_conv_per_stage_decoder=[2, 2, 2])
    path.write_text(json.dumps(plans, indent=1))


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = a.sum() + b.sum()
    return float(2 * (a & b).sum() / total) if total else 1.0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", type=Path, default=None, help="keep nnU-Net's folders here (default: a temp folder)")
    parser.add_argument("--iterations", type=int, default=150,
                        help="training iterations per epoch; 0 keeps nnU-Net's initial weights (no training)")
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="nnunet-fidelity-"))
    for name in ("raw", "preprocessed", "results"):
        (work / name).mkdir(parents=True, exist_ok=True)
    # nnU-Net reads these when it is imported
    os.environ.update(nnUNet_raw=str(work / "raw"), nnUNet_preprocessed=str(work / "preprocessed"),
                      nnUNet_results=str(work / "results"), nnUNet_n_proc_DA="1", nnUNet_compile="false")
    import torch

    torch.set_num_threads(2)
    from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprints, plan_experiments, preprocess
    from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.training.nnUNetTrainer.variants.training_length.nnUNetTrainer_Xepochs import nnUNetTrainer_1epoch
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name  # noqa: F401

    results = work / "results" / DATASET / "nnUNetTrainer_1epoch__nnUNetPlans__3d_fullres"
    started = time.perf_counter()
    if not (results / "fold_1" / "checkpoint_final.pth").is_file():
        if not (work / "raw" / DATASET).is_dir():
            write_dataset(work / "raw")
        if not (work / "preprocessed" / DATASET / "nnUNetPlans_3d_fullres").is_dir():
            extract_fingerprints([900], num_processes=1, check_dataset_integrity=True)
            plan_experiments([900])
            small_plans(work / "preprocessed")
            preprocess([900], configurations=("3d_fullres",), num_processes=(1,))
        plans = json.loads((work / "preprocessed" / DATASET / "nnUNetPlans.json").read_text())
        dataset_json = json.loads((work / "raw" / DATASET / "dataset.json").read_text())
        for fold in (0, 1):
            # nnU-Net's run_training puts this flag into the plans, and the trainer takes it out again
            torch.manual_seed(fold)
            trainer = nnUNetTrainer_1epoch({**plans, "continue_training": False}, "3d_fullres", fold, dataset_json,
                                           device=torch.device("cpu"))
            if args.iterations == 0:  # nnU-Net's own initialisation (He), saved as nnU-Net saves a checkpoint
                trainer.initialize()
                Path(trainer.output_folder).mkdir(parents=True, exist_ok=True)
                (Path(trainer.output_folder_base) / "plans.json").write_text(json.dumps(plans, indent=1))
                (Path(trainer.output_folder_base) / "dataset.json").write_text(json.dumps(dataset_json, indent=1))
                trainer.save_checkpoint(str(Path(trainer.output_folder) / "checkpoint_final.pth"))
                continue
            trainer.num_epochs = args.epochs
            trainer.num_iterations_per_epoch = args.iterations
            trainer.num_val_iterations_per_epoch = 2
            trainer.run_training()
    what = "initialised (not trained)" if args.iterations == 0 else f"trained ({args.epochs} x {args.iterations} iterations)"
    print(f"nnU-Net planned, preprocessed and {what} 2 folds in {time.perf_counter() - started:.0f} s")

    test_path = work / "test_0000.nii.gz"
    anisotropic_test_image(test_path)

    # nnU-Net finds the trainer class by importing every trainer module, some of which import timm and
    # torchvision (absent or broken beside a CPU torch): name the one used here directly
    import nnunetv2.inference.predict_from_raw_data as predict_module

    predict_module.recursive_find_trainer_class_by_name = lambda name: nnUNetTrainer_1epoch
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False,
                                perform_everything_on_device=False, device=torch.device("cpu"), verbose=False,
                                allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(results), use_folds=(0, 1),
                                                   checkpoint_name="checkpoint_final.pth")
    preprocessor = predictor.configuration_manager.preprocessor_class(verbose=False)
    data, _, properties = preprocessor.run_case([str(test_path)], None, predictor.plans_manager,
                                                predictor.configuration_manager, predictor.dataset_json)
    theirs_logits = predictor.predict_logits_from_preprocessed_data(torch.from_numpy(data)).float()
    theirs_seg = convert_predicted_logits_to_segmentation_with_correct_shape(
        theirs_logits.clone(), predictor.plans_manager, predictor.configuration_manager, predictor.label_manager,
        properties, return_probabilities=False)

    from dataclasses import replace

    from SegHiResCAMLib.engine.sliding_window import predict
    from SegHiResCAMLib.engine.tiling import gaussian_importance
    from SegHiResCAMLib.io.images import read_image
    from SegHiResCAMLib.models.loading import load_model
    from SegHiResCAMLib.models.preprocess import prepare_input
    from SegHiResCAMLib.windows import window_for_card
    from nnunetv2.inference.sliding_window_prediction import compute_gaussian

    patch = tuple(predictor.configuration_manager.patch_size)
    theirs_gaussian = compute_gaussian(patch, sigma_scale=1 / 8, value_scaling_factor=10, device=torch.device("cpu"))
    print(f"Gaussian weights {patch}: max |ours - nnU-Net's| = "
          f"{np.abs(gaussian_importance(patch) - theirs_gaussian.float().numpy()).max():.3g}")

    loaded = load_model(results)
    card = loaded.card
    volume = read_image(test_path)
    prepared = prepare_input(volume, card, pad_to_divisible=False)
    print(f"model input: ours {prepared.image.shape} nnU-Net {data.shape}; max |difference| = "
          f"{np.abs(prepared.image - data).max():.3g} (z-score units)")
    window = window_for_card(card)
    ours_logits = predict(loaded.module, prepared.image, sliding_window=window, device="cpu")
    theirs = theirs_logits.numpy()
    scale = np.abs(theirs).max()
    print(f"fused logits of {len(card.extra['nnunet']['folds'])} folds, {window}: max |ours - nnU-Net's| = "
          f"{np.abs(ours_logits - theirs).max():.3g} (largest logit {scale:.3g}; nnU-Net sums in float16); "
          f"on our input, max |difference| = "
          f"{np.abs(predict(loaded.module, data, sliding_window=window, device='cpu') - theirs).max():.3g}")
    # where they differ: nnU-Net accumulates numerator and weights in float16, whose subnormal range
    # holds the tiny Gaussian weights near the image's corners; compare both with a float64 fusion
    from SegHiResCAMLib.engine.tiling import window_corners

    weights = gaussian_importance(patch).astype(np.float64)
    total = np.zeros(data.shape[1:])
    for corner in window_corners(data.shape[1:], patch, 0.5):
        total[tuple(slice(c, c + p) for c, p in zip(corner, patch))] += weights
    difference = np.abs(ours_logits - theirs).max(0)
    print(f"  |ours - nnU-Net's| where the weights' sum >= 1: max {difference[total >= 1].max():.3g}, "
          f"99.9th percentile {np.quantile(difference, 0.999):.3g}, median {np.median(difference):.3g}; "
          f"largest where the sum < 1 ({(total < 1).mean():.1%} of the voxels: far from every window centre, where float16 is subnormal): "
          f"{difference[total < 1].max() if (total < 1).any() else 0:.3g}")
    ours_seg = np.stack([prepared.heatmap_to_volume(channel) for channel in ours_logits]).argmax(0)
    names = card.class_names
    print("Dice per class against nnU-Net's own segmentation (test image grid):")
    print("  now:    " + ", ".join(f"{n} {dice(ours_seg == c, theirs_seg == c):.4f}" for c, n in enumerate(names)))

    # before: linear resampling, each channel's own non-zero mask, fold 0 alone, one pass over the padded volume
    old_intensity = {k: v for k, v in card.intensity.items() if k != "mask"}
    old_card = replace(card, resampling=None, intensity=old_intensity)
    first_fold = load_model(results / "fold_0").module
    old_prepared = prepare_input(volume, old_card)
    with torch.no_grad():
        old_logits = first_fold(torch.from_numpy(old_prepared.image)[None])[0].numpy()
    old_seg = np.stack([old_prepared.heatmap_to_volume(channel) for channel in old_logits]).argmax(0)
    print("  before: " + ", ".join(f"{n} {dice(old_seg == c, theirs_seg == c):.4f}" for c, n in enumerate(names)))
    print(f"work folder: {work}")


if __name__ == "__main__":
    main()
