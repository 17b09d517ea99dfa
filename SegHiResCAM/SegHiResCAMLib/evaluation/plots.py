"""Plots of the report: deletion/insertion curves and the randomisation cascade (matplotlib, Agg)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from .faithfulness import DeletionInsertion
from .randomisation import Randomisation


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib import pyplot as plt

    return plt


def save_curves(path: str | Path, curves: Mapping[str, DeletionInsertion], title: str) -> Path:
    """Deletion (left) and insertion (right) curves of each method, with their AUCs in the legend."""
    plt = _pyplot()
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    try:
        for name, curve in curves.items():
            left.plot(curve.fractions, curve.deletion, marker=".", label=f"{name} (AUC {curve.deletion_auc:.3f})")
            right.plot(curve.fractions, curve.insertion, marker=".", label=f"{name} (AUC {curve.insertion_auc:.3f})")
        for axis, kind, better in ((left, "deletion", "lower"), (right, "insertion", "higher")):
            axis.set_xlabel(f"share of voxels {'removed' if kind == 'deletion' else 'revealed'}, most relevant first")
            axis.set_ylabel("region score (1 = unperturbed, 0 = baseline)")
            axis.set_title(f"{kind} ({better} AUC is better)", fontsize=10)
            axis.axhline(0.0, color="grey", linewidth=0.5)
            axis.axhline(1.0, color="grey", linewidth=0.5)
            axis.grid(alpha=0.3)
            axis.legend(fontsize=7)
        figure.suptitle(title, fontsize=11)
        figure.tight_layout()
        figure.savefig(path, dpi=90)
    finally:
        plt.close(figure)
    return Path(path)


def save_randomisation(path: str | Path, cascades: Mapping[str, Randomisation], title: str) -> Path:
    """Spearman and SSIM against the trained map as the model is randomised from the output inwards."""
    plt = _pyplot()
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    try:
        for name, cascade in cascades.items():
            if len(cascade.stages) < 2:
                continue  # a baseline map: the same at every stage
            steps = range(len(cascade.stages))
            left.plot(steps, cascade.spearman, marker="o", label=name)
            right.plot(steps, cascade.ssim, marker="o", label=name)
            labels = [f"…{stage}" for stage in cascade.stages]
        for axis, measure in ((left, "Spearman"), (right, "SSIM")):
            axis.set_ylabel(f"{measure} with the trained map")
            axis.set_xlabel("randomised from the output down to")
            if any(len(c.stages) > 1 for c in cascades.values()):
                axis.set_xticks(list(range(len(labels))))
                axis.set_xticklabels(labels, rotation=30, ha="right", fontsize=7)
            axis.set_ylim(-1.05, 1.05)
            axis.axhline(0.0, color="grey", linewidth=0.5)
            axis.grid(alpha=0.3)
            axis.legend(fontsize=7)
        figure.suptitle(title + " (a map that passes the check falls away from 1)", fontsize=11)
        figure.tight_layout()
        figure.savefig(path, dpi=90)
    finally:
        plt.close(figure)
    return Path(path)
