"""Export a trained checkpoint as a calibrated TorchScript scorer into a model store.

    python -m training.export --model_dir saved_models/<run>/best-*.ckpt --model_store model_store --name vqvae

Writes `<model_store>/<name>/<version>/{model.pt, manifest.json}`; the version folder appears atomically (built
beside it, then renamed), so a service watching the store never sees half an export. When the run has a latent prior
(`<run>/prior/`, from `training.train_prior`), the scorer includes it: outputs `nll_map`, `nll` and `combined`
(`--no_prior` leaves it out; `--restore_samples N` adds prior restoration, off by default because it is slow).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import random
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from octcore.manifest import (
    MODEL_FILE,
    InputSpec,
    Manifest,
    ModelStoreError,
    ScoreSpec,
    default_overlay,
    list_versions,
    load_scorer,
    sha256_file,
    write_manifest,
)
from octcore.preprocess import Preprocessing
from training.checkpoint import load_checkpoint
from training.data import CLASSES, DEFAULT_WORKERS, DataError, OCTImages, list_images, load_image, resolve_data_root
from training.errors import TrainingError, run_main
from training.evaluate import ScoredSet, calibrate, score_files, separation
from training.model import VQVAE
from training.prior import GatedPixelCNN, find_prior_checkpoint, load_prior_checkpoint
from training.provenance import code_version, command_line, data_list, portable
from training.scorer import (
    ALM_TOP_FRACTION,
    COMBINED_TERM,
    DEPTH_BASE_PERCENTILE,
    NORMALISED,
    OVERLAY,
    PREFERRED,
    Needs,
    PriorScorer,
    Scorer,
    declared,
    describe,
    fused_maps,
    map_outputs,
    with_role,
    zscore_mean,
)


class ExportError(TrainingError):
    """The checkpoint, data or arguments cannot make a valid model version. `str()` is a one-line reason."""


# The ALM's memory bank: feature vectors drawn from this many normal training scans (32×32 positions each at 128
# px), of which MEMORY_BANK_SIZE are kept — enough to cover normal anatomy, small enough for one matmul per image.
MEMORY_BANK_IMAGES = 128
MEMORY_BANK_SIZE = 4096
# fused_map's normal scales: 64 scans × (S - S/8)² pixels estimate a 99.5th percentile well.
FUSED_SCALE_IMAGES = 64


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.export", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model_dir", required=True, help="checkpoint (best-*.ckpt) or its run folder")
    p.add_argument("--model_store", default="model_store")
    p.add_argument("--name", default="vqvae")
    p.add_argument("--version", type=int, default=None, help="default: next integer in the store")
    p.add_argument("--data_root", default=None, help="override the dataset path recorded in the checkpoint")
    p.add_argument("--threshold_percentile", type=float, default=95.0,
                   help="decision threshold = this percentile of the normal validation scores (the B-scan "
                   "specificity aimed at, in percent)")
    p.add_argument("--threshold_fit", choices=["tail", "empirical"], default="tail",
                   help="tail: the percentile of a (log-)normal fit of those scores, which also sets each volume's "
                   "threshold by its number of B-scans; empirical: the scores' own percentile")
    p.add_argument("--volume_percentile", type=float, default=None,
                   help="a volume's threshold at this percentile (default: --threshold_percentile): how rarely a "
                   "normal volume is flagged")
    p.add_argument("--volume_window", type=int, default=1,
                   help="a volume's score: the highest mean over this many adjacent B-scans (1: its most anomalous "
                   "B-scan, which a lesion seen on one B-scan alone passes; more: lesions that span neighbouring "
                   "B-scans stand out of single odd normal frames)")
    p.add_argument("--top_fraction", type=float, default=0.01, help="fraction of each map averaged into its score")
    p.add_argument("--primary_score", default=None, help="default: the best held-out AUROC (see manifest evaluation)")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: CUDA when present")
    p.add_argument("--heldout_max", type=int, default=2000,
                   help="score at most this many abnormal training scans (a seeded draw) to choose the primary score")
    p.add_argument("--heldout_seed", type=int, default=0, help="seed of that draw")
    p.add_argument("--num_workers", type=int, default=DEFAULT_WORKERS,
                   help="image-loading processes for the held-out scans")
    add_prior_args(p)
    return p


def add_prior_args(p: argparse.ArgumentParser) -> None:
    """Prior options shared by export and inference."""
    p.add_argument("--no_prior", action="store_true", help="leave the run's latent prior (<run>/prior/) out")
    # 5 %, not the pixel maps' 1 %: on the phantom it separated best (held-out AUROC 0.78 vs 0.75; docs/prior.md).
    p.add_argument("--nll_top_fraction", type=float, default=0.05,
                   help="fraction of latent positions whose NLL is averaged into the nll score")
    p.add_argument("--restore_samples", type=int, default=0,
                   help="prior restorations per image (0 = off: one prior pass per resampled code, slow)")
    p.add_argument("--restore_max_positions", type=int, default=64,
                   help="restoration redraws at most this many of each image's highest-NLL codes")


def resolve_checkpoint(model_dir: str) -> Path:
    p = Path(model_dir)
    if p.is_dir():
        best = sorted(p.glob("best-*.ckpt"))
        if not best:
            raise ExportError(f"no best-*.ckpt in {p}")
        return best[-1]
    return p


def build_scorer(ckpt: dict, top_fraction: float, use_prior: bool = True, restore_samples: int = 0,
                 restore_max_positions: int = 64, nll_top_fraction: float = 0.05,
                 ) -> tuple[Scorer | PriorScorer, dict[str, ScoreSpec], list[str]]:
    """The eager scorer plus the score and map definitions the manifest declares for it (from the scorer's own
    declarations, `training.scorer.SCORES`). Includes the run's latent prior when it has one (and `use_prior`); its
    normalised scores need `fit_combined` before they mean anything."""
    model = VQVAE.from_checkpoint(ckpt)
    scorer: Scorer | PriorScorer = Scorer(model, top_fraction).eval()
    params: dict[str, object] = {"top": top_fraction, "alm_top": ALM_TOP_FRACTION, "bank": MEMORY_BANK_SIZE,
                                 "nll_top": nll_top_fraction, "combined_of": ", ".join(with_role(COMBINED_TERM))}
    level: Needs = "vqvae"
    prior_path = find_prior_checkpoint(Path(ckpt["path"])) if use_prior and "path" in ckpt else None
    if prior_path is not None:
        if restore_samples < 0 or restore_max_positions < 1 or not 0 < nll_top_fraction <= 1:
            raise ExportError("--restore_samples must be >= 0, --restore_max_positions >= 1 and "
                              "--nll_top_fraction in (0, 1]")
        pckpt = load_prior_checkpoint(prior_path, ckpt)
        threshold = float(pckpt["position_nll"]["threshold"])
        prep = Preprocessing.from_dict(ckpt["preprocessing"])
        by_depth = prep.region == "retina"  # the band's rows are depths under the RPE; a whole scan's are not
        scorer = PriorScorer(scorer, GatedPixelCNN.from_checkpoint(pckpt), threshold, nll_top_fraction,
                             restore_samples, restore_max_positions, prep.size, by_depth).eval()
        level = "restore" if restore_samples > 0 else "prior"
        params |= {"nll_of": "pixels, inside a frame of S/16 pixels, of" if by_depth else "latent positions of",
                   "nll_depth": (f", minus the {DEPTH_BASE_PERCENTILE:g}th percentile of normal training scans' at "
                                 "the same input row (a depth under the RPE in the retina band), 0 below it")
                   if by_depth else ""}
        params |= {"n": restore_samples, "thr": threshold, "max_pos": restore_max_positions}
    params["fused_of"] = ", ".join(fused_maps(level))
    specs = {d.name: ScoreSpec(description=describe(d, **params), map=d.map) for d in declared(level)}
    return scorer, specs, map_outputs(level)


def prior_summary(scorer: Scorer | PriorScorer, ckpt: dict) -> dict | None:
    """What the manifest records about the prior: where it came from, its shape, its fit and its thresholds."""
    if not isinstance(scorer, PriorScorer):
        return None
    pckpt = load_prior_checkpoint(find_prior_checkpoint(Path(ckpt["path"])), ckpt)
    state = pckpt["state"]
    return {"checkpoint": Path(pckpt["path"]).name, "prior_config": pckpt["prior_config"], "epoch": state["epoch"],
            "best_epoch": state["best_epoch"], "best_val_nll": state["best_val"],
            "position_nll": {k: v for k, v in pckpt["position_nll"].items() if k != "percentiles"},
            "nll_top_fraction": scorer.nll_top_fraction, "restore_samples": scorer.restore_samples,
            "restore_max_positions": scorer.restore_max_positions,
            "combined_of": with_role(COMBINED_TERM), "commands": pckpt["train_config"].get("commands", [])}


def fit_normal_statistics(scorer: Scorer | PriorScorer, ckpt: dict, oct_root: Path, prep: Preprocessing,
                          device: str | torch.device, batch_size: int = 32) -> None:
    """What the scorer learns from the run's own normal *training* scans (never validation or test images): the
    ALM's memory bank from a seeded subset of MEMORY_BANK_IMAGES, then fused_map's scales from the next
    FUSED_SCALE_IMAGES of the same draw (scans outside the bank, whose ALM is not biased low). Must run before the
    scorer is scripted: the bank's size is part of the scripted module."""
    base = scorer.base if isinstance(scorer, PriorScorer) else scorer
    files = [oct_root / f for f in ckpt["train_files"]]
    files = [files[i] for i in np.random.default_rng(0).permutation(len(files))]
    bank_files = files[:MEMORY_BANK_IMAGES]
    scale_files = files[MEMORY_BANK_IMAGES:MEMORY_BANK_IMAGES + FUSED_SCALE_IMAGES] or bank_files[:FUSED_SCALE_IMAGES]
    missing = [f for f in bank_files + scale_files if not f.is_file()]
    if missing:
        raise ExportError(f"{len(missing)} training images are missing under {oct_root}, e.g. {missing[0]} "
                         "(the scorer's normal statistics are fitted on them; pass --data_root)")
    with torch.no_grad():
        feats = torch.cat([base.features(x.to(device)).cpu()
                           for x in DataLoader(OCTImages(bank_files, prep), batch_size=batch_size)])
        base.fit_memory_bank(feats, MEMORY_BANK_SIZE)
        scale_batches = [x.to(device) for x in DataLoader(OCTImages(scale_files, prep), batch_size=batch_size)]
        if isinstance(scorer, PriorScorer):  # before the fused scale: fused_map averages nll_map as it will serve it
            scorer.fit_depth_base(scale_batches)
        outs = [scorer(x) for x in scale_batches]
        for s in {base, scorer}:  # with a prior its fused_map (nll_map added) replaces the base's
            s.fit_fused_scale([torch.cat([o[k].cpu() for o in outs]) for k in s.fused_of])


