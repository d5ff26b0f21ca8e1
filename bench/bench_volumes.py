"""Volume-level decision: sensitivity and specificity over volumes of B-scans, with an exported model.

    python -m training.phantom demo/data --train-normal 0 --test-per-class 0 --volumes 20 --volume-frames 49
    python bench/bench_volumes.py --model_dir model_store/phantom/1 --volumes demo/data/volumes

Each volume is a folder of B-scans (`<volumes>/<CLASS>/<volume>/*.jpeg`, as `training.phantom --volumes` writes).
Every B-scan is scored by the exported scorer; a volume is called anomalous as the service calls it: when its most
anomalous B-scan passes the manifest's threshold for that many frames (`Calibration.volume_threshold`). The same is
printed for the plain B-scan threshold applied to the maximum, the rule the volume threshold replaces. Asserts nothing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from octcore.manifest import load_scorer  # noqa: E402
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
    rows: dict[str, list[tuple[bool, bool, int]]] = {}
    for cls in CLASSES:
        for vol in sorted(d for d in (Path(args.volumes) / cls).glob("*") if d.is_dir()):
            files = sorted(vol.glob("*.jp*g"), key=lambda f: int(f.stem.rsplit("-", 1)[-1]))
            if not files:
                continue
            s = score_files(scorer, files, prep, [primary], [], args.batch_size, desc=vol.name).scores[primary]
            sign = 1.0 if higher else -1.0  # compare as "higher is anomalous"
            worst = float((sign * s).max())
            over_bscan = int(np.sum(sign * s > sign * cal.threshold))
            rows.setdefault(cls, []).append((worst > sign * cal.volume_threshold(len(files), higher),
                                             worst > sign * cal.threshold, over_bscan))
    if not rows.get("NORMAL"):
        raise SystemExit(f"error: no NORMAL volumes under {args.volumes}")
    n_frames = len(files)
    print(f"model {manifest.name}/{manifest.version}, served score {primary}; {sum(map(len, rows.values()))} volumes "
          f"of {n_frames} B-scans; B-scan threshold {cal.threshold:.4g}, volume threshold "
          f"{cal.volume_threshold(n_frames, higher):.4g}")
    print(f"{'class':<8}{'volumes':>8}{'volume rule':>14}{'B-scan rule':>14}{'frames over B-scan thr (mean)':>32}")
    for cls, r in rows.items():
        a = np.array(r)
        label = "specificity" if cls == "NORMAL" else "sensitivity"
        v, b = (1 - a[:, 0].mean(), 1 - a[:, 1].mean()) if cls == "NORMAL" else (a[:, 0].mean(), a[:, 1].mean())
        print(f"{cls:<8}{len(r):>8}{v:>10.3f} {label[:4]}{b:>10.3f} {label[:4]}{a[:, 2].mean():>32.1f}")
    abnormal = np.array([x for c, r in rows.items() if c != "NORMAL" for x in r])
    if abnormal.size:
        print(f"abnormal volumes: sensitivity {abnormal[:, 0].mean():.3f} (volume rule), "
              f"{abnormal[:, 1].mean():.3f} (B-scan rule)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
