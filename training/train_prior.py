"""Train the gated PixelCNN prior on a VQ-VAE run's latent codes.

    python -m training.train_prior --model_dir saved_models/<run>/best-*.ckpt --epochs 50
    torchrun --nproc_per_node N -m training.train_prior ...   # --batch_size stays the global batch

Straight line: arguments → the run's code grids (its own train/val split) → prior → loop (train, validate, checkpoint,
log) → per-position NLL calibration. Writes `<run>/prior/`: `best-epoch=NN-val_nll=X.ckpt`, `last.ckpt`,
`config.yaml`, `metrics.csv`; `training.export` and `training.inference` find it from the VQ-VAE checkpoint alone.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, TensorDataset
from tqdm import tqdm

from training import distributed as dist
from training.checkpoint import load_checkpoint, save_checkpoint, write_history
from training.device import pick_device
from training.errors import TrainingError, run_main
from training.export import resolve_checkpoint
from training.prior import PRIOR_DIR, GatedPixelCNN, PriorConfig, codebook_fingerprint
from training.provenance import command_line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.train_prior", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model_dir", required=True, help="VQ-VAE checkpoint (best-*.ckpt) or its run folder")
    p.add_argument("--epochs", type=int, default=50)
    # Small batches, a higher rate: the prior's data are a few hundred grids, so 32 per batch left it ~17 steps
    # an epoch; on the demo phantom batch 8 at 2e-3 reached a lower val NLL in 1 epoch than 32 at 1e-3 in 4.
    p.add_argument("--batch_size", type=int, default=8, help="global batch: split evenly across torchrun ranks")
    p.add_argument("--learning_rate", type=float, default=2e-3)
    p.add_argument("--n_layers", type=int, default=15)
    p.add_argument("--n_channels", type=int, default=64)
    p.add_argument("--kernel_size", type=int, default=3)
    p.add_argument("--patience", type=int, default=5, help="early stopping: epochs without val improvement")
    p.add_argument("--min_delta", type=float, default=1e-4, help="early stopping: smallest val NLL gain that counts")
    p.add_argument("--position_percentile", type=float, default=99.0,
                   help="per-position NLL threshold = this percentile of normal validation positions (restoration)")
    p.add_argument("--device", choices=["gpu", "cuda", "cpu"], default="gpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num_workers", type=int, default=0)
    return p


def validate_args(args: argparse.Namespace) -> None:
    checks = [
        (args.epochs > 0 and args.batch_size > 0, "--epochs and --batch_size must be positive"),
        (args.n_layers > 0 and args.n_channels > 0, "--n_layers and --n_channels must be positive"),
        (args.kernel_size >= 3 and args.kernel_size % 2 == 1, "--kernel_size must be odd and at least 3"),
        (args.learning_rate > 0, "--learning_rate must be positive"),
        (0 < args.position_percentile < 100, "--position_percentile must be in (0, 100)"),
        (args.num_workers >= 0, "--num_workers must be >= 0"),
    ]
    for ok, msg in checks:
        if not ok:
            raise TrainingError(msg)


def load_codes(run_dir: Path, split: str, n_embeddings: int) -> torch.Tensor:
    """`<run>/latent/<split>_codes.npy` (N, H, W) int16 → long tensor; TrainingError when absent or foreign."""
    path = run_dir / "latent" / f"{split}_codes.npy"
    if not path.is_file():
        raise TrainingError(f"{path} does not exist; training.train writes latent/ at the end of a run")
    codes = np.load(path)
    if codes.size and (codes.ndim != 3 or codes.min() < 0 or codes.max() >= n_embeddings):
        raise TrainingError(f"{path} does not hold (N, H, W) code grids in [0, {n_embeddings})")
    return torch.from_numpy(codes.astype(np.int64))


def run_epoch(prior: GatedPixelCNN | DistributedDataParallel, loader: DataLoader, device: torch.device,
              opt: torch.optim.Optimizer | None, desc: str) -> dict[str, float]:
    """One pass; trains when `opt` is given. Returns the mean NLL per position (nats) and throughput (all ranks)."""
    train = opt is not None
    prior.train(train)
    total, n_pos, n, t0 = 0.0, 0, 0, time.perf_counter()
    bar = tqdm(loader, desc=desc, leave=False, disable=None if dist.is_main() else True, dynamic_ncols=True,
               file=sys.stderr)
    for (codes,) in bar:
        codes = codes.to(device, non_blocking=True)
        with torch.set_grad_enabled(train):
            loss = F.cross_entropy(prior(codes), codes)
        if train:
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        total += float(loss.detach()) * codes.numel()
        n_pos += codes.numel()
        n += codes.shape[0]
        bar.set_postfix(nll=f"{total / n_pos:.4f}")
    seconds = time.perf_counter() - t0
    if dist.active():
        total, n_pos, n = dist.all_reduce_sum(torch.tensor([total, n_pos, n], dtype=torch.float64,
                                                           device=device)).tolist()
    return {"nll": total / max(n_pos, 1), "grids_per_s": n / max(seconds, 1e-9), "seconds": seconds}


@torch.no_grad()
def position_nlls(prior: GatedPixelCNN, codes: torch.Tensor, batch_size: int, device: torch.device) -> np.ndarray:
    prior.eval()
    parts = [prior.nll(codes[i:i + batch_size].to(device)).flatten().cpu() for i in range(0, len(codes), batch_size)]
    return torch.cat(parts).numpy()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.commands = [command_line("training.train_prior", argv)]  # recorded in the checkpoint (and the manifest)

    def run() -> None:
        validate_args(args)
        torch.manual_seed(args.seed)
        with dist.session(pick_device(args.device)) as device:
            train(args, device)

    return run_main(run)


def train(args: argparse.Namespace, device: torch.device) -> None:
    world, main_rank = dist.world_size(), dist.is_main()
    rank_batch = dist.rank_batch(args.batch_size)

    # Data: the code grids the run wrote for its own train/val split; the prior never sees another split.
    vq_path = resolve_checkpoint(args.model_dir)
    vq = load_checkpoint(vq_path)
    run_dir = vq_path.parent
    k = int(vq["model_config"]["n_embeddings"])
    train_codes, val_codes = load_codes(run_dir, "train", k), load_codes(run_dir, "val", k)
    if len(train_codes) == 0:
        raise TrainingError(f"{run_dir}/latent/train_codes.npy holds no code grids")
    if len(val_codes) == 0:  # a run without a validation split: early-stop on a few training grids, say so
        print("warning: the run has no validation codes; validating on the last training grids", file=sys.stderr)
        val_codes = train_codes[-max(1, len(train_codes) // 10):]
    train_set, val_set, gen = TensorDataset(train_codes), TensorDataset(val_codes), torch.Generator()
    sharded = dist.active()  # under torchrun each rank reads its own shard; set_epoch reshuffles it every epoch
    train_sampler = (DistributedSampler(train_set, shuffle=True, seed=args.seed) if sharded
                     else RandomSampler(train_set, generator=gen.manual_seed(args.seed)))
    train_loader = DataLoader(train_set, batch_size=rank_batch, sampler=train_sampler, num_workers=args.num_workers,
                              generator=gen)
    val_loader = DataLoader(val_set, batch_size=rank_batch, num_workers=args.num_workers,
                            sampler=DistributedSampler(val_set, shuffle=False) if sharded else None)
    dist.log(f"codes: {run_dir}/latent | train {tuple(train_codes.shape)} | val {tuple(val_codes.shape)} | "
             f"{k} codes | device {device}{f' | {world} ranks × batch {rank_batch}' if world > 1 else ''}")

    cfg = PriorConfig(n_embeddings=k, n_layers=args.n_layers, n_channels=args.n_channels,
                      kernel_size=args.kernel_size)
    prior = GatedPixelCNN(cfg).to(device)
    net = DistributedDataParallel(prior) if world > 1 else prior  # rank 0's weights, averaged gradients
    opt = torch.optim.Adam(prior.parameters(), lr=args.learning_rate)
    out_dir = run_dir / PRIOR_DIR
    config = {"train_config": vars(args) | {"model_dir": str(vq_path)}, "prior_config": cfg.to_dict(),
              "vqvae_checkpoint": str(vq_path), "codebook_sha256": codebook_fingerprint(vq)}
    if main_rank:  # only rank 0 writes
        out_dir.mkdir(exist_ok=True)
        (out_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    state = {"epoch": 0, "best_val": math.inf, "best_epoch": -1, "bad_epochs": 0, "history": []}

    def checkpoint() -> dict:
        return {**config, "model": prior.state_dict(), "optimizer": opt.state_dict(), "state": state}

    for epoch in range(1, args.epochs + 1):
        if sharded:
            train_sampler.set_epoch(epoch)
        tr = run_epoch(net, train_loader, device, opt, f"prior epoch {epoch}/{args.epochs} train")
        va = run_epoch(prior, val_loader, device, None, f"prior epoch {epoch}/{args.epochs} val")
        improved = dist.broadcast_flag(va["nll"] < state["best_val"] - args.min_delta, device)
        state["history"].append({"epoch": epoch, **{f"train_{k}": v for k, v in tr.items()},
                                 **{f"val_{k}": v for k, v in va.items()}})
        state["epoch"] = epoch
        state["bad_epochs"] = 0 if improved else state["bad_epochs"] + 1
        dist.log(f"epoch {epoch:3d} | train nll {tr['nll']:.4f} | val nll {va['nll']:.4f} nats/position "
                 f"({va['nll'] / math.log(2):.3f} bits) | {tr['grids_per_s']:.0f} grids/s{' *' if improved else ''}")
        if improved:
            state["best_val"], state["best_epoch"] = va["nll"], epoch
        if main_rank:
            if improved:
                for old in out_dir.glob("best-*.ckpt"):
                    old.unlink()
                save_checkpoint(checkpoint(), out_dir / f"best-epoch={epoch:02d}-val_nll={va['nll']:.4f}.ckpt")
            save_checkpoint(checkpoint(), out_dir / "last.ckpt")
            write_history(out_dir / "metrics.csv", state["history"])
        if dist.broadcast_flag(state["bad_epochs"] >= args.patience, device):  # decided once, by rank 0
            dist.log(f"early stop: no val NLL improvement > {args.min_delta} for {args.patience} epochs")
            break
    if not main_rank:
        return

    # Per-position NLL of normal validation codes under the best prior: the threshold restoration resamples above.
    best_path = next(out_dir.glob("best-*.ckpt"))
    best = torch.load(best_path, map_location="cpu", weights_only=False)
    prior.load_state_dict(best["model"])
    nlls = position_nlls(prior, val_codes, args.batch_size, device)
    best["position_nll"] = {"percentiles": [float(v) for v in np.percentile(nlls, np.arange(101))],
                            "threshold_percentile": args.position_percentile,
                            "threshold": float(np.percentile(nlls, args.position_percentile))}
    save_checkpoint(best, best_path)
    dist.log(f"best epoch {state['best_epoch']} val nll {state['best_val']:.4f} | position threshold "
             f"{best['position_nll']['threshold']:.3f} nats (p{args.position_percentile:g}) → {best_path}")


if __name__ == "__main__":
    sys.exit(main())