def spec_maps(specs: dict[str, ScoreSpec]) -> list[str]:
    """The maps the scores name, each once, in score order."""
    return list(dict.fromkeys(s.map for s in specs.values() if s.map))


def fit_combined(scorers: list[torch.nn.Module], normal: ScoredSet) -> None:
    """Give the normalised scores (`combined`) their normal statistics (the calibration images' mean and std of each
    score they combine), in every copy of the scorer (eager and scripted), then fill in the calibration images' own
    normalised scores with the same function the scorer runs."""
    terms = with_role(COMBINED_TERM)
    mean = torch.tensor([float(normal.scores[k].mean()) for k in terms])
    # Floor: a score that is constant on normals (float noise only) must not turn that noise into huge z-scores.
    std = torch.maximum(torch.tensor([float(normal.scores[k].std()) for k in terms]), 1e-6 * mean.abs())
    std = std.clamp_min(1e-12)
    for s in scorers:
        s.normal_mean.copy_(mean)
        s.normal_std.copy_(std)
    for k in normalised(normal.scores):
        normal.scores[k] = zscore_mean([torch.from_numpy(normal.scores[t]).float() for t in terms], mean, std).numpy()


def normalised(scores: dict | list) -> list[str]:
    """The names among `scores` that need `fit_combined`."""
    return [k for k in with_role(NORMALISED) if k in scores]


