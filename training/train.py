"""Train the VQ-VAE on NORMAL B-scans.

    python -m training.train --data_root DATA --epochs 50 --batch_size 32
    torchrun --nproc_per_node N -m training.train ...   # N processes (GPUs); --batch_size stays the global batch

Straight line: arguments → data → model → loop (train, validate, checkpoint, log) → latent codes for the prior.
Each run writes `<output_dir>/<YYYY-MM-DD_HH-MM-SS>/`; `--resume <run dir or last.ckpt>` continues it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import yaml
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from octcore.preprocess import Preprocessing
from training import distributed as dist
from training.checkpoint import load_checkpoint, save_checkpoint, write_history
from training.data import (
    DEFAULT_WORKERS,
    Augment,
    DataError,
    OCTImages,
    eval_loader,
    list_images,
    resolve_data_root,
    split_train_val,
    train_loader,
    with_retina,
)
from training.device import pick_device
from training.errors import TrainingError, run_main
from training.model import VQVAE, VQVAEConfig
from training.plots import plot_loss_curves
from training.provenance import command_line


def str2bool(v: str) -> bool:
    if v.lower() in ("1", "true", "yes", "y", "on"):
        return True
    if v.lower() in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {v!r}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.train", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # The original research code's arguments, same names.
    p.add_argument("--batch_size", type=int, default=32, help="global batch: split evenly across torchrun ranks")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--n_hiddens", type=int, default=128)
    p.add_argument("--n_residual_hiddens", type=int, default=64)
    p.add_argument("--n_residual_layers", type=int, default=4)
    p.add_argument("--embedding_dim", type=int, default=64)
    p.add_argument("--n_embeddings", type=int, default=64)
    p.add_argument("--beta", type=float, default=0.25, help="weight of the commitment loss")
    p.add_argument("--learning_rate", type=float, default=1e-3)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--ema_decay", type=float, default=0.95, help="EMA codebook updates; 0 = gradient codebook loss")
    p.add_argument("--dead_code_steps", type=int, default=5, help="restart a code idle for this many steps")
    p.add_argument("--patience", type=int, default=10, help="early stopping: epochs without val improvement")
    p.add_argument("--min_delta", type=float, default=1e-4, help="early stopping: smallest improvement that counts")
    p.add_argument("--device", choices=["gpu", "cuda", "cpu"], default="gpu")
    p.add_argument("--save", type=str2bool, default=True, help="write checkpoints and the run folder")
    # Additions.
    p.add_argument("--data_root", default=None, help="folder holding OCT2017/ (default: $OCT_DATA_ROOT)")
    p.add_argument("--image_size", type=int, default=256)
    p.add_argument("--input_region", choices=["scan", "retina"], default="scan",
                   help="the model's input: the whole B-scan, or the band around its retina, flattened to the RPE "
                   "(octcore/preprocess.py)")
    p.add_argument("--band_above", type=int, default=Preprocessing.band_above,
                   help="--input_region retina: scan rows above the line under the RPE")
    p.add_argument("--band_below", type=int, default=Preprocessing.band_below, help="and under it")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num_workers", type=int, default=DEFAULT_WORKERS, help="image-loading processes")
    p.add_argument("--amp", action="store_true", help="mixed precision (bfloat16) on CUDA")
    p.add_argument("--output_dir", default="saved_models")
    p.add_argument("--resume", default=None, help="run folder or last.ckpt to continue")
    p.add_argument("--val_fraction", type=float, default=0.1)
    p.add_argument("--no_augment", action="store_true", help="switch train-time augmentation off")
    p.add_argument("--cache_dir", default=None, help="cache preprocessed images here (one-time cost)")
    p.add_argument("--wandb", action="store_true", help="log to Weights & Biases (WANDB_MODE=offline works)")
    p.add_argument("--wandb_project", default="oct-vqvae")
    return p


def validate_args(args: argparse.Namespace) -> None:
    checks = [
        (args.batch_size > 0, "--batch_size must be positive"),
        (args.epochs > 0, "--epochs must be positive"),
        (args.image_size >= 16 and args.image_size % 4 == 0, "--image_size must be a multiple of 4, at least 16"),
        (args.n_hiddens >= 2 and args.n_hiddens % 2 == 0, "--n_hiddens must be even"),
        (min(args.n_residual_hiddens, args.embedding_dim, args.n_embeddings) > 0, "sizes must be positive"),
        (args.n_residual_layers >= 0, "--n_residual_layers must be >= 0"),
        (0 <= args.dropout < 1, "--dropout must be in [0, 1)"),
        (0 <= args.ema_decay < 1, "--ema_decay must be in [0, 1)"),
        (0 <= args.val_fraction < 1, "--val_fraction must be in [0, 1)"),
        (args.learning_rate > 0 and args.beta >= 0, "--learning_rate must be > 0 and --beta >= 0"),
    ]
    for ok, msg in checks:
        if not ok:
            raise TrainingError(msg)


def new_run_dir(output_dir: Path) -> Path:
    stamp = dt.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    run = output_dir / stamp
    n = 1
    while run.exists():  # two runs started in the same second
        run = output_dir / f"{stamp}-{n}"
        n += 1
    run.mkdir(parents=True)
    return run


def run_epoch(model: VQVAE | DistributedDataParallel, loader: DataLoader, device: torch.device,
              opt: torch.optim.Optimizer | None, amp: bool, desc: str) -> dict[str, float]:
    """One pass; trains when `opt` is given. Returns mean losses, perplexity and throughput (over all ranks)."""
    train = opt is not None
    model.train(train)
    sums = {"loss": 0.0, "recon": 0.0, "vq": 0.0, "perplexity": 0.0}
    n_codes = (model.module if isinstance(model, DistributedDataParallel) else model).cfg.n_embeddings
    used = torch.zeros(n_codes, dtype=torch.bool, device=device)
    n, t0 = 0, time.perf_counter()
    bar = tqdm(loader, desc=desc, leave=False, disable=None if dist.is_main() else True, dynamic_ncols=True,
               file=sys.stderr)
    for x in bar:
        x = x.to(device, non_blocking=True)
        with torch.set_grad_enabled(train), torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            out = model(x)
            recon = torch.nn.functional.mse_loss(out["x_hat"].float(), x)
            loss = recon + out["vq_loss"]
        if train:
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        b = x.shape[0]
        n += b
        for k, v in (("loss", loss), ("recon", recon), ("vq", out["vq_loss"]), ("perplexity", out["perplexity"])):
            sums[k] += float(v.detach()) * b
        used[out["codes"].unique()] = True
        bar.set_postfix(loss=f"{sums['loss'] / n:.4f}", ppl=f"{sums['perplexity'] / n:.1f}")
    seconds = time.perf_counter() - t0
    if dist.active():  # every rank ends the epoch with the same numbers (and the same early-stopping input)
        total = dist.all_reduce_sum(torch.tensor([*sums.values(), n], dtype=torch.float64, device=device))
        sums, n = dict(zip(sums, total[:-1].tolist(), strict=True)), int(total[-1])
        used = dist.all_reduce_sum(used.int()) > 0
    stats = {k: v / max(n, 1) for k, v in sums.items()}
    stats.update(codebook_usage=float(used.float().mean()), img_per_s=n / max(seconds, 1e-9), seconds=seconds)
    return stats


@torch.no_grad()
def save_latents(model: VQVAE, splits: dict[str, list[Path]], cfg: Preprocessing, run_dir: Path, batch_size: int,
                 num_workers: int, device: torch.device, data_root: Path) -> None:
    """The code grid of every training image: what the autoregressive prior learns from."""
    model.eval()
    out = run_dir / "latent"
    out.mkdir(exist_ok=True)
    for split, files in splits.items():
        loader = DataLoader(OCTImages(files, cfg), batch_size=batch_size, num_workers=num_workers)
        codes = [model.encode_codes(x.to(device)).cpu().to(torch.int16) for x in tqdm(
            loader, desc=f"latent {split}", leave=False, disable=None, file=sys.stderr)]
        np.save(out / f"{split}_codes.npy", torch.cat(codes).numpy() if codes else np.zeros((0, 0, 0), np.int16))
        (out / f"{split}_files.txt").write_text("".join(f"{f.relative_to(data_root)}\n" for f in files))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.commands = [command_line("training.train", argv)]  # recorded in the checkpoint (and export's manifest)

    def run() -> None:
        validate_args(args)
        torch.manual_seed(args.seed)
        with dist.session(pick_device(args.device)) as device:
            train(args, device)

    return run_main(run)


def train(args: argparse.Namespace, device: torch.device) -> VQVAE:
    """The whole run; returns the model as the last epoch left it (identical on every rank)."""
    amp = args.amp and device.type == "cuda"
    world, main_rank = dist.world_size(), dist.is_main()
    rank_batch = dist.rank_batch(args.batch_size)

    resume = load_checkpoint(args.resume) if args.resume else None
    if resume is not None:  # the run's own settings win over the command line, except the epoch budget
        saved = resume["train_config"]
        args.commands = saved.get("commands", []) + args.commands
        for k in ("data_root", "image_size", "seed", "val_fraction", "n_hiddens", "n_residual_hiddens",
                  "n_residual_layers", "embedding_dim", "n_embeddings", "beta", "dropout", "ema_decay",
                  "dead_code_steps"):
            setattr(args, k, saved[k])
        prep_saved = Preprocessing.from_dict(resume["preprocessing"])
        args.input_region, args.band_above, args.band_below = (prep_saved.region, prep_saved.band_above,
                                                               prep_saved.band_below)

    # Data: NORMAL training B-scans only; a seeded, patient-wise validation split.
    oct_root = resolve_data_root(args.data_root)
    files = list_images(oct_root, "train", "NORMAL")
    if len(files) < 2:
        raise DataError(f"{oct_root}/train/NORMAL holds {len(files)} images; at least 2 are needed")
    prep = Preprocessing(size=args.image_size, region=args.input_region, band_above=args.band_above,
                         band_below=args.band_below)
    files, refused = with_retina(files, prep)
    if refused:
        dist.log(f"data: no retina found in {len(refused)} of {len(files) + len(refused)} NORMAL images (not "
                 f"trained on), e.g. {refused[0].name}")
    if len(files) < 2:
        raise DataError(f"a retina was found in {len(files)} of the NORMAL images; at least 2 are needed")
    train_files, val_files = split_train_val(files, args.val_fraction, args.seed)
    cache = Path(args.cache_dir) if args.cache_dir else None
    augment = None if args.no_augment else Augment()
    train_ds = OCTImages(train_files, prep, augment, cache, seed=args.seed)
    val_ds = OCTImages(val_files or train_files[:1], prep, None, cache)
    pin = device.type == "cuda"
    train_batches = train_loader(train_ds, rank_batch, args.num_workers, args.seed, pin)
    val_batches = eval_loader(val_ds, rank_batch, args.num_workers, pin)
    dist.log(f"data: {oct_root} | train {len(train_files)} | val {len(val_files)} NORMAL images | "
             f"device {device}{' (bf16 amp)' if amp else ''}"
             f"{f' | {world} ranks × batch {rank_batch}' if world > 1 else ''}")

    model_cfg = VQVAEConfig(n_hiddens=args.n_hiddens, n_residual_hiddens=args.n_residual_hiddens,
                            n_residual_layers=args.n_residual_layers, embedding_dim=args.embedding_dim,
                            n_embeddings=args.n_embeddings, beta=args.beta, dropout=args.dropout,
                            ema_decay=args.ema_decay, dead_code_steps=args.dead_code_steps)
    model = VQVAE(model_cfg).to(device)
    if world > 1:
        torch.manual_seed(args.seed + dist.rank())  # own dropout masks per rank; weights come from rank 0 below
    opt = torch.optim.Adam(model.parameters(), lr=args.learning_rate)
    state = {"epoch": 0, "best_val": math.inf, "best_epoch": -1, "bad_epochs": 0, "history": []}
    if resume is not None:
        model.load_state_dict(resume["model"])
        opt.load_state_dict(resume["optimizer"])
        state.update(resume["state"])
        run_dir = Path(resume["run_dir_path"])
        dist.log(f"resuming {run_dir} after epoch {state['epoch']}")
    elif args.save:
        run_dir = new_run_dir(Path(args.output_dir)) if main_rank else None
    else:
        run_dir = None
    if not main_rank:
        run_dir = None  # only rank 0 writes the run folder, checkpoints, latent/, plots and W&B
    # DDP syncs rank 0's weights and buffers once here, then averages gradients; the EMA codebook keeps itself in
    # step across ranks (training/model.py), so buffers need no broadcast on every forward.
    with warnings.catch_warnings():  # its successor, forward_sync_buffers, needs a newer torch than we require
        warnings.simplefilter("ignore", FutureWarning)
        net = DistributedDataParallel(model, broadcast_buffers=False) if world > 1 else model

    config = {"train_config": vars(args) | {"data_root": str(oct_root)}, "model_config": model_cfg.to_dict(),
              "preprocessing": prep.to_dict()}
    if run_dir is not None:
        (run_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    wandb_run = start_wandb(args, config, run_dir) if main_rank else None

    def checkpoint() -> dict:
        return {**config, "model": model.state_dict(), "optimizer": opt.state_dict(), "state": state,
                "run_dir_path": str(run_dir), "train_files": [str(f.relative_to(oct_root)) for f in train_files],
                "val_files": [str(f.relative_to(oct_root)) for f in val_files]}

    stopped_early = False
    for epoch in range(state["epoch"] + 1, args.epochs + 1):
        train_batches.sampler.set_epoch(epoch)
        tr = run_epoch(net, train_batches, device, opt, amp, f"epoch {epoch}/{args.epochs} train")
        va = run_epoch(model, val_batches, device, None, amp, f"epoch {epoch}/{args.epochs} val")
        improved = dist.broadcast_flag(va["loss"] < state["best_val"] - args.min_delta, device)
        row = {"epoch": epoch, **{f"train_{k}": v for k, v in tr.items()}, **{f"val_{k}": v for k, v in va.items()}}
        state["history"].append(row)
        state["epoch"] = epoch
        state["bad_epochs"] = 0 if improved else state["bad_epochs"] + 1
        dist.log(f"epoch {epoch:3d} | train {tr['loss']:.5f} (recon {tr['recon']:.5f}, vq {tr['vq']:.5f}) | "
                 f"val {va['loss']:.5f} | perplexity {tr['perplexity']:.1f} | codes used {tr['codebook_usage']:.0%} | "
                 f"{tr['img_per_s']:.0f} img/s{' *' if improved else ''}")
        if wandb_run is not None:
            wandb_run.log(row, step=epoch)
        if improved:
            state["best_val"], state["best_epoch"] = va["loss"], epoch
        if run_dir is not None:
            if improved:
                for old in run_dir.glob("best-*.ckpt"):
                    old.unlink()
                save_checkpoint(checkpoint(), run_dir / f"best-epoch={epoch:02d}-val_loss={va['loss']:.4f}.ckpt")
            save_checkpoint(checkpoint(), run_dir / "last.ckpt")  # an interruption loses at most this epoch
            write_metrics(run_dir, state["history"])
        if dist.broadcast_flag(state["bad_epochs"] >= args.patience, device):  # decided once, by rank 0
            dist.log(f"early stop: no val improvement > {args.min_delta} for {args.patience} epochs")
            stopped_early = True
            break

    if run_dir is not None:
        best = VQVAE.from_checkpoint(load_checkpoint(next(run_dir.glob("best-*.ckpt")))).to(device)
        save_latents(best, {"train": train_files, "val": val_files}, prep, run_dir, args.batch_size,
                     args.num_workers, device, oct_root)
        summary = {"best_epoch": state["best_epoch"], "best_val_loss": state["best_val"],
                   "epochs_run": state["epoch"], "stopped_early": stopped_early, "run_dir": str(run_dir)}
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        dist.log(f"best epoch {state['best_epoch']} val_loss {state['best_val']:.5f} → {run_dir}")
    if wandb_run is not None:
        wandb_run.finish()
    return model


def write_metrics(run_dir: Path, history: list[dict]) -> None:
    write_history(run_dir / "metrics.csv", history)
    plot_loss_curves(history, run_dir / "loss_curve.png")


def start_wandb(args: argparse.Namespace, config: dict, run_dir: Path | None):  # -> wandb Run | None
    if not args.wandb:
        return None
    try:
        import wandb
    except ImportError:
        print("warning: --wandb given but wandb is not installed (pip install 'oct-anomaly[wandb]'); not logging",
              file=sys.stderr)
        return None
    return wandb.init(project=args.wandb_project, config=config, dir=str(run_dir) if run_dir else None,
                      name=run_dir.name if run_dir else None)


if __name__ == "__main__":
    sys.exit(main())
