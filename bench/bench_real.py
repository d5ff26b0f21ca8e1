"""Real-scan benchmark: choose on selection folds, report on a split used for no choice.

    python bench/bench_real.py --samples samples/kermany --samples <kermany-more> --samples <kermany-c8>
    python bench/bench_real.py ... --ship model_store          # train on every selection scan, export, report

Folders hold `<CLASS>/<CLASS>-<patient>-<n>.jpeg` (Kermany's names) or `NORMAL/normal_train_NNNN.jpg` (numbered
copies of its NORMAL class); they are pooled and deduplicated by content (a name reused for other content is kept
under a suffixed name). `bench/real_protocol.py` gives every scan a role by rule, before any experiment: `report`,
`select` or `guard`. Abnormal scans are never trained on.

Without --ship: k selection folds over the selection NORMAL scans (numbered copies by blocks of numbers, named
copies by patient). Per fold, the recipe trains on the other folds (`training.train`, `training.train_prior`,
`training.export`, each as a user runs it), and the exported scorer, loaded as the service loads it, scores the
fold's NORMAL scans and every selection abnormal scan. Prints, per score, image AUROC (NORMAL vs rest, each disease
vs NORMAL) mean ± sd over folds, and the served score's decision at several percentiles of its normal fit:
specificity per B-scan width, sensitivity per disease. This is where recipes, epochs, scores and operating points
are chosen.

With --ship STORE: the recipe trains on every selection NORMAL scan and is exported into STORE/--name (the shipped
model's reproduce command); then the report split is scored with it: AUROC per disease, and at the shipped threshold
specificity per B-scan width and sensitivity per disease, each with a 95 % interval from a bootstrap over patients
(numbered copies: blocks of `training.data.NUMBERED_BLOCK` numbers), and how much of the served heatmap's mass lies
inside the retina on the abnormal scans. `--report_only STORE_VERSION_DIR` reports an existing model.

A scan in which no retina is found (region `retina`) is refused by the service: it counts as flagged (a reader
sees it) and ranks above every scored scan. Prints tables; asserts nothing. `--work_dir` keeps the folds; with
`--reuse` trained folds are re-exported and re-scored without training again.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from real_protocol import fold as fold_of  # noqa: E402
from real_protocol import pool_names, role  # noqa: E402

from octcore.manifest import Calibration, Manifest, load_scorer, volume_statistic  # noqa: E402
from octcore.preprocess import NoRetinaError, fill_border_padding, preprocess_gray  # noqa: E402
from octcore.retina import find_retina  # noqa: E402
from octcore.scanmap import unflatten  # noqa: E402
from training.data import CLASSES, list_images, patient_of  # noqa: E402
from training.evaluate import score_files, separation  # noqa: E402

SAMPLES = ROOT / "samples" / "kermany"
COMPARISONS = ("NORMAL vs rest", *(f"{c} vs NORMAL" for c in CLASSES[1:]))
SERVED = "served"
# The real-scan recipe, chosen on the selection folds (fold 1 of 3, then confirmed on the others; model card): the
# demo's network at 128² on the retina band (octcore/preprocess.py; against the whole scan at the same budget: the
# card's ablation), 40 epochs (1,100 scans an epoch: as many steps as 150 epochs of the 280 scans
# version 1 saw), a prior of 8 layers × 32 channels for 10 epochs. Served: `nll` (0.993 on fold 1, the best score;
# its map holds 81 % of its mass inside the retina against 53 % for `fused`), thresholded at the 95th percentile of its
# normal fit (fold 1: specificity 0.95, sensitivity 0.96; the 97.5th lost a third of the DME scans).
TRAIN_ARGS = ("--n_hiddens 64 --n_residual_hiddens 32 --n_residual_layers 2 --embedding_dim 32 --n_embeddings 64 "
              "--learning_rate 2e-3 --input_region retina")
PRIOR_ARGS = "--n_layers 8 --n_channels 32 --learning_rate 2e-3"
EXPORT_ARGS = "--threshold_percentile 95 --volume_percentile 95 --volume_window 3 --primary_score nll"
BOOTSTRAP = 2000
# Simulated volumes (the data set has B-scans only): this many B-scans a volume, lesions this many B-scans long, and
# the volume windows the selection folds compare.
VOLUME_FRAMES = (32, 128)
LESION_FRAMES = (1, 3)
WINDOWS = (1, 2, 3)


@dataclass(frozen=True)
class Scan:
    name: str  # unique in the pool
    path: Path
    cls: str
    width: int
    height: int

    @property
    def normal(self) -> bool:
        return self.cls == "NORMAL"

    @property
    def patient(self) -> str:
        return patient_of(Path(self.name))

    @property
    def protocol(self) -> str:
        return f"{self.width}x{self.height}"


def pool_samples(folders: list[Path]) -> list[Scan]:
    """Every scan of every folder, each content once (md5), named as `real_protocol.pool_names` names them."""
    files = {}
    entries = []
    for folder in folders:
        for cls in CLASSES:
            for f in list_images(folder.parent, folder.name, cls):
                digest = hashlib.md5(f.read_bytes()).hexdigest()
                files.setdefault(digest, f)
                entries.append((cls, f.name, digest))
    pooled: list[Scan] = []
    for cls, name, digest in pool_names(entries):
        with Image.open(files[digest]) as im:
            pooled.append(Scan(name, files[digest], cls, im.width, im.height))
    return pooled


def lay_out(root: Path, train_normal: list[Scan], test: list[Scan]) -> Path:
    """An OCT2017 tree of symlinks to the scans (nothing is copied)."""
    shutil.rmtree(root, ignore_errors=True)
    for split, scans in (("train", train_normal), ("test", test)):
        for s in scans:
            d = root / "OCT2017" / split / s.cls
            d.mkdir(parents=True, exist_ok=True)
            (d / s.name).symlink_to(s.path.resolve())
    return root


def cli(*args: str, log: Path) -> None:
    print("+ python -m", " ".join(args), flush=True)
    with open(log, "a") as out:
        proc = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise SystemExit(f"error: python -m {args[0]} failed (exit {proc.returncode}); see {log}")


def train_recipe(data: Path, work: Path, args: argparse.Namespace, log: Path, reuse: bool) -> Path:
    """The recipe on `data`'s train/NORMAL: VQ-VAE, then its prior; the best checkpoint. With `reuse`, a run in
    `work` is kept (an interrupted or shorter one continued to --epochs: the learning rate is constant) and its prior
    too."""
    ckpts = sorted((work / "runs").glob("*/last.ckpt"))
    train = ["--data_root", str(data), "--output_dir", str(work / "runs"), "--epochs", str(args.epochs),
             "--image_size", str(args.image_size), "--batch_size", str(args.batch_size), "--seed", str(args.seed),
             "--device", args.device, "--num_workers", "0", "--cache_dir", str(work / "cache"),
             *args.train_args.split()]
    retrained = False
    if not (reuse and ckpts):
        shutil.rmtree(work / "runs", ignore_errors=True)
        cli("training.train", *train, log=log)
        retrained = True
    elif not (summary := ckpts[-1].parent / "summary.json").is_file() or (
            (done := json.loads(summary.read_text()))["epochs_run"] < args.epochs and not done["stopped_early"]):
        # Interrupted, or shorter: continue it to --epochs.
        cli("training.train", "--resume", str(ckpts[-1].parent), *train, log=log)
        retrained = True
    ckpt = sorted((work / "runs").glob("*/best-*.ckpt"))[-1]
    if args.prior_epochs > 0 and (retrained or not any((ckpt.parent / "prior").glob("best-*.ckpt"))):
        cli("training.train_prior", "--model_dir", str(ckpt), "--epochs", str(args.prior_epochs), "--batch_size",
            str(args.prior_batch_size), "--device", args.device, "--seed", str(args.seed), *args.prior_args.split(),
            log=log)
    return ckpt


@dataclass
class Scored:
    """Every test scan's scores (refused scans: +inf, so they rank above all and are flagged), by scan name."""

    manifest: Manifest
    scans: list[Scan]
    scores: dict[str, np.ndarray]  # score name (and SERVED) → (len(scans),)
    refused: np.ndarray  # (len(scans),) bool

    def where(self, keep: np.ndarray) -> Scored:
        return Scored(self.manifest, [s for s, k in zip(self.scans, keep, strict=True) if k],
                      {k: v[keep] for k, v in self.scores.items()}, self.refused[keep])


