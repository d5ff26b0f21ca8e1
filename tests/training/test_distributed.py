"""torchrun on the CPU (gloo): a 2-rank run of the real CLIs on a tiny phantom, against a 1-process run with the same
global batch. The 2-rank run is started twice (1 epoch, then `--resume` to 2) so resuming is covered too."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, run_cli
from training.checkpoint import load_checkpoint

PROBE = Path(__file__).with_name("ddp_probe.py")
ARGS = ["--image_size", "64", "--batch_size", "8", "--n_hiddens", "16", "--n_residual_hiddens", "8",
        "--n_residual_layers", "1", "--embedding_dim", "8", "--n_embeddings", "16", "--device", "cpu",
        "--num_workers", "0", "--seed", "0"]
# 2 ranks see the same images in other batches (DistributedSampler's shuffle is not RandomSampler's) with other
# dropout masks, so the losses are close, not equal. Measured: at most 1.2 % apart; 5 % still catches a run whose
# ranks train apart (per-rank batches, a codebook per rank) or a wrong global batch.
LOSS_RTOL = 0.05


def torchrun(script: list[str], *args: str, timeout: float = 300) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           *script, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(f"torchrun {' '.join(script)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n"
                    f"{proc.stderr[-3000:]}")
    return proc.stdout


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("ddp")
    data = base / "data"
    run_cli("training.phantom", str(data), "--train-normal", "24", "--test-per-class", "2", "--seed", "3")
    run_cli("training.train", "--data_root", str(data), "--output_dir", str(base / "single"), "--epochs", "2", *ARGS)
    probe = [str(PROBE), str(base)]
    torchrun(probe, "--data_root", str(data), "--output_dir", str(base / "ddp"), "--epochs", "1", *ARGS)
    (run,) = (base / "ddp").iterdir()
    out = torchrun(probe, "--resume", str(run), "--epochs", "2", "--device", "cpu", "--num_workers", "0",
                   "--batch_size", "8")
    assert "resuming" in out and out.count("resuming") == 1  # rank 0 alone speaks
    return {"base": base, "single": next((base / "single").iterdir()), "ddp": run}


def history(run: Path) -> list[dict[str, float]]:
    with open(run / "metrics.csv") as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def test_one_run_folder_written_by_rank_zero(runs: dict[str, Path]) -> None:
    assert [p.name for p in (runs["base"] / "ddp").iterdir()] == [runs["ddp"].name]
    assert len(list(runs["ddp"].glob("best-*.ckpt"))) == 1
    assert (runs["ddp"] / "latent" / "train_codes.npy").is_file()
    assert [row["epoch"] for row in history(runs["ddp"])] == [1.0, 2.0]


def test_ranks_keep_one_codebook(runs: dict[str, Path]) -> None:
    """EMA counts and sums are summed over ranks and restarts come from rank 0, so the codebooks never drift."""
    rank0, rank1 = (torch.load(runs["base"] / f"codebook-rank{r}.pt") for r in (0, 1))
    last = load_checkpoint(runs["ddp"] / "last.ckpt")["model"]
    for k, v in rank0.items():
        assert torch.equal(v, rank1[k]), k
        assert torch.equal(v, last[f"quantizer.codebook.{k}"]), k


def test_loss_follows_a_single_process_run(runs: dict[str, Path]) -> None:
    for ddp, single in zip(history(runs["ddp"]), history(runs["single"]), strict=True):
        for k in ("train_loss", "val_loss"):
            assert ddp[k] == pytest.approx(single[k], rel=LOSS_RTOL), (k, ddp["epoch"])


def test_checkpoint_loads_and_exports_like_a_single_process_one(runs: dict[str, Path]) -> None:
    """Same state-dict keys and shapes (no DDP `module.` prefix); the prior trains under torchrun too; export takes
    both."""
    ddp, single = (load_checkpoint(next(runs[k].glob("best-*.ckpt")))["model"] for k in ("ddp", "single"))
    assert {k: v.shape for k, v in ddp.items()} == {k: v.shape for k, v in single.items()}
    ckpt = next(runs["ddp"].glob("best-*.ckpt"))
    torchrun(["-m", "training.train_prior"], "--model_dir", str(ckpt), "--epochs", "2", "--batch_size", "8",
             "--n_layers", "2", "--n_channels", "16", "--device", "cpu")
    assert len(list((runs["ddp"] / "prior").glob("best-*.ckpt"))) == 1
    store = runs["base"] / "store"
    run_cli("training.export", "--model_dir", str(ckpt), "--model_store", str(store), "--name", "ddp",
            "--version", "1")
    assert (store / "ddp" / "1" / "manifest.json").is_file()
    assert "nll" in (store / "ddp" / "1" / "manifest.json").read_text()
