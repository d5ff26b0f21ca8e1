"""Checkpoints describe themselves: hyper-parameters, preprocessing and the data split travel with the weights, so
evaluation, export and the prior rebuild everything from the checkpoint alone."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import torch

from training.errors import TrainingError


class CheckpointError(TrainingError):
    """A file is not a usable checkpoint of this project. `str()` is a one-line reason; the command-line entry
    points turn it into a message and a non-zero exit."""


def save_checkpoint(ckpt: dict, path: Path) -> None:
    """Write atomically: a crash mid-write must not destroy the previous last.ckpt."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(ckpt, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | os.PathLike, required: tuple[str, ...] = ("model_config", "model"),
                    kind: str = "VQ-VAE") -> dict:
    """Load `path`, or `<path>/last.ckpt` when given a run folder. Raises when it is not a checkpoint
    holding the `required` keys: CheckpointError otherwise."""
    p = Path(path)
    if p.is_dir():
        p = p / "last.ckpt"
    if not p.is_file():
        raise CheckpointError(f"checkpoint {p} does not exist")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated or foreign file
        raise CheckpointError(f"{p} is not a readable checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in required):
        raise CheckpointError(f"{p} is not a {kind} checkpoint of this project")
    ckpt["path"] = str(p)
    return ckpt


def write_history(path: Path, history: list[dict]) -> None:
    """Per-epoch metrics as CSV, rewritten whole each epoch so the file is always complete."""
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(history[0]))
        w.writeheader()
        w.writerows(history)
