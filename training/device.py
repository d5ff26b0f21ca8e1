"""Device choice shared by the training CLIs."""

from __future__ import annotations

import sys

import torch


def pick_device(requested: str) -> torch.device:
    """`gpu`/`cuda` fall back to the CPU with a message when CUDA is not available."""
    if requested in ("gpu", "cuda"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        print(f"--device {requested}: CUDA is not available here; running on the CPU", file=sys.stderr)
    return torch.device("cpu")
