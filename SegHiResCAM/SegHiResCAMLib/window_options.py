"""The command line's sliding-window options, one argument group shared by ``explain``, ``batch`` and
``evaluate``: ``--patch-size``, ``--tile-step``, ``--mirror`` and ``--whole-volume``.

They become ``ExplainSettings.sliding_window`` ("auto", a :class:`SlidingWindow` or None). Torch-free,
so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse

from .errors import InputError
from .settings import AUTO_WINDOW
from .windows import SlidingWindow


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the sliding-window group to ``parser``."""
    group = parser.add_argument_group(
        "sliding windows",
        "By default (auto) the model runs like its own inference: by sliding windows of the model card's patch "
        "size (nnU-Net, MONAI bundles, static-shape .pt2 programs), otherwise over the whole image in one pass "
        "when the memory estimate fits, else by the largest windows that fit. A run that does not fit the memory "
        "is refused before the work, with the estimate (SEGHIRESCAM_AVAILABLE_MEMORY=6GB plans with less).",
    )
    group.add_argument("--patch-size", type=int, nargs="+", metavar="N",
                       help="run by sliding windows of this size: one number per axis of the model's input grid "
                       "(3 for a 3D model, 2 for a 2D one), or one number for every axis")
    group.add_argument("--tile-step", type=float, metavar="F",
                       help="with --patch-size: the step between windows as a fraction of the patch (default 0.5, "
                       "nnU-Net's; MONAI's overlap is 1 - F)")
    group.add_argument("--mirror", type=int, nargs="+", metavar="AXIS",
                       help="with --patch-size: also average the model's outputs over flips along these axes of the "
                       "patch (nnU-Net's test-time mirroring, e.g. --mirror 0 1 2)")
    group.add_argument("--whole-volume", action="store_true",
                       help="run the model over the whole image in one pass, never by windows (refused, with the "
                       "estimate, when it does not fit the memory)")


def window_choice(args: argparse.Namespace) -> SlidingWindow | str | None:
    """``ExplainSettings.sliding_window`` of parsed options.

    Raises:
        InputError: options that contradict each other, or a patch that is not usable.
    """
    patch, step, mirror = args.patch_size, args.tile_step, args.mirror
    if args.whole_volume and (patch or step is not None or mirror):
        raise InputError("--whole-volume runs one pass without windows; leave out --patch-size, --tile-step and "
                         "--mirror, or drop --whole-volume")
    if args.whole_volume:
        return None
    if not patch:
        if step is not None or mirror:
            raise InputError("--tile-step and --mirror need --patch-size, the windows' size (the model card's is "
                             "in its patch_size)")
        return AUTO_WINDOW
    if len(patch) not in (1, 2, 3):
        raise InputError(f"--patch-size takes 1, 2 or 3 numbers, got {len(patch)}")
    options = {} if step is None else {"step": step}
    return SlidingWindow(tuple(patch), mirror_axes=tuple(mirror or ()), **options)
