"""The few torch.distributed helpers the training CLIs need under torchrun; each is a no-op in a plain run.

    torchrun --nproc_per_node N -m training.train ...   # one process per GPU (or CPU process with gloo)

torchrun sets WORLD_SIZE/RANK/LOCAL_RANK and the rendezvous address; `init_from_env` reads them. Without them (a plain
`python -m training.train`) nothing is initialised and every helper returns its input, so a plain run is unchanged.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist

from training.errors import TrainingError


def init_from_env(device: torch.device) -> torch.device:
    """Join the process group torchrun describes; returns this rank's device (cuda:LOCAL_RANK on GPUs).
    NCCL for CUDA tensors, gloo for CPU ones (and the CPU tests)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


@contextmanager
def session(device: torch.device) -> Iterator[torch.device]:
    """`init_from_env` for the duration of a run; the process group is torn down however the run ends (after every
    rank got there, when it ends normally)."""
    finished = False
    try:
        yield init_from_env(device)
        finished = True
    finally:
        shutdown(wait_for_all=finished)


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Only rank 0 writes files, prints progress and logs to W&B."""
    return rank() == 0


def rank_batch(global_batch: int) -> int:
    """This rank's share of `--batch_size`, which stays the global batch: N ranks take the same optimiser steps
    (same learning rate, same number of steps per epoch) as one process."""
    if global_batch % world_size():
        raise TrainingError(f"--batch_size {global_batch} (the global batch) must divide by the {world_size()} ranks")
    return global_batch // world_size()


def log(msg: str) -> None:
    """Progress lines from rank 0 only: N ranks would print each line N times."""
    if is_main():
        print(msg, flush=True)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in place (and returned)."""
    if active():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast(t: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Rank `src`'s values everywhere, in place (and returned)."""
    if active():
        dist.broadcast(t, src)
    return t


def broadcast_flag(flag: bool, device: torch.device) -> bool:
    """Rank 0's decision (e.g. early stopping), taken once and followed by every rank."""
    return bool(broadcast(torch.tensor([int(flag)], device=device)).item())


def barrier() -> None:
    if active():
        dist.barrier()


def shutdown(wait_for_all: bool = False) -> None:
    if dist.is_available() and dist.is_initialized():
        if wait_for_all and active():
            # DDP wrappers sit in reference cycles: collected at interpreter exit, after the group is gone, their
            # reducers' pending gloo work aborted a rank now and then ("terminate called without an active
            # exception"). Collect them while the group is alive, then let every rank leave together (rank 0 alone
            # writes the run's last files). Not after an error: a failed rank must not wait for peers.
            gc.collect()
            dist.barrier()
        dist.destroy_process_group()
