"""Evaluate a trained checkpoint on the test split.

    python -m training.inference --model_dir saved_models/<run>/best-*.ckpt [--data_root DATA]

Writes `<run>/inference/`: per-image scores (scores.csv), metrics.json (AUROC/AUPRC NORMAL-vs-rest and each disease
vs NORMAL for every score; with lesion masks, `"pixel": {map: {"auroc", "aupro"}}` for every anomaly map), one
figure grid per category (input, reconstruction, anomaly maps, the lesion mask outlined), ROC curves and score
histograms; prints the tables. Lesion masks are `<OCT2017>/masks/<split>/<CLASS>/<stem>.png` (the phantom writes
them); without a mask for every abnormal scan the pixel metrics are skipped with a note. When the run has a latent
prior (`<run>/prior/`), its NLL map joins the grids and `nll` and `combined` join the table, exactly as
`training.export` would serve them.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np
import torch

from octcore.preprocess import Preprocessing
from training.checkpoint import load_checkpoint
from training.data import CLASSES, DataError, list_images, resolve_data_root
from training.device import pick_device
from training.errors import run_main
from training.evaluate import roc, score_files, separation
from training.export import (
    add_prior_args,
    build_scorer,
    calibration_files,
    fit_combined,
    fit_normal_statistics,
    normalised,
    resolve_checkpoint,
    spec_maps,
)
from training.phantom import mask_path
from training.pixel_metrics import load_mask, pixel_metrics
from training.plots import plot_grid, plot_histograms, plot_roc


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.inference", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_dir", required=True, help="checkpoint (best-*.ckpt) or its run folder")
    p.add_argument("--data_root", default=None, help="override the dataset path recorded in the checkpoint")
    p.add_argument("--split", default="test")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--num_workers", type=int, default=0)
    p.add_argument("--device", choices=["gpu", "cuda", "cpu"], default="gpu")
    p.add_argument("--examples", type=int, default=4, help="images per category in the figure grids")
    p.add_argument("--top_fraction", type=float, default=0.01, help="fraction of each map averaged into its score")
    p.add_argument("--output", default=None, help="default: <run>/inference")
    add_prior_args(p)
    return p


def evaluation_table(scores: dict[str, dict[str, np.ndarray]], score_names: list[str]) -> dict[str, dict]:
    """{comparison: {score: {auroc, auprc, n_normal, n_abnormal}}} for NORMAL-vs-rest and each disease vs NORMAL."""
    normal = scores.get("NORMAL", {})
    table: dict[str, dict] = {}
    comparisons = {"NORMAL vs rest": [c for c in CLASSES[1:] if c in scores],
                   **{f"{c} vs NORMAL": [c] for c in CLASSES[1:] if c in scores}}
    for name, positives in comparisons.items():
        table[name] = {k: separation(normal.get(k, np.zeros(0)),
                                     np.concatenate([scores[c][k] for c in positives]) if positives else np.zeros(0))
                       for k in score_names}
    return table


def lesion_masks(oct_root: Path, split: str, files: dict[str, list[Path]], prep: Preprocessing,
                 ) -> dict[str, np.ndarray] | None:
    """{class: masks (N, S, S) bool} in model-input pixels, NORMAL all false; None unless every abnormal scan has
    a mask at `masks/<split>/<CLASS>/<stem>.png` (the phantom writes them; the real data set has none)."""
    paths = {c: [mask_path(oct_root, split, c, f.name) for f in fs] for c, fs in files.items() if c != "NORMAL"}
    if not all(p.is_file() for ps in paths.values() for p in ps):
        return None
    return {c: np.stack([load_mask(f, paths[c][i] if c in paths else None, prep) for i, f in enumerate(fs)])
            for c, fs in files.items()}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_main(lambda: evaluate(args))


def evaluate(args: argparse.Namespace) -> None:
    """The whole evaluation (module docstring). Raises TrainingError with a one-line reason."""
    ckpt_path = resolve_checkpoint(args.model_dir)
    ckpt = load_checkpoint(ckpt_path)
    oct_root = resolve_data_root(args.data_root or ckpt["train_config"]["data_root"])
    files = {c: list_images(oct_root, args.split, c) for c in CLASSES}
    files = {c: f for c, f in files.items() if f}
    if "NORMAL" not in files or len(files) < 2:
        raise DataError(f"{oct_root}/{args.split} needs NORMAL and at least one disease folder with images")
    device = pick_device(args.device)
    prep = Preprocessing.from_dict(ckpt["preprocessing"])
    scorer, specs, _ = build_scorer(ckpt, args.top_fraction, not args.no_prior, args.restore_samples,
                                    args.restore_max_positions, args.nll_top_fraction)
    scorer = scorer.to(device)
    fit_normal_statistics(scorer, ckpt, oct_root, prep, device, args.batch_size)
    score_names = list(specs)
    map_names = spec_maps(specs)
    if normalised(specs):  # their normal statistics come from the calibration images, as in export
        normal = score_files(scorer, calibration_files(ckpt, oct_root), prep, [k for k in score_names
                             if k not in normalised(specs)], [], args.batch_size, device, args.num_workers,
                             desc="normal stats")
        fit_combined([scorer], normal)
    out_dir = Path(args.output) if args.output else ckpt_path.parent / "inference"
    out_dir.mkdir(parents=True, exist_ok=True)

    masks = lesion_masks(oct_root, args.split, files, prep)
    scored = {c: score_files(scorer, fs, prep, score_names, map_names, args.batch_size, device, args.num_workers,
                             keep_examples=args.examples, keep_maps=masks is not None, desc=c)
              for c, fs in files.items()}
    scores = {c: s.scores for c, s in scored.items()}
    pixel = None
    if masks is not None:  # localisation: every test image's maps against its lesion mask (NORMAL: no lesion)
        gt = np.concatenate([masks[c] for c in scored])
        pixel = pixel_metrics({k: np.concatenate([scored[c].maps[k] for c in scored]) for k in map_names}, gt)
        for s in scored.values():
            s.maps.clear()

    with open(out_dir / "scores.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "category", *score_names])
        for c, s in scored.items():
            for i, path in enumerate(s.files):
                w.writerow([path.name, c, *(f"{s.scores[k][i]:.6g}" for k in score_names)])
    for c, s in scored.items():
        rows = [(f"{c} #{i}", {k: v for k, v in ex.items()}) for i, ex in enumerate(s.examples)]
        outlines = [masks[c][i] for i in range(len(rows))] if masks is not None and c != "NORMAL" else None
        if rows:
            plot_grid(rows, out_dir / f"grid_{c}.png", f"{c}: input, reconstruction, anomaly maps"
                      + (" (lesion mask outlined)" if outlines else ""), outlines)
    table = evaluation_table(scores, score_names)
    normal = scores["NORMAL"]
    rest = {k: np.concatenate([scores[c][k] for c in files if c != "NORMAL"]) for k in score_names}
    plot_roc({k: (*roc(normal[k], rest[k]), table["NORMAL vs rest"][k]["auroc"]) for k in score_names},
             out_dir / "roc_normal_vs_rest.png", "NORMAL vs rest")
    labels = np.concatenate([[c] * len(s.files) for c, s in scored.items()])
    plot_histograms({k: np.concatenate([scores[c][k] for c in scored]) for k in score_names}, labels,
                    list(scored), out_dir / "score_histograms.png")
    (out_dir / "metrics.json").write_text(json.dumps({"checkpoint": str(ckpt_path), "split": args.split,
                                                      "counts": {c: len(f) for c, f in files.items()},
                                                      "results": table} | ({"pixel": pixel} if pixel else {}),
                                                     indent=2))
    print(format_table(table, score_names))
    if pixel:
        print(format_pixel_table(pixel))
    else:
        print(f"(no pixel metrics: {oct_root}/masks/{args.split}/<CLASS>/ holds no lesion mask for every abnormal "
              "scan; the phantom writes them, real data sets have none)")
    print(f"→ {out_dir}")


def format_table(table: dict[str, dict], score_names: list[str]) -> str:
    width = {k: max(15, len(k) + 8) for k in score_names}  # a long score name must not run into the next
    head = f"{'comparison':<18}" + "".join(f"{k + ' AUROC':>{width[k]}}{k + ' AUPRC':>{width[k]}}" for k in score_names)
    lines = [head, "-" * len(head)]
    for comp, per_score in table.items():
        lines.append(f"{comp:<18}" + "".join(f"{per_score[k][m]:>{width[k]}.3f}" for k in score_names
                                             for m in ("auroc", "auprc")))
    return "\n".join(lines)


def format_pixel_table(pixel: dict[str, dict[str, float]]) -> str:
    head = f"{'map':<24}{'pixel AUROC':>12}{'AUPRO@0.3':>12}"
    return "\n".join([head, "-" * len(head), *(f"{k:<24}{v['auroc']:>12.3f}{v['aupro']:>12.3f}"
                                              for k, v in pixel.items())])


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    sys.exit(main())
