"""Training-side throughput: data loader, train step and exported scorer, at several image sizes.

    .venv/bin/python bench/bench_training.py [--sizes 128 256] [--data_root DATA] [--device cpu|cuda]

Prints one table (img/s). Without --data_root a phantom set is generated in a temporary folder. Model = the
training CLI's defaults (n_hiddens 128, 4 residual layers, embedding_dim 64, 64 codes) unless overridden.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from octcore.preprocess import Preprocessing
from training.data import Augment, OCTImages, list_images, resolve_data_root
from training.model import VQVAE, VQVAEConfig
from training.phantom import generate
from training.scorer import Scorer


def timed(fn, n_items: int, min_seconds: float) -> float:
    """Items per second of `fn` (which processes n_items), repeated for at least min_seconds after one warm-up."""
    fn()
    sync()
    done, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < min_seconds or done == 0:
        fn()
        done += n_items
    sync()
    return done / (time.perf_counter() - t0)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def bench_loader(files: list[Path], size: int, workers: int, batch: int, cache: Path | None) -> float:
    ds = OCTImages(files, Preprocessing(size=size), Augment(), cache_dir=cache)
    loader = DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers, persistent_workers=workers > 0)

    def epoch() -> None:
        for _ in loader:
            pass

    return timed(epoch, len(ds), 2.0)


def bench_train_step(cfg: VQVAEConfig, size: int, batch: int, device: torch.device, amp: bool) -> float:
    model = VQVAE(cfg).to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    x = torch.randn(batch, 1, size, size, device=device)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            out = model(x)
            loss = torch.nn.functional.mse_loss(out["x_hat"].float(), x) + out["vq_loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return timed(step, batch, 3.0)


@torch.no_grad()
def bench_scorer(cfg: VQVAEConfig, size: int, batch: int, device: torch.device) -> float:
    model = VQVAE(cfg)
    model.train()(torch.randn(2, 1, size, size))  # initialise the codebook as training does
    scorer = torch.jit.script(Scorer(model.eval()).eval()).to(device)
    x = torch.randn(batch, 1, size, size, device=device)
    return timed(lambda: scorer(x), batch, 2.0)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[128, 256])
    p.add_argument("--data_root", default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--train_batch", type=int, default=32)
    p.add_argument("--scorer_batches", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--n_hiddens", type=int, default=128)
    p.add_argument("--n_residual_layers", type=int, default=4)
    args = p.parse_args()
    device = torch.device(args.device)
    cfg = VQVAEConfig(n_hiddens=args.n_hiddens, n_residual_layers=args.n_residual_layers)
    print(f"device {device} | torch {torch.__version__} | threads {torch.get_num_threads()} | model {cfg}")

    with tempfile.TemporaryDirectory() as tmp:
        if args.data_root:
            root = resolve_data_root(args.data_root)
        else:
            generate(Path(tmp) / "data", train_normal=128, test_per_class=1, seed=0, train_abnormal=0)
            root = resolve_data_root(Path(tmp) / "data")
        files = list_images(root, "train", "NORMAL")[:256]
        rows: list[tuple[str, int, str, float]] = []
        for size in args.sizes:
            for w in args.workers:
                rows.append(("data loader (decode+preprocess+augment)", size, f"workers {w}",
                             bench_loader(files, size, w, 32, None)))
            rows.append(("data loader, preprocessed cache", size, "workers 0",
                         bench_loader(files, size, 0, 32, Path(tmp) / "cache")))
            amp = device.type == "cuda"
            rows.append(("train step (fwd+bwd+adam)", size, f"batch {args.train_batch}{' bf16' if amp else ''}",
                         bench_train_step(cfg, size, args.train_batch, device, amp)))
            for b in args.scorer_batches:
                rows.append(("TorchScript scorer", size, f"batch {b}", bench_scorer(cfg, size, b, device)))
    print("\n| what | size | setting | img/s |\n|---|---|---|---|")
    for what, size, setting, ips in rows:
        print(f"| {what} | {size}² | {setting} | {ips:,.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
