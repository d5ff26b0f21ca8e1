"""Reading the Kermany OCT2017 layout: `<root>/OCT2017/{train,test}/{NORMAL,CNV,DME,DRUSEN}/*.jpeg`.

Images go through `octcore.preprocess.preprocess` — the same function the service uses — then, for training only,
a light augmentation. Paths come from `--data_root` or the `OCT_DATA_ROOT` environment variable, never from code.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler, Sampler

from octcore.preprocess import NoRetinaError, Preprocessing, preprocess
from training import distributed as dist
from training.errors import TrainingError

CLASSES = ("NORMAL", "CNV", "DME", "DRUSEN")
IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png"}
DATA_ROOT_ENV = "OCT_DATA_ROOT"
# Image-loading processes by default: the CPUs this process may run on (PyTorch warns past that), at most 8, past
# which decoding outruns any single GPU this model trains on.
DEFAULT_WORKERS = min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


class DataError(TrainingError):
    """The dataset folder is missing or does not have the expected layout."""


def resolve_data_root(data_root: str | os.PathLike | None) -> Path:
    """Find the OCT2017 folder from `--data_root` (or $OCT_DATA_ROOT): the folder itself or one holding it.

    Kaggle's copy of the dataset unpacks to `OCT2017 ` with a trailing space; both spellings are accepted.
    """
    raw = data_root or os.environ.get(DATA_ROOT_ENV)
    if not raw:
        raise DataError(f"no dataset given: pass --data_root or set {DATA_ROOT_ENV}")
    root = Path(raw).expanduser()
    for cand in (root, root / "OCT2017", root / "OCT2017 "):
        if (cand / "train").is_dir() or (cand / "test").is_dir():
            return cand
    raise DataError(f"{root} holds no OCT2017/{{train,test}} folders")


def list_images(oct_root: Path, split: str, cls: str) -> list[Path]:
    folder = oct_root / split / cls
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))


def split_train_val(files: list[Path], val_fraction: float, seed: int) -> tuple[list[Path], list[Path]]:
    """Seeded split by patient (`patient_of`), so one patient's scans never straddle it."""
    patients = sorted({patient_of(p) for p in files})
    random.Random(seed).shuffle(patients)
    n_val = max(1, math.ceil(len(patients) * val_fraction)) if val_fraction > 0 and len(patients) > 1 else 0
    val_patients = set(patients[:n_val])
    return ([p for p in files if patient_of(p) not in val_patients],
            [p for p in files if patient_of(p) in val_patients])


# Copies named `normal_train_NNNN` (the "Retinal OCT C8" compilation of Kermany's NORMAL class) lost their patient
# ids, but their numbers follow Kermany's sorted names, so one patient's B-scans sit next to each other: a block of
# this many numbers stands in for a patient (a real patient shared by two blocks sits at their edge).
NUMBERED = re.compile(r"^normal_train_(\d+)$")
NUMBERED_BLOCK = 25


def patient_of(path: Path) -> str:
    """The patient a scan belongs to: the `<CLASS>-<patient>-<n>` name's id, or the block of a numbered copy's
    number (`NUMBERED_BLOCK`); a name of neither kind is its own patient."""
    numbered = NUMBERED.match(path.stem)
    if numbered:
        return f"block-{int(numbered.group(1)) // NUMBERED_BLOCK}"
    parts = path.stem.split("-")
    return parts[1] if len(parts) >= 3 else path.stem


def with_retina(files: list[Path], cfg: Preprocessing) -> tuple[list[Path], list[Path]]:
    """The files whose preprocessing succeeds, and those of region `retina` in which no retina is found: a model is
    neither trained nor calibrated on a scan the service would refuse, and evaluation counts refusals apart. Region
    `scan` refuses nothing (and costs nothing here)."""
    if cfg.region != "retina":
        return list(files), []
    kept, refused = [], []
    for f in files:
        try:
            load_image(f, cfg)
        except NoRetinaError:
            refused.append(f)
        else:
            kept.append(f)
    return kept, refused


def load_image(path: Path, cfg: Preprocessing) -> np.ndarray:
    with Image.open(path) as im:
        return preprocess(im, cfg)


@dataclass(frozen=True)
class Augment:
    """Train-only augmentation on the preprocessed tensor. Small on purpose: normal anatomy must stay normal."""

    flip_p: float = 0.5
    max_rotation_deg: float = 5.0
    blur_p: float = 0.2
    contrast: float = 0.1

    def __call__(self, x: Tensor, gen: torch.Generator) -> Tensor:
        def u() -> float:
            return float(torch.rand((), generator=gen))

        if u() < self.flip_p:  # left/right eyes are mirror images of each other
            x = x.flip(-1)
        if self.max_rotation_deg > 0:
            x = _rotate(x, (2 * u() - 1) * math.radians(self.max_rotation_deg))
        if u() < self.blur_p:
            k = torch.tensor([1.0, 2.0, 1.0]) / 4.0
            x = F.conv2d(F.pad(x[None], (1, 1, 1, 1), mode="replicate"), (k[:, None] * k[None, :])[None, None])[0]
        if self.contrast > 0:
            c = 1 + (2 * u() - 1) * self.contrast
            m = x.mean()
            x = (x - m) * c + m
        return x


