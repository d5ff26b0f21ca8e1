"""Real-scan benchmark: patient-wise k-fold image AUROC on the Kermany B-scans bundled in `samples/kermany/`.

    python bench/bench_real.py --folds 3 --epochs 40 --image_size 128 --prior_epochs 20

Per fold, the NORMAL patients are split k ways. The fold is laid out as OCT2017: `train/NORMAL` holds the other folds'
NORMAL scans, `test/` the fold's held-out NORMAL scans and every abnormal scan (none is ever trained on). The fold's
model is trained, exported and scored with the project's own entry points (`training.train`, `training.train_prior`
unless `--prior_epochs 0`, `training.export`), and the exported scorer is loaded the way the service loads it. Prints
per-fold and mean ± sd image AUROC, NORMAL vs rest and each disease vs NORMAL, for every score the scorer outputs;
asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from octcore.manifest import load_scorer  # noqa: E402
from training.data import CLASSES, list_images  # noqa: E402
from training.evaluate import score_files, separation  # noqa: E402

SAMPLES = ROOT / "samples" / "kermany"
COMPARISONS = ("NORMAL vs rest", *(f"{c} vs NORMAL" for c in CLASSES[1:]))


def patient(path: Path) -> str:
    return path.name.split("-")[1]


def patient_folds(files: list[Path], k: int, seed: int) -> list[list[Path]]:
    """Seeded split of the scans into k folds by patient: one patient's scans never straddle train and test."""
    patients = sorted({patient(f) for f in files})
    random.Random(seed).shuffle(patients)
    fold_of = {p: i % k for i, p in enumerate(patients)}
    return [[f for f in files if fold_of[patient(f)] == i] for i in range(k)]


def lay_out(root: Path, train_normal: list[Path], test: dict[str, list[Path]]) -> Path:
    """An OCT2017 tree of symlinks to the samples (the scans are not copied)."""
    for split, per_class in (("train", {"NORMAL": train_normal}), ("test", test)):
        for cls, files in per_class.items():
            d = root / "OCT2017" / split / cls
            d.mkdir(parents=True, exist_ok=True)
            for f in files:
                (d / f.name).symlink_to(f.resolve())
    return root


def cli(*args: str, log: Path) -> None:
    print("+ python -m", " ".join(args), flush=True)
    with open(log, "a") as out:
        proc = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise SystemExit(f"error: python -m {args[0]} failed (exit {proc.returncode}); see {log}")


