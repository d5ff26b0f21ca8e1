"""Scoring image sets and summarising scores: shared by evaluation (`training.inference`) and export calibration."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve
from torch.utils.data import DataLoader
from tqdm import tqdm

from octcore.manifest import Calibration, TailFit
from octcore.preprocess import Preprocessing
from training.data import OCTImages, with_retina

# Pixels sampled per image to estimate each map's normal value range (the heatmap scale) without keeping all maps.
MAP_SAMPLES_PER_IMAGE = 2048


@dataclass
class ScoredSet:
    files: list[Path]  # the scored files, in the order of every array below
    refused: list[Path] = field(default_factory=list)  # no retina found (region `retina`): not scored
    scores: dict[str, np.ndarray] = field(default_factory=dict)
    map_samples: dict[str, np.ndarray] = field(default_factory=dict)
    examples: list[dict[str, np.ndarray]] = field(default_factory=list)  # first `keep_examples` images' maps
    maps: dict[str, np.ndarray] = field(default_factory=dict)  # with `keep_maps`: every image's maps (N, S, S)


@torch.no_grad()
def score_files(scorer: torch.nn.Module, files: list[Path], prep: Preprocessing, score_names: list[str],
                map_names: list[str], batch_size: int = 32, device: str | torch.device = "cpu",
                num_workers: int = 0, keep_examples: int = 0, keep_maps: bool = False,
                desc: str = "scoring") -> ScoredSet:
    """Every file's scores (and map samples) through `scorer`, as the service would compute them. Files in which
    no retina is found (region `retina`) are not scored: `refused` lists them, as the service refuses them."""
    files, refused = with_retina(files, prep)
    loader = DataLoader(OCTImages(files, prep), batch_size=batch_size, num_workers=num_workers)
    scores: dict[str, list[np.ndarray]] = {k: [] for k in score_names}
    samples: dict[str, list[np.ndarray]] = {k: [] for k in map_names}
    examples: list[dict[str, np.ndarray]] = []
    kept: dict[str, list[np.ndarray]] = {k: [] for k in map_names} if keep_maps else {}
    rng = np.random.default_rng(0)
    for x in tqdm(loader, desc=desc, leave=False, disable=None, file=sys.stderr):
        out = scorer(x.to(device))
        for k in score_names:
            scores[k].append(out[k].float().cpu().numpy())
        maps = {k: out[k].float().cpu().numpy()[:, 0] for k in map_names}
        for k, m in maps.items():
            if keep_maps:
                kept[k].append(m)
            flat = m.reshape(m.shape[0], -1)
            pick = rng.integers(0, flat.shape[1], size=(flat.shape[0], min(MAP_SAMPLES_PER_IMAGE, flat.shape[1])))
            samples[k].append(np.take_along_axis(flat, pick, axis=1).ravel())
        for i in range(x.shape[0]):
            if len(examples) < keep_examples:
                examples.append({"input": x[i, 0].numpy(), "reconstruction": out["reconstruction"][i, 0].float().cpu()
                                 .numpy(), **{k: v[i] for k, v in maps.items() if k != "reconstruction"}})
    return ScoredSet(files=list(files), refused=refused, scores={k: _cat(v) for k, v in scores.items()},
                     map_samples={k: _cat(v) for k, v in samples.items()}, examples=examples,
                     maps={k: _cat(v) for k, v in kept.items()})


def _cat(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros(0, np.float32)


def fit_tail(values: np.ndarray) -> TailFit | None:
    """Normal (or, for a score positive on every image, log-normal) fit of normal scores; None below 3 images or for
    a constant score. The anomaly scores are means of a map's top pixels: bounded below, skewed to the right, which
    a log straightens."""
    v = np.asarray(values, dtype=np.float64)
    if v.size < 3:
        return None
    family = "lognormal" if v.min() > 0 else "normal"
    x = np.log(v) if family == "lognormal" else v
    sigma = float(x.std(ddof=1))
    if not np.isfinite(sigma) or sigma <= 1e-12 * max(1.0, abs(float(x.mean()))):
        return None
    return TailFit(family=family, mu=float(x.mean()), sigma=sigma)


def calibrate(values: np.ndarray, threshold_percentile: float, map_samples: np.ndarray | None,
              fit: str = "tail", volume_window: int = 1, volume_percentile: float | None = None) -> Calibration:
    """Normal-image score distribution and its decision threshold at `threshold_percentile`: of the fitted tail
    (`fit="tail"`, falling back to the empirical percentile where no fit is possible) or of the images themselves
    (`fit="empirical"`). Either way about 100 - p % of normal B-scans are flagged. The volume rule's settings are
    recorded beside it (`Calibration.volume_threshold`)."""
    if values.size == 0:
        raise ValueError("no normal images to calibrate on")
    map_scale = None
    if map_samples is not None and map_samples.size:
        map_scale = float(max(np.percentile(map_samples, 99.5), 1e-8))
    tail = fit_tail(values) if fit == "tail" else None
    p = threshold_percentile
    threshold = tail.quantile(p / 100) if tail else float(np.percentile(values, p))
    return Calibration(n=int(values.size), mean=float(values.mean()), std=float(values.std()),
                       percentiles=[float(v) for v in np.percentile(values, np.arange(101))],
                       threshold_percentile=threshold_percentile, threshold=threshold, map_scale=map_scale, tail=tail,
                       volume_window=volume_window, volume_percentile=volume_percentile)


def separation(normal: np.ndarray, abnormal: np.ndarray) -> dict[str, float]:
    """AUROC and AUPRC of "abnormal scores higher" (abnormal is the positive class)."""
    if normal.size == 0 or abnormal.size == 0:
        return {"auroc": float("nan"), "auprc": float("nan"), "n_normal": int(normal.size),
                "n_abnormal": int(abnormal.size)}
    y = np.r_[np.zeros(normal.size), np.ones(abnormal.size)]
    s = np.r_[normal, abnormal]
    return {"auroc": float(roc_auc_score(y, s)), "auprc": float(average_precision_score(y, s)),
            "n_normal": int(normal.size), "n_abnormal": int(abnormal.size)}


def roc(normal: np.ndarray, abnormal: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.r_[np.zeros(normal.size), np.ones(abnormal.size)]
    fpr, tpr, _ = roc_curve(y, np.r_[normal, abnormal])
    return fpr, tpr