def score_scans(version_dir: Path, data: Path, test: list[Scan], batch_size: int) -> Scored:
    """The exported scorer, loaded as the service loads it, on every test scan."""
    manifest, scorer = load_scorer(version_dir, "cpu")
    names, prep = list(manifest.scores), manifest.preprocessing_config()
    files = [data / "OCT2017" / "test" / s.cls / s.name for s in test]
    scored = score_files(scorer, files, prep, names, [], batch_size, desc="scoring")
    row = {f: i for i, f in enumerate(scored.files)}
    refused = np.array([f not in row for f in files])
    scores = {}
    for k in names:
        v = np.full(len(files), np.inf)
        v[~refused] = [scored.scores[k][row[f]] for f in files if f in row]
        scores[k] = v
    scores[SERVED] = scores[manifest.primary_score]
    return Scored(manifest, list(test), scores, refused)


def auroc(normal: np.ndarray, abnormal: np.ndarray) -> float:
    big = np.finfo(np.float64).max  # refused scans: above every score, tied among themselves
    return separation(np.minimum(normal, big), np.minimum(abnormal, big))["auroc"]


def aurocs(s: Scored) -> dict[str, dict[str, float]]:
    normal = np.array([x.normal for x in s.scans])
    cls = np.array([x.cls for x in s.scans])
    out: dict[str, dict[str, float]] = {"NORMAL vs rest": {k: auroc(v[normal], v[~normal])
                                                           for k, v in s.scores.items()}}
    for c in CLASSES[1:]:
        out[f"{c} vs NORMAL"] = {k: auroc(v[normal], v[cls == c]) for k, v in s.scores.items()}
    return out