def calibration_files(ckpt: dict, oct_root: Path) -> list[Path]:
    """The run's own normal validation images (never seen by the optimiser, never the test set)."""
    files = [oct_root / f for f in ckpt["val_files"]] or [oct_root / f for f in ckpt["train_files"][-8:]]
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise ExportError(f"{len(missing)} validation images are missing under {oct_root}, e.g. {missing[0]}")
    return files


def held_out_abnormal(oct_root: Path, max_n: int, seed: int) -> list[Path]:
    """Abnormal *training* scans for the primary-score choice: all of them, or a seeded draw of `max_n` (the real
    set has about 57,000; a few thousand decide between a handful of scores as well as all of them would)."""
    files = [f for c in CLASSES[1:] for f in list_images(oct_root, "train", c)]
    if len(files) <= max_n:
        return files
    return sorted(random.Random(seed).sample(files, max_n))


# The score served when the run's own evidence does not clearly say otherwise (its role in training.scorer). On real
# Kermany scans (patient-wise folds of bench/bench_real.py, no abnormal scan trained on) it separated NORMAL from the
# rest best of all scores; on the demo phantom it equalled the best (bench/bench_quality.py). A score that wins on one
# data set only is a poor default for the next one.
PREFERRED_SCORE = with_role(PREFERRED)[0]


