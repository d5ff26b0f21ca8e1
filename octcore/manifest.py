"""The model_store contract: `<store>/<name>/<version>/{model.pt, manifest.json}`.

This is the only place that knows the manifest's shape and how a scorer is loaded, so training (which writes it)
and the service (which reads it) cannot drift apart. The scorer is TorchScript today; `load_scorer` is the one
function to extend when another format (e.g. torch.export / ONNX) joins.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import json
import math
import warnings
from pathlib import Path
from statistics import NormalDist
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from octcore.preprocess import Preprocessing

MANIFEST_FILE = "manifest.json"
MODEL_FILE = "model.pt"
# 2: a typed, strict `preprocessing`; calibration `tail` (fitted threshold, frame-count-aware volume threshold).
# 3: preprocessing `region` (the whole scan, or the retina band) and the band's rows; a format-2 manifest reads as
# region `scan` (`Preprocessing.from_dict`).
# A reader refuses a manifest newer than itself: it could not know what the newer fields ask it to do.
FORMAT_VERSION = 3


class ModelStoreError(Exception):
    """The store, manifest or weights are missing, corrupt or do not match. `str()` is a one-line reason."""


class InputSpec(BaseModel):
    size: int = Field(gt=0)
    channels: int = 1
    dtype: str = "float32"
    layout: str = "NCHW"


class ScoreSpec(BaseModel):
    description: str
    # The scorer output holding this score's spatial evidence (None for a score that summarises others).
    map: str | None = None
    higher_is_anomalous: bool = True


class TailFit(BaseModel):
    """A parametric fit of the normal scores: `normal` on the score, or `lognormal` (normal on its log) for a score
    that is positive on every normal image. A few dozen normal scans pin a mean and a spread far better than the
    95th percentile among them, and the fit gives the threshold of a volume of any number of B-scans."""

    model_config = ConfigDict(extra="forbid")

    family: Literal["normal", "lognormal"]
    mu: float
    sigma: float = Field(gt=0)

    def quantile(self, q: float) -> float:
        z = self.mu + self.sigma * NormalDist().inv_cdf(q)
        return math.exp(z) if self.family == "lognormal" else z


class Calibration(BaseModel):
    """Distribution of one score on NORMAL validation images and the decision threshold drawn from it.

    With a `tail` (format 2), `threshold` is the fit's quantile at `threshold_percentile` / 100: the B-scan
    specificity aimed at. A volume of n B-scans is scored by `volume_statistic`: the highest mean over
    `volume_window` adjacent B-scans (a lesion spans neighbouring B-scans, a normal scan's odd frame stands alone),
    and is anomalous when that passes `volume_threshold(n)`, the statistic's quantile at `volume_percentile` (by
    default `threshold_percentile`) for n independent B-scans drawn from the fit: a normal volume of any length is
    flagged at the same rate whatever its length. Without a tail (format 1), a volume uses `threshold` on its most
    anomalous B-scan."""

    model_config = ConfigDict(extra="forbid")

    n: int
    mean: float
    std: float
    percentiles: list[float] = Field(description="Score at percentiles 0, 1, …, 100 of the normal images")
    threshold_percentile: float
    threshold: float
    # Heatmap PNG value v in 0..255 stands for map value v / 255 * map_scale (map_scale: a high normal percentile).
    map_scale: float | None = None
    tail: TailFit | None = None
    volume_window: int = Field(default=1, ge=1)
    # The volume decision's own percentile (None: threshold_percentile). A B-scan threshold may sit low for
    # sensitivity while a volume, read as a whole, keeps a low false-alarm rate.
    volume_percentile: float | None = Field(default=None, gt=0, lt=100)

    def percentile_of(self, score: float) -> float:
        """Where `score` falls among the normal images, 0–100 (linear between the stored percentiles)."""
        p = self.percentiles
        if score <= p[0]:
            return 0.0
        if score >= p[-1]:
            return 100.0
        i = bisect.bisect_right(p, score)
        lo, hi = p[i - 1], p[i]
        frac = 0.0 if hi <= lo else (score - lo) / (hi - lo)
        return float(min(100.0, (i - 1) + frac))

    def volume_threshold(self, n_frames: int, higher_is_anomalous: bool = True) -> float:
        """The threshold on `volume_statistic` of `n_frames` B-scans' scores. One frame: `threshold`."""
        if self.tail is None or n_frames <= 1:
            return self.threshold
        q = (self.volume_percentile or self.threshold_percentile) / 100.0
        window = min(self.volume_window, n_frames)
        if window == 1:  # the maximum (minimum) of n: a closed form
            return self.tail.quantile(q ** (1.0 / n_frames) if higher_is_anomalous
                                      else 1.0 - (1.0 - q) ** (1.0 / n_frames))
        return _window_quantile(self.tail.family, self.tail.mu, self.tail.sigma, q, n_frames, window,
                                higher_is_anomalous)