def decision(s: Scored, threshold: float) -> dict[str, float]:
    """Specificity overall and per B-scan width (protocol), sensitivity overall and per disease, at `threshold`."""
    flagged = s.scores[SERVED] > threshold  # refused scans (+inf) are flagged
    normal = np.array([x.normal for x in s.scans])
    out = {"specificity": float(np.mean(~flagged[normal])), "sensitivity": float(np.mean(flagged[~normal]))}
    for c in CLASSES[1:]:
        m = np.array([x.cls == c for x in s.scans])
        out[f"sensitivity {c}"] = float(np.mean(flagged[m])) if m.any() else float("nan")
    for p in sorted({x.protocol for x in s.scans if x.normal}):
        m = np.array([x.normal and x.protocol == p for x in s.scans])
        out[f"specificity {p}"] = float(np.mean(~flagged[m]))
        out[f"n {p}"] = int(m.sum())
    return out


def bootstrap(s: Scored, threshold: float, reps: int, seed: int) -> dict[str, tuple[float, float]]:
    """95 % percentile intervals of every AUROC and decision number, resampling patients (numbered copies: blocks)
    with replacement within each class: a patient's B-scans are not independent."""
    rng = np.random.default_rng(seed)
    by_patient: dict[tuple[str, str], list[int]] = defaultdict(list)
    for i, x in enumerate(s.scans):
        by_patient[(x.cls, x.patient)].append(i)
    groups: dict[str, list[list[int]]] = defaultdict(list)
    for (c, _), idx in by_patient.items():
        groups[c].append(idx)
    draws: dict[str, list[float]] = defaultdict(list)
    for _ in range(reps):
        pick = np.concatenate([np.concatenate([g[j] for j in rng.integers(0, len(g), len(g))])
                               for g in groups.values()])
        b = Scored(s.manifest, [s.scans[i] for i in pick], {k: v[pick] for k, v in s.scores.items()},
                   s.refused[pick])
        for comp, per in aurocs(b).items():
            draws[f"{comp} {SERVED}"].append(per[SERVED])
        for k, v in decision(b, threshold).items():
            draws[k].append(v)
    return {k: (float(np.nanpercentile(v, 2.5)), float(np.nanpercentile(v, 97.5))) if np.isfinite(v).any()
            else (float("nan"), float("nan")) for k, v in draws.items()}


