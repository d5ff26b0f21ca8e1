"""Checkpoints describe themselves: hyper-parameters, preprocessing and the data split travel with the weights, so
evaluation, export and the prior rebuild everything from the checkpoint alone."""

from __future__ import annotations

import os
from pathlib import Path

import torch


def save_checkpoint(ckpt: dict, path: Path) -> None:
    """Write atomically: a crash mid-write must not destroy the previous last.ckpt."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(ckpt, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Load `path`, or `<path>/last.ckpt` when given a run folder. Exits with a message when it is not a checkpoint."""
    p = Path(path)
    if p.is_dir():
        p = p / "last.ckpt"
    if not p.is_file():
        raise SystemExit(f"error: checkpoint {p} does not exist")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated or foreign file
        raise SystemExit(f"error: {p} is not a readable checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(ckpt, dict) or "model_config" not in ckpt or "model" not in ckpt:
        raise SystemExit(f"error: {p} is not a VQ-VAE checkpoint of this project")
    ckpt["path"] = str(p)
    return ckpt