def volume_statistic(scores: list[float], window: int, higher_is_anomalous: bool = True) -> tuple[float, int]:
    """The highest (lowest) mean of `window` adjacent B-scans' scores, and the first B-scan of that run. Fewer
    B-scans than `window`: the mean of them all."""
    x = np.asarray(scores, dtype=np.float64)
    w = max(1, min(window, x.size))
    means = np.convolve(x, np.ones(w) / w, mode="valid")
    i = int(np.argmax(means) if higher_is_anomalous else np.argmin(means))
    return float(means[i]), i


@functools.lru_cache(maxsize=256)
def _window_quantile(family: str, mu: float, sigma: float, q: float, n: int, window: int, higher: bool) -> float:
    """Quantile q of the volume statistic of n independent B-scans from the fitted tail, by simulation (seeded, so
    the same manifest always gives the same threshold; 20,000 volumes put q = 0.95 within ±0.002 of the truth)."""
    z = np.random.default_rng(0).standard_normal((20_000, n)) * sigma + mu
    x = np.exp(z) if family == "lognormal" else z
    c = np.cumsum(np.pad(x, ((0, 0), (1, 0))), axis=1)
    means = (c[:, window:] - c[:, :-window]) / window
    stat = means.max(axis=1) if higher else means.min(axis=1)
    # Higher: P(stat <= t) = q. Lower (q is then a low percentile): P(stat < t) = q.
    return float(np.quantile(stat, q))


class Manifest(BaseModel):
    # Strict: a field this code does not know is something a newer exporter expects the reader to honour.
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    format: Literal["torchscript"] = "torchscript"
    format_version: int = FORMAT_VERSION
    name: str
    version: int
    file: str = MODEL_FILE
    sha256: str
    torch_version: str
    created: str
    input: InputSpec
    preprocessing: Preprocessing
    maps: list[str]
    scores: dict[str, ScoreSpec]
    primary_score: str
    # The score whose heatmap is shown first (the service's viewer, the PACS overlay); it must have a map. Export
    # writes `default_overlay`; manifests written before the field lack it and get the same rule (`overlay`).
    overlay_score: str | None = None
    calibration: dict[str, Calibration]
    training: dict[str, Any] = Field(default_factory=dict)
    evaluation: dict[str, Any] = Field(default_factory=dict)

    def overlay(self) -> str | None:
        return self.overlay_score if self.overlay_score is not None else default_overlay(self.primary_score,
                                                                                          self.scores)

    @field_validator("preprocessing", mode="before")
    @classmethod
    def _exact_preprocessing(cls, v: Any) -> Any:
        # Every field and nothing else (Preprocessing.from_dict raises naming them): a missing field would take this
        # code's default, an unknown one is a step this code would skip. pydantic then checks the fields' types.
        if isinstance(v, dict):
            Preprocessing.from_dict(v)
        return v

    def preprocessing_config(self) -> Preprocessing:
        return self.preprocessing

    def check_consistent(self) -> None:
        if self.primary_score not in self.scores:
            raise ModelStoreError(f"primary_score {self.primary_score!r} is not one of {sorted(self.scores)}")
        if self.overlay_score is not None and (self.overlay_score not in self.scores
                                               or not self.scores[self.overlay_score].map):
            raise ModelStoreError(f"overlay_score {self.overlay_score!r} is not a score with a map")
        missing = sorted(set(self.scores) - set(self.calibration))
        if missing:
            raise ModelStoreError(f"no calibration for scores {missing}")
        if self.preprocessing.size != self.input.size:
            raise ModelStoreError("preprocessing.size differs from input.size")