def volumes(s: Scored, cal: Calibration, reps: int = 1000, seed: int = 0) -> dict[str, float]:
    """The volume decision (`Calibration.volume_threshold`, `volume_statistic`, as the service applies them) on
    simulated volumes: B-scans of one protocol (drawn as the normal scans' widths are) drawn independently from the
    normal scans' scores, and the same with k adjacent B-scans of one disease's scores in place of k of them. Real
    B-scans of one eye are not independent, so this says how the rule behaves, not what a real volume scores."""
    rng = np.random.default_rng(seed)
    score = s.scores[SERVED]
    ok = np.isfinite(score)  # a refused B-scan is left out of a volume
    pools: dict[str, list[float]] = defaultdict(list)
    for x, v, good in zip(s.scans, score, ok, strict=True):
        if x.normal and good:
            pools[x.protocol].append(float(v))
    widths = sorted(pools)
    weight = np.array([len(pools[w]) for w in widths], float)
    lesions = {c: score[ok & np.array([x.cls == c for x in s.scans])] for c in CLASSES[1:]}

    def normal_volume(n: int) -> np.ndarray:
        return rng.choice(pools[widths[rng.choice(len(widths), p=weight / weight.sum())]], n)

    def flagged(v: np.ndarray) -> bool:
        return volume_statistic(v.tolist(), cal.volume_window)[0] > cal.volume_threshold(v.size)

    out: dict[str, float] = {}
    for n in VOLUME_FRAMES:
        out[f"{n} B-scans: normal volumes flagged"] = float(np.mean([flagged(normal_volume(n)) for _ in range(reps)]))
        for k in LESION_FRAMES:
            for c, pool in lesions.items():
                if pool.size:
                    hits = []
                    for _ in range(reps):
                        v = normal_volume(n)
                        at = int(rng.integers(0, n - k + 1))
                        v[at:at + k] = rng.choice(pool, k)
                        hits.append(flagged(v))
                    out[f"{n} B-scans: {k} adjacent {c} flagged"] = float(np.mean(hits))
    return out


def retina_mass(version_dir: Path, scans: list[Scan]) -> tuple[float, float, int]:
    """On these (abnormal) scans: the mean share of the overlay map's mass that lies inside the retina (from the
    ILM to 16 rows under the line under the RPE, `octcore.retina`), and the share of scans whose map peaks there.
    The map is laid on the scan as the service lays its heatmap (`octcore.scanmap`)."""
    manifest, scorer = load_scorer(version_dir, "cpu")
    prep, overlay = manifest.preprocessing_config(), manifest.overlay()
    map_name = manifest.scores[overlay].map if overlay else None
    if map_name is None:
        return float("nan"), float("nan"), 0
    shares, peaks = [], []
    for s in scans:
        with Image.open(s.path) as im:
            gray = np.asarray(im.convert("L"))
        try:
            x, geo = preprocess_gray(gray, prep)
            x0, y0, x1, y1 = geo.box
            retina = geo.retina or find_retina(fill_border_padding(gray[y0:y1, x0:x1] / 255.0, prep))
        except NoRetinaError:
            continue
        with torch.no_grad():
            m = scorer(torch.from_numpy(x)[None, None])[map_name][0, 0].float()
        h, w = y1 - y0, x1 - x0
        if geo.band_top is not None:
            band = unflatten(m[None], torch.from_numpy(geo.band_top)[None], geo.band_rows,
                             round(h * prep.size / geo.band_rows))[0].numpy()
        else:
            band = m.numpy()
        on_box = np.asarray(Image.fromarray(band.astype(np.float32)).resize((w, h), Image.Resampling.BILINEAR))
        on_box = np.clip(on_box, 0, None)
        rows = np.arange(h)[:, None]
        inside = (rows >= retina.ilm[None]) & (rows <= retina.reference[None] + 16)
        total = float(on_box.sum())
        if total > 0:
            shares.append(float(on_box[inside].sum()) / total)
            peaks.append(bool(inside.flat[int(on_box.argmax())]))
    return float(np.mean(shares)), float(np.mean(peaks)), len(shares)


def run_fold(work: Path, train_normal: list[Scan], test: list[Scan], args: argparse.Namespace) -> dict:
    """Train → (prior) → export → score the fold's test scans with the exported scorer."""
    data = lay_out(work / "data", train_normal, test)
    log = work / "log.txt"
    ckpt = train_recipe(data, work, args, log, args.reuse)
    if args.train_only:
        return {}
    shutil.rmtree(work / "store", ignore_errors=True)
    cli("training.export", "--model_dir", str(ckpt), "--model_store", str(work / "store"), "--name", "real",
        "--version", "1", "--num_workers", "0", *args.export_args.split(), log=log)
    s = score_scans(work / "store" / "real" / "1", data, test, args.batch_size)
    cal = s.manifest.calibration[s.manifest.primary_score]
    result = {"auroc": aurocs(s), "primary_score": s.manifest.primary_score, "refused": int(s.refused.sum()),
              "decision": decision(s, cal.threshold)}
    if cal.tail is not None:  # the same fit at other percentiles: what export's --threshold_percentile would give
        result["operating_points"] = {f"{q:g}": decision(s, cal.tail.quantile(q / 100)) for q in args.percentiles}
    # The volume rule at other windows: what export's --volume_window would give.
    result["volumes"] = {f"window {w}": volumes(s, cal.model_copy(update={"volume_window": w})) for w in WINDOWS}
    return result


