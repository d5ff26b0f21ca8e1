"""Detection quality of the demo model, as the README reports it: one command, markdown tables out, asserts nothing.

    python bench/bench_quality.py [--demo_dir demo-quality] [--rescore]

Runs `scripts/demo.sh` without the service (phantom → VQ-VAE → prior → evaluation → export; skipped when
--demo_dir already holds an exported model: then it only reads; with --rescore it re-runs only evaluation and export
on the demo's trained run, for a change to the scorer) and prints, from that run's
`inference/metrics.json`, `inference/scores.csv` and the exported `manifest.json`:
- image AUROC of every score, NORMAL vs rest and each disease vs NORMAL; the served (primary) score in bold;
- pixel AUROC and AUPRO (FPR ≤ 0.3) of every anomaly map against the phantom's lesion masks;
- sensitivity and specificity of the served score at the manifest's threshold on the test split;
- the demo's wall time (when it ran here).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DISEASES = ("CNV", "DME", "DRUSEN")


def run_demo(demo_dir: Path) -> float:
    env = os.environ | {"DEMO_DIR": str(demo_dir), "DEMO_SERVE": "0", "OCT_MODEL_STORE": str(demo_dir / "store"),
                        "DEMO_NAME": "phantom"}
    start = time.perf_counter()
    subprocess.run(["bash", str(ROOT / "scripts" / "demo.sh")], env=env, check=True)
    return time.perf_counter() - start


def rescore(demo_dir: Path) -> None:
    """`training.inference` and `training.export` (the next store version) on the latest trained run, as the demo
    runs them: what a scorer change does to an already trained model, in a minute instead of a training."""
    ckpt = latest(list((demo_dir / "runs").glob("*/best-*.ckpt")), f"trained run under {demo_dir}/runs")
    common = ["--model_dir", str(ckpt), "--data_root", str(demo_dir / "data")]
    for cmd in (["training.inference", *common],
                ["training.export", *common, "--model_store", str(demo_dir / "store"), "--name", "phantom"]):
        subprocess.run([sys.executable, "-m", *cmd], cwd=ROOT, check=True)


def latest(paths: list[Path], what: str) -> Path:
    if not paths:
        raise SystemExit(f"error: no {what}")
    return sorted(paths)[-1]


def tables(demo_dir: Path) -> str:
    run = latest([p for p in (demo_dir / "runs").glob("*/") if (p / "inference" / "metrics.json").is_file()],
                 f"evaluated run under {demo_dir}/runs")
    metrics = json.loads((run / "inference" / "metrics.json").read_text())
    versions = [p for p in (demo_dir / "store" / "phantom").glob("*/") if p.name.isdigit()]
    manifest = json.loads((max(versions, key=lambda p: int(p.name)) / "manifest.json").read_text())
    primary = manifest["primary_score"]
    results = metrics["results"]
    scores = list(next(iter(results.values())))

    def cell(k: str, v: float) -> str:
        return f"**{v:.3f}**" if k == primary else f"{v:.3f}"

    lines = [f"Image AUROC, phantom test split ({sum(metrics['counts'].values())} scans); **bold** = the served "
             f"score (`primary_score` {primary!r}, chosen at export on held-out scans):", "",
             "| comparison | " + " | ".join(scores) + " |", "|---" * (len(scores) + 1) + "|"]
    lines += [f"| {comp} | " + " | ".join(cell(k, per[k]["auroc"]) for k in scores) + " |"
              for comp, per in results.items()]
    pixel = metrics.get("pixel")
    if pixel:
        lines += ["", "Pixel-level, against the phantom's lesion masks (every test scan; NORMAL has no lesion):", "",
                  "| map | pixel AUROC | AUPRO (FPR ≤ 0.3) |", "|---|---|---|"]
        lines += [f"| `{k}` | {v['auroc']:.3f} | {v['aupro']:.3f} |" for k, v in pixel.items()]
    threshold = manifest["calibration"][primary]["threshold"]
    with open(run / "inference" / "scores.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    flagged: dict[str, list[bool]] = {}
    for r in rows:
        flagged.setdefault(r["category"], []).append(float(r[primary]) > threshold)
    abnormal = [v for c in DISEASES for v in flagged.get(c, [])]
    rate = {c: sum(v) / len(v) for c, v in flagged.items() if v}
    lines += ["", f"At the manifest threshold ({primary} > {threshold:.4g}, the "
              f"{manifest['calibration'][primary]['threshold_percentile']:g}th percentile of the normal validation "
              f"scans' fit): sensitivity {sum(abnormal) / max(len(abnormal), 1):.3f} ("
              + ", ".join(f"{c} {rate[c]:.3f}" for c in DISEASES if c in rate)
              + f"), specificity {1 - rate.get('NORMAL', float('nan')):.3f}."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python bench/bench_quality.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demo_dir", type=Path, default=ROOT / "demo-quality",
                   help="where the demo's data, runs and model store go (reused when it holds an export)")
    p.add_argument("--rescore", action="store_true",
                   help="re-run evaluation and export on the demo's trained run (no training) before printing")
    args = p.parse_args(argv)
    exported = list((args.demo_dir / "store" / "phantom").glob("*/manifest.json"))
    if args.rescore:
        rescore(args.demo_dir)
    seconds = None if exported or args.rescore else run_demo(args.demo_dir)
    print(tables(args.demo_dir))
    if seconds is not None:
        print(f"\nDemo wall time (phantom → train → prior → evaluate → export): {seconds / 60:.1f} min, "
              f"{os.cpu_count()} CPUs visible.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