def run_fold(work: Path, train_normal: list[Path], test: dict[str, list[Path]], args: argparse.Namespace,
             ) -> dict[str, dict[str, float]]:
    """Train → (prior) → export → score the held-out scans with the exported scorer. {comparison: {score: AUROC}}."""
    data = lay_out(work / "data", train_normal, test)
    log = work / "log.txt"
    cli("training.train", "--data_root", str(data), "--output_dir", str(work / "runs"), "--epochs", str(args.epochs),
        "--image_size", str(args.image_size), "--batch_size", str(args.batch_size), "--seed", str(args.seed),
        "--device", args.device, "--num_workers", "0", "--cache_dir", str(work / "cache"), *args.train_args.split(),
        log=log)
    ckpt = next((work / "runs").glob("*/best-*.ckpt"))
    if args.prior_epochs > 0:
        cli("training.train_prior", "--model_dir", str(ckpt), "--epochs", str(args.prior_epochs), "--batch_size",
            str(args.batch_size), "--device", args.device, "--seed", str(args.seed), *args.prior_args.split(),
            log=log)
    cli("training.export", "--model_dir", str(ckpt), "--model_store", str(work / "store"), "--name", "real",
        "--version", "1", log=log)
    manifest, scorer = load_scorer(work / "store" / "real" / "1", "cpu")
    names, prep = list(manifest.scores), manifest.preprocessing_config()
    scores = {c: score_files(scorer, fs, prep, names, [], args.batch_size, desc=c).scores for c, fs in test.items()}
    rest = {k: np.concatenate([scores[c][k] for c in CLASSES[1:]]) for k in names}
    result = {"NORMAL vs rest": {k: separation(scores["NORMAL"][k], rest[k])["auroc"] for k in names}}
    for c in CLASSES[1:]:
        result[f"{c} vs NORMAL"] = {k: separation(scores["NORMAL"][k], scores[c][k])["auroc"] for k in names}
    result["primary_score"] = manifest.primary_score  # type: ignore[assignment]
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", default=str(SAMPLES), help="folder holding <CLASS>/<CLASS>-<patient>-<n>.jpeg")
    p.add_argument("--folds", type=int, default=3)
    p.add_argument("--seed", type=int, default=0, help="fold assignment and training seed")
    p.add_argument("--image_size", type=int, default=128)
    p.add_argument("--epochs", type=int, default=40, help="VQ-VAE epochs per fold")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--prior_epochs", type=int, default=20, help="latent prior epochs per fold (0 = no prior)")
    p.add_argument("--train_args", default="--n_hiddens 32 --n_residual_hiddens 16 --n_residual_layers 2 "
                   "--embedding_dim 16 --n_embeddings 32 --learning_rate 3e-3 --patience 1000",
                   help="further training.train arguments")
    p.add_argument("--prior_args", default="--n_layers 6 --n_channels 32 --learning_rate 3e-3",
                   help="further training.train_prior arguments")
    p.add_argument("--device", default="cpu", choices=["cpu", "gpu", "cuda"])
    p.add_argument("--work_dir", default=None, help="keep the folds' data, runs and stores here (default: a temp dir)")
    p.add_argument("--output", default=None, help="also write the results as JSON here")
    args = p.parse_args()
    samples = Path(args.samples)
    files = {c: list_images(samples.parent, samples.name, c) for c in CLASSES}
    if any(not fs for fs in files.values()):
        raise SystemExit(f"error: {samples} needs one folder of scans per class: {', '.join(CLASSES)}")
    if not 2 <= args.folds <= len({patient(f) for f in files["NORMAL"]}):
        raise SystemExit("error: --folds must be at least 2 and at most the number of NORMAL patients")

    folds = patient_folds(files["NORMAL"], args.folds, args.seed)
    print(f"{samples}: " + ", ".join(f"{c} {len(fs)}" for c, fs in files.items())
          + f" | {args.folds} patient-wise folds of NORMAL: {[len(f) for f in folds]}", flush=True)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-real-") as tmp:
        work = Path(args.work_dir) if args.work_dir else Path(tmp)
        results = []
        for i, held_out in enumerate(folds):
            train_normal = [f for j, fold in enumerate(folds) if j != i for f in fold]
            test = {"NORMAL": held_out, **{c: files[c] for c in CLASSES[1:]}}
            print(f"fold {i + 1}/{args.folds}: train {len(train_normal)} NORMAL | test {len(held_out)} NORMAL, "
                  f"{sum(len(files[c]) for c in CLASSES[1:])} abnormal", flush=True)
            results.append(run_fold(work / f"fold{i + 1}", train_normal, test, args))
            print("  " + " | ".join(f"{k} {v:.3f}" for k, v in results[-1]["NORMAL vs rest"].items())
                  + f" (primary: {results[-1]['primary_score']})", flush=True)
    minutes = (time.perf_counter() - t0) / 60

    names = list(results[0]["NORMAL vs rest"])
    summary = {comp: {k: (float(np.mean(v := [r[comp][k] for r in results])), float(np.std(v, ddof=1)))
                      for k in names} for comp in COMPARISONS}
    print(f"\nimage AUROC, mean ± sd over {args.folds} patient-wise folds ({minutes:.1f} min, {os.cpu_count()} CPUs)")
    print(f"{'score':<12}" + "".join(f"{c:>18}" for c in COMPARISONS))
    for k in names:
        print(f"{k:<12}" + "".join(f"{summary[c][k][0]:>11.3f} ± {summary[c][k][1]:.3f}" for c in COMPARISONS))
    print("primary score chosen at export per fold: " + ", ".join(str(r["primary_score"]) for r in results))
    if args.output:
        Path(args.output).write_text(json.dumps({"args": vars(args), "folds": results, "summary": summary,
                                                 "minutes": minutes}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