def mean_sd(values: list[float]) -> tuple[float, float]:
    v = [x for x in values if np.isfinite(x)]
    return (float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0) if v else (float("nan"), 0.0)


def select(pool: list[Scan], args: argparse.Namespace) -> dict:
    """The selection folds: train on k - 1, score the k-th and the selection abnormal scans."""
    normal = [s for s in pool if s.normal and role(s.name, True) == "select"]
    abnormal = [s for s in pool if not s.normal and role(s.name, False) == "select"]
    folds = [[s for s in normal if fold_of(s.name, args.folds) == i] for i in range(args.folds)]
    only = args.fold or list(range(1, args.folds + 1))
    print(f"selection: {len(normal)} NORMAL in {args.folds} folds {[len(f) for f in folds]} | {len(abnormal)} "
          f"abnormal ({', '.join(f'{c} {sum(s.cls == c for s in abnormal)}' for c in CLASSES[1:])})", flush=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-real-") as tmp:
        work = Path(args.work_dir) if args.work_dir else Path(tmp)
        for i in only:
            train_normal = [s for j, f in enumerate(folds) if j != i - 1 for s in f]
            print(f"fold {i}/{args.folds}: train {len(train_normal)} NORMAL | test {len(folds[i - 1])} NORMAL, "
                  f"{len(abnormal)} abnormal", flush=True)
            r = run_fold(work / f"fold{i}", train_normal, folds[i - 1] + abnormal, args)
            if r:
                results.append(r)
                print("  " + " | ".join(f"{k} {v:.3f}" for k, v in r["auroc"]["NORMAL vs rest"].items())
                      + f" (served: {r['primary_score']}; {r['refused']} refused)", flush=True)
    return {"folds": results}


def print_selection(results: list[dict]) -> None:
    names = list(results[0]["auroc"]["NORMAL vs rest"])
    print(f"\nselection: image AUROC, mean ± sd over {len(results)} fold(s)")
    print(f"{'score':<20}" + "".join(f"{c:>20}" for c in COMPARISONS))
    for k in names:
        label = f"{SERVED} ({results[0]['primary_score']})" if k == SERVED else k
        print(f"{label:<20}" + "".join("{:>13.3f} ± {:.3f}".format(*mean_sd([r["auroc"][c][k] for r in results]))
                                       for c in COMPARISONS))
    ops = {"manifest": [r["decision"] for r in results]}
    for q in results[0].get("operating_points", {}):
        ops[q] = [r["operating_points"][q] for r in results]
    keys = [k for k in results[0]["decision"] if not k.startswith("n ")]
    print("\nselection: the served score's decision, mean over folds (columns: percentile of the normal fit)")
    print(f"{'':<26}" + "".join(f"{q:>10}" for q in ops))
    for k in keys:
        print(f"{k:<26}" + "".join(f"{np.nanmean([d[k] for d in v]):>10.3f}" for v in ops.values()))
    if all("volumes" in r for r in results):
        vols = {w: [r["volumes"][w] for r in results] for w in results[0]["volumes"]}
        print("\nselection: simulated volumes (independent B-scans of one protocol; a lesion: k adjacent B-scans of "
              "one disease), share flagged, mean over folds (columns: export's --volume_window)")
        print(f"{'':<36}" + "".join(f"{w:>10}" for w in vols))
        for k in next(iter(vols.values()))[0]:
            print(f"{k:<36}" + "".join(f"{np.nanmean([d.get(k, np.nan) for d in v]):>10.3f}" for v in vols.values()))


def report(version_dir: Path, pool: list[Scan], work: Path, args: argparse.Namespace) -> dict:
    """The report split, scored by the model in `version_dir`, with bootstrap intervals."""
    test = [s for s in pool if role(s.name, s.normal) == "report"]
    data = lay_out(work / "report-data", [], test)
    s = score_scans(version_dir, data, test, args.batch_size)
    cal = s.manifest.calibration[s.manifest.primary_score]
    point = {"auroc": aurocs(s), "decision": decision(s, cal.threshold)}
    ci = bootstrap(s, cal.threshold, args.bootstrap, args.seed)
    share, peak, n_mass = retina_mass(version_dir, [x for x in test if not x.normal])
    vols = volumes(s, cal, seed=args.seed)
    out = {"model": f"{s.manifest.name}/{s.manifest.version}", "primary_score": s.manifest.primary_score,
           "threshold": cal.threshold, "threshold_percentile": cal.threshold_percentile,
           "n": {c: sum(x.cls == c for x in test) for c in CLASSES}, "refused": int(s.refused.sum()),
           "patients": {c: len({x.patient for x in test if x.cls == c}) for c in CLASSES},
           "point": point, "ci": ci, "map_mass_in_retina": share, "map_peak_in_retina": peak,
           "map_scans": n_mass, "volumes": vols, "volume_window": cal.volume_window}
    print(f"\nreport split ({out['model']}, served {out['primary_score']}; used for no choice): "
          + ", ".join(f"{c} {out['n'][c]} scans / {out['patients'][c]} patients" for c in CLASSES)
          + f"; {out['refused']} refused (no retina)")
    print(f"{'image AUROC (served)':<28}{'point':>8}   95 % interval (bootstrap over patients)")
    for comp in COMPARISONS:
        lo, hi = ci[f"{comp} {SERVED}"]
        print(f"{comp:<28}{point['auroc'][comp][SERVED]:>8.3f}   {lo:.3f}–{hi:.3f}")
    print(f"\nat the shipped threshold {cal.threshold:.4g} (percentile {cal.threshold_percentile:g} of the normal fit)")
    for k, v in point["decision"].items():
        if k.startswith("n "):
            continue
        n = point["decision"].get(f"n {k.split()[-1]}", "")
        lo, hi = ci[k]
        print(f"{k:<28}{v:>8.3f}   {lo:.3f}–{hi:.3f}" + (f"   ({n} scans)" if n != "" else ""))
    print(f"\nserved heatmap on {n_mass} abnormal scans: {share:.1%} of its mass inside the retina (ILM to 16 rows "
          f"under the RPE's reference line); its peak inside on {peak:.0%}")
    print(f"\nsimulated volumes (volume window {cal.volume_window}; independent B-scans of one protocol, a lesion: k "
          "adjacent B-scans of one disease): share flagged")
    for k, v in vols.items():
        print(f"{k:<36}{v:>8.3f}")
    print("\n" + report_markdown(out))
    return out


def report_markdown(r: dict) -> str:
    """The report's tables as the model card and README show them."""
    ci, point = r["ci"], r["point"]
    lines = ["| image AUROC (served score) | report split | 95 % interval |", "|---|---|---|"]
    for comp in COMPARISONS:
        lo, hi = ci[f"{comp} {SERVED}"]
        lines.append(f"| {comp} | {point['auroc'][comp][SERVED]:.3f} | {lo:.3f}–{hi:.3f} |")
    head = f"| at the shipped threshold (percentile {r['threshold_percentile']:g}) | scans | rate | 95 % interval |"
    lines += ["", head, "|---|---|---|---|"]
    d = point["decision"]
    for k, v in d.items():
        if k.startswith("n "):
            continue
        if k.startswith("specificity "):
            n = d[f"n {k.split()[-1]}"]
        elif k.startswith("sensitivity "):
            n = r["n"][k.split()[-1]]
        elif k == "specificity":
            n = r["n"]["NORMAL"]
        else:
            n = sum(r["n"][c] for c in CLASSES[1:])
        lo, hi = ci[k]
        lines.append(f"| {k} | {n} | {v:.3f} | {lo:.3f}–{hi:.3f} |")
    return "\n".join(lines)


def ship(pool: list[Scan], args: argparse.Namespace) -> dict:
    """The shipped model: the recipe trained on every selection NORMAL scan, exported into `args.ship`, reported."""
    normal = [s for s in pool if s.normal and role(s.name, True) == "select"]
    with tempfile.TemporaryDirectory(prefix="bench-real-ship-") as tmp:
        work = Path(args.work_dir or tmp) / "ship"
        data = lay_out(work / "data", normal, [])
        log = work / "log.txt"
        ckpt = train_recipe(data, work, args, log, reuse=args.reuse)
        before = set(Path(args.ship, args.name).glob("*"))
        cli("training.export", "--model_dir", str(ckpt), "--model_store", args.ship, "--name", args.name,
            "--num_workers", "0", "--data_root", str(data), *args.export_args.split(), log=log)
        version_dir = sorted(set(Path(args.ship, args.name).glob("*")) - before)[-1]
        print(f"exported {version_dir} (trained on {len(normal)} selection NORMAL scans)")
        return report(version_dir, pool, work, args)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", action="append", default=None,
                   help=f"folder holding <CLASS>/<scans>; repeat to pool (default: {SAMPLES})")
    p.add_argument("--folds", type=int, default=3)
    p.add_argument("--fold", type=int, action="append", default=None, help="run only this fold (1-based; repeat)")
    p.add_argument("--seed", type=int, default=0, help="training and bootstrap seed")
    p.add_argument("--image_size", type=int, default=128)
    p.add_argument("--epochs", type=int, default=40, help="VQ-VAE epochs (early stopping may end sooner)")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--prior_epochs", type=int, default=10, help="latent prior epochs (0 = no prior)")
    p.add_argument("--prior_batch_size", type=int, default=8)
    p.add_argument("--train_args", default=TRAIN_ARGS, help="further training.train arguments")
    p.add_argument("--prior_args", default=PRIOR_ARGS, help="further training.train_prior arguments")
    p.add_argument("--export_args", default=EXPORT_ARGS, help="further training.export arguments")
    p.add_argument("--device", default="cpu", choices=["cpu", "gpu", "cuda"])
    p.add_argument("--work_dir", default=None, help="keep data, runs and stores here (default: a temp dir)")
    p.add_argument("--reuse", action="store_true",
                   help="with --work_dir: keep trained runs (a shorter one is continued to --epochs), re-export and "
                   "re-score")
    p.add_argument("--ship", default=None, metavar="STORE",
                   help="train the recipe on every selection NORMAL scan, export it into STORE/--name, report it")
    p.add_argument("--report_only", default=None, metavar="VERSION_DIR", help="report an exported model")
    p.add_argument("--name", default="kermany-oct", help="model name for --ship")
    p.add_argument("--train_only", action="store_true", help="with --work_dir: train the folds, export nothing")
    p.add_argument("--percentiles", type=lambda v: [float(x) for x in v.split(",")], default=[90, 95, 97.5, 99],
                   help="selection: also the decision at these percentiles of the served score's normal fit")
    p.add_argument("--bootstrap", type=int, default=BOOTSTRAP, help="bootstrap draws for the report's intervals")
    p.add_argument("--output", default=None, help="also write the results as JSON here")
    args = p.parse_args()
    folders = [Path(s) for s in (args.samples or [str(SAMPLES)])]
    for f in folders:
        if not f.is_dir():
            raise SystemExit(f"error: --samples {f} is not a folder")
    pool = pool_samples(folders)
    counts = {c: sum(s.cls == c for s in pool) for c in CLASSES}
    if any(n == 0 for n in counts.values()):
        raise SystemExit("error: the samples need scans of every class; found "
                         + ", ".join(f"{c} {n}" for c, n in counts.items()))
    roles = defaultdict(int)
    for s in pool:
        roles[role(s.name, s.normal)] += 1
    print(", ".join(map(str, folders)) + ": " + ", ".join(f"{c} {n}" for c, n in counts.items())
          + " distinct scans | roles: " + ", ".join(f"{k} {v}" for k, v in sorted(roles.items())), flush=True)
    if not args.folds >= 2:
        raise SystemExit("error: --folds must be at least 2")
    t0 = time.perf_counter()
    if args.report_only:
        with tempfile.TemporaryDirectory(prefix="bench-real-report-") as tmp:
            out = report(Path(args.report_only), pool, Path(args.work_dir or tmp), args)
    elif args.ship:
        out = ship(pool, args)
    else:
        out = select(pool, args)
        if out["folds"]:
            print_selection(out["folds"])
    minutes = (time.perf_counter() - t0) / 60
    print(f"\n{minutes:.1f} min on {os.cpu_count()} CPUs")
    if args.output:
        Path(args.output).write_text(json.dumps({"args": vars(args), "minutes": minutes, **out}, indent=2,
                                                default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