def choose_primary(evaluation: dict[str, dict], specs: dict[str, ScoreSpec], requested: str | None) -> str:
    """The served score: `requested` if given; else the best AUROC in `evaluation`, unless PREFERRED_SCORE is
    within one standard error of it (Hanley-McNeil): a small held-out set ranks close scores by noise, and the
    preferred score's lead across data sets is the stronger evidence."""
    if requested is not None:
        if requested not in specs:
            raise ExportError(f"--primary_score {requested!r} is not one of {sorted(specs)}")
        return requested
    aurocs = {k: v["auroc"] for k, v in evaluation.items() if k in specs and np.isfinite(v["auroc"])}
    if not aurocs:
        return PREFERRED_SCORE if PREFERRED_SCORE in specs else next(iter(specs))
    best = max(aurocs, key=aurocs.get)
    if PREFERRED_SCORE in aurocs and best != PREFERRED_SCORE:
        n_normal, n_abnormal = evaluation[best]["n_normal"], evaluation[best]["n_abnormal"]
        if aurocs[best] - aurocs[PREFERRED_SCORE] <= auroc_standard_error(aurocs[best], n_normal, n_abnormal):
            return PREFERRED_SCORE
    return best


def auroc_standard_error(auroc: float, n_normal: int, n_abnormal: int) -> float:
    """Hanley & McNeil (1982) standard error of an AUROC from n_normal negatives and n_abnormal positives."""
    a = auroc
    q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
    var = a * (1 - a) + (n_abnormal - 1) * (q1 - a * a) + (n_normal - 1) * (q2 - a * a)
    var /= max(n_normal * n_abnormal, 1)
    return float(np.sqrt(max(var, 0.0)))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.command = command_line("training.export", argv)
    return run_main(lambda: export(args))


