"""Latent-prior benchmark: scripted scorer img/s without the prior, with it, and with prior restoration; prints a
table, asserts nothing.

    python bench/bench_prior.py --model_dir saved_models/<run>/best-*.ckpt --batch_sizes 1,8,32

The run needs a prior (`python -m training.train_prior --model_dir …`). Without --model_dir a phantom run is built
through the project's CLIs at --image_size with a prior of --n_layers × --n_channels (trained briefly: speed does
not depend on how well it is trained, but restoration's cost does depend on how many codes it flags, so the inputs
are real phantom test scans, and the table says how many codes were redrawn per image).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from octcore.preprocess import Preprocessing  # noqa: E402
from training.checkpoint import load_checkpoint  # noqa: E402
from training.data import CLASSES, list_images, load_image, resolve_data_root  # noqa: E402
from training.evaluate import score_files  # noqa: E402
from training.export import build_scorer, calibration_files, fit_combined, resolve_checkpoint  # noqa: E402
from training.scorer import COMBINED_TERM, PriorScorer, with_role  # noqa: E402

TINY_VQVAE = ["--n_hiddens", "32", "--n_residual_hiddens", "16", "--n_residual_layers", "2", "--embedding_dim", "16",
              "--n_embeddings", "32"]


def build_phantom_run(work: Path, image_size: int, n_layers: int, n_channels: int) -> Path:
    def cli(*args: str) -> None:
        print("+ python -m", " ".join(args), flush=True)
        subprocess.run([sys.executable, "-m", *args], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)

    cli("training.phantom", str(work / "data"), "--train-normal", "64", "--test-per-class", "8", "--seed", "1")
    cli("training.train", "--data_root", str(work / "data"), "--output_dir", str(work / "runs"), "--epochs", "3",
        "--batch_size", "8", "--device", "cpu", "--num_workers", "0", "--image_size", str(image_size), *TINY_VQVAE)
    ckpt = next((work / "runs").glob("*/best-*.ckpt"))
    cli("training.train_prior", "--model_dir", str(ckpt), "--epochs", "2", "--batch_size", "16", "--n_layers",
        str(n_layers), "--n_channels", str(n_channels), "--device", "cpu")
    return ckpt


def throughput(scorer: torch.nn.Module, x: torch.Tensor, seconds: float, device: torch.device) -> tuple[float, int]:
    """Images per second of `scorer` on batch `x` (after two warm-up calls: TorchScript optimises on the second)."""
    with torch.inference_mode():
        for _ in range(2):
            scorer(x)
        n, t0 = 0, time.perf_counter()
        while n == 0 or time.perf_counter() - t0 < seconds:
            scorer(x)
            n += 1
        if device.type == "cuda":
            torch.cuda.synchronize()
    return n * x.shape[0] / (time.perf_counter() - t0), n


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_dir", default=None, help="VQ-VAE checkpoint whose run has a prior (default: build one)")
    p.add_argument("--image_size", type=int, default=128, help="only when building the phantom run")
    p.add_argument("--n_layers", type=int, default=15, help="prior layers, only when building the phantom run")
    p.add_argument("--n_channels", type=int, default=64, help="prior channels, only when building the phantom run")
    p.add_argument("--batch_sizes", default="1,8,32")
    p.add_argument("--restore_samples", type=int, default=1)
    p.add_argument("--restore_max_positions", type=int, default=16)
    p.add_argument("--seconds", type=float, default=3.0, help="timed seconds per cell (at least one call)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]

    work = Path(tempfile.mkdtemp(prefix="bench-prior-"))
    ckpt_path = resolve_checkpoint(args.model_dir) if args.model_dir else build_phantom_run(
        work, args.image_size, args.n_layers, args.n_channels)
    ckpt = load_checkpoint(ckpt_path)
    prep = Preprocessing.from_dict(ckpt["preprocessing"])
    oct_root = resolve_data_root(ckpt["train_config"]["data_root"])
    scans = [f for c in CLASSES for f in list_images(oct_root, "test", c)[:8]]
    images = torch.from_numpy(np.stack([load_image(f, prep) for f in scans]))[:, None]

    variants = {
        "no prior": build_scorer(ckpt, 0.01, use_prior=False)[0],
        "prior": build_scorer(ckpt, 0.01)[0],
        f"prior + restoration ({args.restore_samples} sample, ≤{args.restore_max_positions} codes)": build_scorer(
            ckpt, 0.01, restore_samples=args.restore_samples, restore_max_positions=args.restore_max_positions)[0],
    }
    if not isinstance(variants["prior"], PriorScorer):
        raise SystemExit(f"error: {ckpt_path.parent} has no prior; run python -m training.train_prior first")
    prior_scorer = variants["prior"]
    normal = score_files(prior_scorer, calibration_files(ckpt, oct_root), prep, with_role(COMBINED_TERM), [])
    fit_combined([s for s in variants.values() if isinstance(s, PriorScorer)], normal)
    with torch.no_grad():  # how many codes restoration redraws on these scans (its cost is one prior pass each)
        nll = prior_scorer.prior.nll(prior_scorer.base(images)["codes"])
        flagged = (nll > prior_scorer.position_threshold).flatten(1).sum(1).clamp(max=args.restore_max_positions)

    pcfg = prior_scorer.prior.cfg
    print(f"\nimage {prep.size}² | code grid {prep.size // 4}² | prior {pcfg.n_layers} layers × {pcfg.n_channels} ch "
          f"({sum(q.numel() for q in prior_scorer.prior.parameters()) / 1e6:.2f} M params) | device {device} | "
          f"torch threads {torch.get_num_threads()} | restoration redraws {flagged.float().mean():.1f} codes/image "
          f"on average over {len(scans)} phantom test scans")
    head = f"{'scorer (TorchScript)':<48}" + "".join(f"{f'batch {b} img/s':>16}" for b in batch_sizes)
    print(head)
    print("-" * len(head))
    for name, scorer in variants.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            scripted = torch.jit.script(scorer.to(device).eval())
        cells = []
        for b in batch_sizes:
            x = images[torch.arange(b) % len(images)].to(device)
            rate, _ = throughput(scripted, x, args.seconds, device)
            cells.append(f"{rate:>16.1f}")
        print(f"{name:<48}" + "".join(cells), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