def default_overlay(primary: str, scores: dict[str, ScoreSpec], preferred: list[str] | tuple[str, ...] = ()) -> (
        str | None):
    """The score whose heatmap is shown first: the primary's own map; for a primary without one, the first of
    `preferred` that has a map (the exporting scorer's declared overlay: its best localiser); else the first score
    with a map. None without maps. A manifest written before `overlay_score` existed gets the same rule without
    `preferred`."""
    mapped = [k for k, s in scores.items() if s.map]
    if primary in mapped:
        return primary
    for k in preferred:
        if k in mapped:
            return k
    return mapped[0] if mapped else None


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def list_versions(store: Path, name: str) -> list[int]:
    d = Path(store) / name
    if not d.is_dir():
        return []
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit() and (p / MANIFEST_FILE).is_file())


def resolve_version_dir(store: Path, name: str, version: int | None = None) -> Path:
    """`<store>/<name>/<version>`; the highest version holding a manifest when `version` is None."""
    if version is None:
        versions = list_versions(store, name)
        if not versions:
            raise ModelStoreError(f"no versions of model {name!r} under {store}")
        version = versions[-1]
    d = Path(store) / name / str(version)
    if not (d / MANIFEST_FILE).is_file():
        raise ModelStoreError(f"{d / MANIFEST_FILE} does not exist")
    return d


def read_manifest(version_dir: Path) -> Manifest:
    path = Path(version_dir) / MANIFEST_FILE
    try:
        raw = json.loads(path.read_bytes())
    except FileNotFoundError as e:
        raise ModelStoreError(f"{path} does not exist") from e
    except ValueError as e:
        raise ModelStoreError(f"{path} is not a valid manifest: not JSON ({e})") from e
    # Checked before the fields: a newer format fails on fields this reader does not know, and the reason to give
    # is the version, not the first unknown field.
    version = raw.get("format_version", FORMAT_VERSION) if isinstance(raw, dict) else FORMAT_VERSION
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ModelStoreError(f"{path}: format_version {version!r} is newer than this software reads "
                              f"({FORMAT_VERSION}); upgrade the service to serve this model")
    try:
        manifest = Manifest.model_validate(raw)
    except ValueError as e:
        first = str(e).splitlines()
        raise ModelStoreError(f"{path} is not a valid manifest: {' '.join(first[:3])}") from e
    manifest.check_consistent()
    return manifest


def write_manifest(version_dir: Path, manifest: Manifest) -> Path:
    path = Path(version_dir) / MANIFEST_FILE
    path.write_text(json.dumps(manifest.model_dump(mode="json"), indent=2) + "\n")
    return path


def verify_weights(version_dir: Path, manifest: Manifest) -> Path:
    weights = Path(version_dir) / manifest.file
    if not weights.is_file():
        raise ModelStoreError(f"{weights} does not exist")
    digest = sha256_file(weights)
    if digest != manifest.sha256:
        raise ModelStoreError(f"sha256 of {weights} is {digest[:12]}…, manifest says {manifest.sha256[:12]}…")
    return weights


def load_scorer(version_dir: Path, device: str = "cpu") -> tuple[Manifest, Any]:
    """Read and verify a model version, then load its scorer onto `device`. Raises ModelStoreError with a reason.

    The scorer maps a preprocessed batch (B, 1, S, S) float32 to a dict of tensors: the maps named in
    `manifest.maps` (each (B, 1, S, S)) and one (B,) tensor per score in `manifest.scores`.
    """
    import torch  # imported here so manifest handling stays usable without torch (e.g. static checks)

    manifest = read_manifest(version_dir)
    weights = verify_weights(version_dir, manifest)
    if manifest.format != "torchscript":
        raise ModelStoreError(f"unsupported scorer format {manifest.format!r}")
    try:
        with warnings.catch_warnings():  # TorchScript is deprecated upstream; it is still the artifact we ship
            warnings.simplefilter("ignore", FutureWarning)
            module = torch.jit.load(str(weights), map_location=device)
    except Exception as e:  # any failure to deserialise is a corrupt or incompatible artifact
        raise ModelStoreError(f"cannot load {weights}: {type(e).__name__}: {str(e).splitlines()[0]}") from e
    module.eval()
    return manifest, module
