"""Started under torchrun by test_distributed.py: `python -m training.train` as a user runs it, plus one file per
rank holding the codebook that rank ended with (only rank 0 writes the run, so the other ranks' state is otherwise
invisible).

    python -m torch.distributed.run --nproc_per_node 2 tests/training/ddp_probe.py OUT_DIR <training.train args>
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from training import distributed as dist
from training import train as cli


def main() -> int:
    out, argv = Path(sys.argv[1]), sys.argv[2:]
    run = cli.train

    def train_and_keep_codebook(args: argparse.Namespace, device: torch.device) -> torch.nn.Module:
        model = run(args, device)
        torch.save(model.quantizer.codebook.state_dict(), out / f"codebook-rank{dist.rank()}.pt")
        return model

    cli.train = train_and_keep_codebook
    return cli.main(argv)


if __name__ == "__main__":
    sys.exit(main())
