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
    p.add_argument("--windows", default="1,3", help="also report these volume windows (export --volume_window)")
    p.add_argument("--batch_size", type=int, default=16)
    args = p.parse_args()
    manifest, scorer = load_scorer(Path(args.model_dir), "cpu")
    primary, prep = manifest.primary_score, manifest.preprocessing_config()
    cal, higher = manifest.calibration[primary], manifest.scores[primary].higher_is_anomalous
    windows = list(dict.fromkeys([cal.volume_window, *(int(w) for w in args.windows.split(","))]))
    rules = [cal.model_copy(update={"volume_window": w}) for w in windows]
    sign = 1.0 if higher else -1.0  # compare as "higher is anomalous"
    rows: dict[str, list[list[float]]] = {}  # per volume: one flag per rule, the B-scan rule's, frames over
    for cls in CLASSES:
        for vol in sorted(d for d in (Path(args.volumes) / cls).glob("*") if d.is_dir()):
            files = sorted(vol.glob("*.jp*g"), key=lambda f: int(f.stem.rsplit("-", 1)[-1]))
            if not files:
                continue
            s = score_files(scorer, files, prep, [primary], [], args.batch_size, desc=vol.name).scores[primary]
            flags = [sign * volume_statistic(s.tolist(), r.volume_window, higher)[0]
                     > sign * r.volume_threshold(len(files), higher) for r in rules]
            rows.setdefault(cls, []).append([*flags, float((sign * s).max()) > sign * cal.threshold,
                                             float(np.sum(sign * s > sign * cal.threshold))])
    if not rows.get("NORMAL"):
        raise SystemExit(f"error: no NORMAL volumes under {args.volumes}")
    n = len(files)
    print(f"model {manifest.name}/{manifest.version}, served score {primary}; {sum(map(len, rows.values()))} volumes "
          f"of {n} B-scans; B-scan threshold {cal.threshold:.4g}; volume thresholds "
          + ", ".join(f"{r.volume_threshold(n, higher):.4g} (window {r.volume_window})" for r in rules)
          + f"; the manifest's window: {cal.volume_window}")
    names = [f"window {w}" for w in windows] + ["B-scan thr"]
    k = len(names)
    print(f"{'class':<8}{'volumes':>8}{'':>6}" + "".join(f"{r:>14}" for r in names) + f"{'frames > B-scan thr':>22}")
    for cls, r in rows.items():
        a = np.array(r, dtype=float)
        label = "spec" if cls == "NORMAL" else "sens"
        rates = 1 - a[:, :k].mean(axis=0) if cls == "NORMAL" else a[:, :k].mean(axis=0)
        print(f"{cls:<8}{len(r):>8}{label:>6}" + "".join(f"{v:>14.3f}" for v in rates) + f"{a[:, k].mean():>22.1f}")
    abnormal = np.array([x for c, r in rows.items() if c != "NORMAL" for x in r], dtype=float)
    if abnormal.size:
        sens = abnormal[:, :k].mean(axis=0)
        print("abnormal volumes, sensitivity: " + ", ".join(f"{v:.3f} ({r})" for v, r in zip(sens, names, strict=True)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