def export(args: argparse.Namespace) -> Path:
    """The whole export; returns the new version folder. Raises ExportError with a one-line reason."""
    if not 0 < args.threshold_percentile < 100 or not 0 < args.top_fraction <= 1:
        raise ExportError("--threshold_percentile must be in (0, 100) and --top_fraction in (0, 1]")
    if args.version is not None and args.version < 1:
        raise ExportError("--version must be a positive integer")
    if args.heldout_max < 1 or args.num_workers < 0:
        raise ExportError("--heldout_max must be positive and --num_workers >= 0")
    if args.volume_window < 1:
        raise ExportError("--volume_window must be at least 1")
    if args.volume_percentile is not None and not 0 < args.volume_percentile < 100:
        raise ExportError("--volume_percentile must be in (0, 100)")
    ckpt_path = resolve_checkpoint(args.model_dir)
    ckpt = load_checkpoint(ckpt_path)
    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    prep = Preprocessing.from_dict(ckpt["preprocessing"])
    try:
        oct_root = resolve_data_root(args.data_root or ckpt["train_config"]["data_root"])
    except DataError as e:
        raise ExportError(f"{e} (calibration needs the normal validation images; pass --data_root)") from None

    store = Path(args.model_store)
    version = args.version or (max(list_versions(store, args.name), default=0) + 1)
    final = store / args.name / str(version)
    if final.exists():
        raise ExportError(f"{final} already exists; model versions are immutable — pick another --version")

    scorer, specs, maps = build_scorer(ckpt, args.top_fraction, not args.no_prior, args.restore_samples,
                                       args.restore_max_positions, args.nll_top_fraction)
    scorer = scorer.to(device)
    fit_normal_statistics(scorer, ckpt, oct_root, prep, device, args.batch_size)
    with warnings.catch_warnings():  # TorchScript is deprecated upstream but is the artifact our users asked for
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.script(scorer)

    # Calibrate on the run's own normal validation images: never seen by the optimiser, never the test set.
    val_files = calibration_files(ckpt, oct_root)
    score_names, map_names = list(specs), spec_maps(specs)
    normal = score_files(scripted, val_files, prep, score_names, map_names, args.batch_size, device,
                         desc="calibrating")
    if normalised(specs):
        fit_combined([scorer, scripted], normal)
    calibration = {k: calibrate(normal.scores[k], args.threshold_percentile, normal.map_samples.get(specs[k].map),
                                args.threshold_fit, args.volume_window, args.volume_percentile) for k in score_names}

    # Choose the primary score on held-out abnormal *training* scans (the dataset ships some) vs normal validation.
    # A normal-only data set has none: then PREFERRED_SCORE, on the evidence of other data sets.
    abnormal = held_out_abnormal(oct_root, args.heldout_max, args.heldout_seed)
    evaluation: dict[str, dict] = {}
    evidence = f"none (no abnormal training scans): {PREFERRED_SCORE}, the best score across data sets"
    if abnormal:
        ab = score_files(scripted, abnormal, prep, score_names, [], args.batch_size, device,
                         # starting workers costs more than it saves on a few batches
                         args.num_workers if len(abnormal) > 4 * args.batch_size else 0, desc="held-out abnormal")
        evaluation = {k: separation(normal.scores[k], ab.scores[k]) for k in score_names}
        evidence = f"{len(abnormal)} abnormal training scans vs {len(val_files)} normal validation scans"
    primary = choose_primary(evaluation, specs, args.primary_score)

    # The scripted module must agree with the eager one it came from.
    with torch.no_grad():
        probe = torch.from_numpy(load_image(val_files[0], prep))[None, None]
        torch.manual_seed(0)  # restoration draws codes: the same seed must give both the same draws
        eager = scorer(probe.to(device))
        torch.manual_seed(0)
        script_out = scripted(probe.to(device))
    for k in [*score_names, *map_names]:
        if not torch.allclose(eager[k], script_out[k], atol=1e-5, rtol=1e-4):
            raise ExportError(f"scripted and eager scorer disagree on {k}")

    prior = prior_summary(scorer, ckpt)
    store.mkdir(parents=True, exist_ok=True)
    (store / args.name).mkdir(exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{version}-", dir=store / args.name))
    try:
        scripted.cpu().save(str(tmp / MODEL_FILE))
        manifest = Manifest(
            name=args.name, version=version, sha256=sha256_file(tmp / MODEL_FILE), torch_version=torch.__version__,
            created=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            input=InputSpec(size=prep.size), preprocessing=prep.to_dict(), maps=maps, scores=specs,
            primary_score=primary, overlay_score=default_overlay(primary, specs, with_role(OVERLAY)),
            calibration=calibration,
            training=training_summary(ckpt, ckpt_path, oct_root, args.command) | ({"prior": prior} if prior else {}),
            evaluation={"held_out": evaluation, "held_out_evidence": evidence,
                        "primary_score_rule": f"highest held-out AUROC; {PREFERRED_SCORE} when within one standard "
                        "error (Hanley-McNeil) of it" if args.primary_score is None else "given by --primary_score",
                        "threshold": f"{args.threshold_fit} fit of the normal validation scores at percentile "
                        f"{args.threshold_percentile:g}; a volume: the highest mean over {args.volume_window} "
                        "adjacent B-scans, against that statistic's percentile "
                        f"{args.volume_percentile or args.threshold_percentile:g} over volumes of as many B-scans "
                        "drawn from the fit"},
        )
        write_manifest(tmp, manifest)
        load_scorer(tmp, "cpu")  # verify the artifact through the same loader the service uses
        tmp.rename(final)
    except (ModelStoreError, OSError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ExportError(f"export failed: {e}") from None
    print(json.dumps({"exported": str(final), "primary_score": primary,
                      "thresholds": {k: round(c.threshold, 6) for k, c in calibration.items()},
                      "held_out_auroc": {k: round(v["auroc"], 4) for k, v in evaluation.items()}}), flush=True)
    return final


def training_summary(ckpt: dict, ckpt_path: Path, oct_root: Path, export_command: str) -> dict:
    """The run and how to make it again: the commands (training.train's and export's), the code's commit and the
    scans it trained and calibrated on (`training.provenance`); no folder of this machine."""
    state = ckpt["state"]
    return {"checkpoint": ckpt_path.name, "config": portable(ckpt["train_config"]),
            "model_config": ckpt["model_config"], "epoch": state["epoch"], "best_epoch": state["best_epoch"],
            "best_val_loss": state["best_val"], "final_metrics": (state["history"] or [{}])[-1],
            "reproduce": {"code": code_version(), "commands": [*ckpt["train_config"].get("commands", []),
                                                               export_command],
                          "data": data_list(oct_root, {"train": ckpt["train_files"],
                                                       "validation": ckpt["val_files"]})}}


if __name__ == "__main__":
    sys.exit(main())
