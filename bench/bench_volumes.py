"""Volume-level decision: sensitivity and specificity over volumes of B-scans, with an exported model.

    python -m training.phantom demo/volumes --train-normal 0 --test-per-class 0 --train-abnormal 0 --volumes 10 --seed 1
    python bench/bench_volumes.py --model_dir model_store/phantom/1 --volumes demo/volumes/volumes

Each volume is a folder of B-scans (`<volumes>/<CLASS>/<volume>/*.jpeg`, as `training.phantom --volumes` writes).
Every B-scan is scored by the exported scorer; a volume is called anomalous as the service calls it: when its
`volume_statistic` (the highest mean over the manifest's `volume_window` adjacent B-scans) passes the threshold for
that many frames (`Calibration.volume_threshold`). Printed beside it: the most anomalous B-scan against its own
threshold for n frames (window 1), and against the plain B-scan threshold (what a per-B-scan rule does to volumes).
Asserts nothing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from octcore.manifest import load_scorer, volume_statistic  # noqa: E402
from training.data import CLASSES  # noqa: E402
from training.evaluate import score_files  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_dir", required=True, help="a model version folder: <store>/<name>/<version>")
    p.add_argument("--volumes", required=True, help="folder of <CLASS>/<volume>/*.jpeg")
    p.add_argument("--batch_size", type=int, default=16)
    args = p.parse_args()
    manifest, scorer = load_scorer(Path(args.model_dir), "cpu")
    primary, prep = manifest.primary_score, manifest.preprocessing_config()
    cal, higher = manifest.calibration[primary], manifest.scores[primary].higher_is_anomalous
    single = cal.model_copy(update={"volume_window": 1})
    rows: dict[str, list[tuple[bool, bool, bool, int]]] = {}
    for cls in CLASSES:
        for vol in sorted(d for d in (Path(args.volumes) / cls).glob("*") if d.is_dir()):
            files = sorted(vol.glob("*.jp*g"), key=lambda f: int(f.stem.rsplit("-", 1)[-1]))
            if not files:
                continue
            s = score_files(scorer, files, prep, [primary], [], args.batch_size, desc=vol.name).scores[primary]
            sign = 1.0 if higher else -1.0  # compare as "higher is anomalous"
            stat, _ = volume_statistic(s.tolist(), cal.volume_window, higher)
            worst = float((sign * s).max())
            over_bscan = int(np.sum(sign * s > sign * cal.threshold))
            rows.setdefault(cls, []).append((sign * stat > sign * cal.volume_threshold(len(files), higher),
                                             worst > sign * single.volume_threshold(len(files), higher),
                                             worst > sign * cal.threshold, over_bscan))
    if not rows.get("NORMAL"):
        raise SystemExit(f"error: no NORMAL volumes under {args.volumes}")
    n_frames = len(files)
    print(f"model {manifest.name}/{manifest.version}, served score {primary}; {sum(map(len, rows.values()))} volumes "
          f"of {n_frames} B-scans; B-scan threshold {cal.threshold:.4g}; volume threshold "
          f"{cal.volume_threshold(n_frames, higher):.4g} (window {cal.volume_window}), "
          f"{single.volume_threshold(n_frames, higher):.4g} (window 1)")
    rules = (f"window {cal.volume_window}", "window 1", "B-scan thr")
    print(f"{'class':<8}{'volumes':>8}{'':>6}" + "".join(f"{r:>14}" for r in rules) + f"{'frames > B-scan thr':>22}")
    for cls, r in rows.items():
        a = np.array(r, dtype=float)
        label = "spec" if cls == "NORMAL" else "sens"
        rates = 1 - a[:, :3].mean(axis=0) if cls == "NORMAL" else a[:, :3].mean(axis=0)
        print(f"{cls:<8}{len(r):>8}{label:>6}" + "".join(f"{v:>14.3f}" for v in rates) + f"{a[:, 3].mean():>22.1f}")
    abnormal = np.array([x for c, r in rows.items() if c != "NORMAL" for x in r], dtype=float)
    if abnormal.size:
        sens = abnormal[:, :3].mean(axis=0)
        print("abnormal volumes, sensitivity: " + ", ".join(f"{v:.3f} ({r})" for v, r in zip(sens, rules, strict=True)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