def _rotate(x: Tensor, angle: float) -> Tensor:
    cos, sin = math.cos(angle), math.sin(angle)
    theta = torch.tensor([[cos, -sin, 0.0], [sin, cos, 0.0]], dtype=x.dtype)[None]
    grid = F.affine_grid(theta, [1, *x.shape], align_corners=False)
    return F.grid_sample(x[None], grid, mode="bilinear", padding_mode="border", align_corners=False)[0]


class OCTImages(Dataset):
    """Files → preprocessed (1, S, S) tensors. With `cache_dir`, preprocessing runs once and later epochs (and later
    runs with the same files and preprocessing) read a float16 memory map instead of decoding JPEGs."""

    def __init__(self, files: list[Path], cfg: Preprocessing, augment: Augment | None = None,
                 cache_dir: Path | None = None, seed: int = 0) -> None:
        self.files = list(files)
        self.cfg = cfg
        self.augment = augment
        self.seed = seed
        self.epoch = 0
        self._cache = _build_cache(self.files, cfg, Path(cache_dir)) if cache_dir else None

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, key: int | tuple[int, int]) -> Tensor:
        """`key` is an index, or (epoch, index) from `EpochSampler`: worker processes hold their own copy of the
        dataset, so an epoch set on the main process's copy never reaches them; one carried by the index does."""
        epoch, i = key if isinstance(key, tuple) else (self.epoch, key)
        if self._cache is not None:
            x = torch.from_numpy(np.asarray(self._cache[i], dtype=np.float32))
        else:
            x = torch.from_numpy(load_image(self.files[i], self.cfg))
        x = x[None]
        if self.augment is not None:
            # Seeded per (seed, epoch, index): reproducible however the workers interleave.
            gen = torch.Generator().manual_seed(hash((self.seed, epoch, i)) & 0x7FFFFFFF)
            x = self.augment(x, gen)
        return x


def _build_cache(files: list[Path], cfg: Preprocessing, cache_dir: Path) -> np.ndarray:
    key = hashlib.sha256(json.dumps([cfg.to_dict(), [str(f) for f in files]]).encode()).hexdigest()[:16]
    path = cache_dir / f"images-{key}-{cfg.size}.f16.npy"
    if not path.exists():
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npy")
        arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(len(files), cfg.size, cfg.size))
        for i, f in enumerate(files):
            arr[i] = load_image(f, cfg)
        arr.flush()
        del arr
        tmp.rename(path)  # only a complete cache is ever visible
    return np.load(path, mmap_mode="r")


class EpochSampler(Sampler[tuple[int, int]]):
    """Yields (epoch, index) pairs from an index sampler, so each worker's augmentation knows the epoch. `set_epoch`
    also reaches the inner sampler (DistributedSampler reshuffles with it)."""

    def __init__(self, inner: Sampler[int]) -> None:
        self.inner = inner
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if hasattr(self.inner, "set_epoch"):
            self.inner.set_epoch(epoch)

    def __iter__(self):  # -> Iterator[tuple[int, int]]
        epoch = self.epoch
        return ((epoch, i) for i in self.inner)

    def __len__(self) -> int:
        return len(self.inner)  # type: ignore[arg-type]


def train_loader(ds: OCTImages, batch_size: int, num_workers: int, seed: int, pin_memory: bool = False) -> DataLoader:
    """Shuffled training batches; call `loader.sampler.set_epoch(epoch)` before each epoch. Under torchrun each rank
    reads its own shard (DistributedSampler) and `batch_size` is the per-rank batch."""
    gen = torch.Generator().manual_seed(seed)
    inner: Sampler[int] = (DistributedSampler(ds, shuffle=True, seed=seed) if dist.active()
                           else RandomSampler(ds, generator=gen))
    sampler = EpochSampler(inner)
    return DataLoader(ds, batch_size=batch_size, sampler=sampler, drop_last=len(sampler) > batch_size,
                      generator=gen, num_workers=num_workers, pin_memory=pin_memory,
                      persistent_workers=num_workers > 0)


def eval_loader(ds: OCTImages, batch_size: int, num_workers: int, pin_memory: bool = False) -> DataLoader:
    """Validation batches in file order; under torchrun each rank reads its own shard (the last shard is padded
    with repeats to equal length, which the sums over ranks count once more — a few images at most)."""
    sampler = DistributedSampler(ds, shuffle=False) if dist.active() else None
    return DataLoader(ds, batch_size=batch_size, sampler=sampler, num_workers=num_workers, pin_memory=pin_memory,
                      persistent_workers=num_workers > 0)
