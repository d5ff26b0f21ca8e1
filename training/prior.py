"""Gated PixelCNN prior over the VQ-VAE code grid: p(codes) = Π_i p(c_i | c_<i), positions in raster order.

Read top-down: the gated layer (vertical + horizontal stack), the network, its hyper-parameters, restoration, then
how a run folder holds a prior. Shapes: codes (B, H, W) long → embeddings (B, C, H, W) → logits (B, K, H, W), with
K = n_embeddings and H = W = S/4. One forward pass gives every position's conditional, which is why the prior can live
inside the exported scorer: the NLL of a whole grid costs one pass, not H·W.

Causality (van den Oord et al. 2016, "Conditional Image Generation with PixelCNN Decoders"): the vertical stack at
row i sees only code rows < i; the horizontal stack at (i, j) sees only positions before (i, j) in raster order. The
masks are built into the kernel shapes and padding — a k×k kernel whose rows below the centre are masked is a
(k//2+1)×k kernel padded only on top; one whose columns right of the centre are masked is a 1×(k//2+1) kernel padded
only on the left — so no weight has to be held at zero. The first layer's "mask A" (the current code is not visible)
is a one-step shift of the inputs: down one row for the vertical stack, right one column for the horizontal stack.
Two stacks instead of one masked k×k conv remove the PixelCNN's blind spot (positions up-right of the current one).
"""

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from training.checkpoint import CheckpointError, load_checkpoint

PRIOR_DIR = "prior"  # <run>/prior/: where training.train_prior writes and training.export looks


@dataclass
class PriorConfig:
    n_embeddings: int = 64  # the VQ-VAE's codebook size: one logit per code
    n_layers: int = 15
    n_channels: int = 64
    kernel_size: int = 3  # odd; each layer widens the receptive field by kernel_size // 2 rows and columns

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "PriorConfig":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


def gate(x: Tensor) -> Tensor:
    """(B, 2C, H, W) → (B, C, H, W): tanh(a) · σ(b), the gated activation of WaveNet / Gated PixelCNN."""
    a, b = x.chunk(2, dim=1)
    return torch.tanh(a) * torch.sigmoid(b)


class GatedLayer(nn.Module):
    """One gated layer. In: v, h (B, C, H, W) that already respect causality; out: the same, one layer deeper."""

    def __init__(self, channels: int, kernel_size: int) -> None:
        super().__init__()
        r = kernel_size // 2
        self.r = r
        self.v_conv = nn.Conv2d(channels, 2 * channels, (r + 1, kernel_size))  # rows i-r..i, columns j-r..j+r
        self.h_conv = nn.Conv2d(channels, 2 * channels, (1, r + 1))  # row i, columns j-r..j
        self.v_to_h = nn.Conv2d(2 * channels, 2 * channels, 1)
        self.h_out = nn.Conv2d(channels, channels, 1)

    def forward(self, v: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        r = self.r
        # v at rows ≤ i only ever saw code rows < i, so the vertical features at row i still see only rows < i...
        v_feat = self.v_conv(F.pad(v, [r, r, r, 0]))  # (B, 2C, H, W)
        # ...which is why the horizontal stack may take them at the same (i, j) without seeing the current code.
        h_feat = self.h_conv(F.pad(h, [r, 0, 0, 0])) + self.v_to_h(v_feat)  # (B, 2C, H, W)
        return gate(v_feat), h + self.h_out(gate(h_feat))  # residual on the horizontal stack only, as in the paper


class GatedPixelCNN(nn.Module):
    def __init__(self, cfg: PriorConfig) -> None:
        super().__init__()
        if cfg.kernel_size < 3 or cfg.kernel_size % 2 == 0:
            raise ValueError("kernel_size must be odd and at least 3")
        self.cfg = cfg
        c = cfg.n_channels
        self.embedding = nn.Embedding(cfg.n_embeddings, c)
        self.layers = nn.ModuleList([GatedLayer(c, cfg.kernel_size) for _ in range(cfg.n_layers)])
        self.head = nn.Sequential(nn.ReLU(), nn.Conv2d(c, c, 1), nn.ReLU(), nn.Conv2d(c, cfg.n_embeddings, 1))

    def forward(self, codes: Tensor) -> Tensor:
        """codes (B, H, W) long → logits (B, K, H, W); logits[:, :, i, j] = log p(c_ij | codes before (i, j))."""
        x = self.embedding(codes).permute(0, 3, 1, 2)  # (B, C, H, W)
        v = F.pad(x, [0, 0, 1, 0])[:, :, :-1]  # shifted down one row: row i holds code row i-1
        h = F.pad(x, [1, 0, 0, 0])[:, :, :, :-1]  # shifted right one column: (i, j) holds code (i, j-1)
        for layer in self.layers:
            v, h = layer(v, h)
        return self.head(h)

    @torch.jit.export
    def nll(self, codes: Tensor) -> Tensor:
        """codes (B, H, W) → −log p(c_ij | c_<ij) per position (B, H, W), in nats."""
        return F.cross_entropy(self.forward(codes), codes, reduction="none")

    @torch.jit.export
    def resample(self, codes: Tensor, where: Tensor) -> Tensor:
        """Restoration: redraw the codes flagged in `where` (B, H, W) bool, in raster order, each from the prior's
        conditional given the codes restored so far; other codes stay. One prior pass per flagged position (of the
        image with the most), so the cost grows with how many positions are flagged: cap them upstream."""
        b, hgt, wid = codes.shape
        n = hgt * wid
        flat = codes.reshape(b, n).clone()
        marked = where.reshape(b, n)
        # Each image's flagged positions first, ascending (= raster order); unflagged ones sort behind as n.
        order = torch.where(marked, torch.arange(n, device=codes.device).expand(b, n), n).sort(1).values
        steps = int(marked.sum(1).max()) if b > 0 else 0
        for t in range(steps):
            pos = order[:, t : t + 1]  # (B, 1)
            active = pos < n
            pos = pos.clamp(max=n - 1)
            logits = self.forward(flat.view(b, hgt, wid)).flatten(2)  # (B, K, n)
            at = logits.gather(2, pos.unsqueeze(1).expand(b, logits.shape[1], 1)).squeeze(2)  # (B, K)
            drawn = torch.multinomial(F.softmax(at.float(), dim=1), 1)  # (B, 1)
            flat.scatter_(1, pos, torch.where(active, drawn, flat.gather(1, pos)))
        return flat.view(b, hgt, wid)

    @classmethod
    def from_checkpoint(cls, ckpt: dict) -> "GatedPixelCNN":
        """A prior checkpoint carries its own hyper-parameters, like the VQ-VAE's."""
        model = cls(PriorConfig.from_dict(ckpt["prior_config"]))
        model.load_state_dict(ckpt["model"])
        return model.eval()


def codebook_fingerprint(vqvae_ckpt: dict) -> str:
    """Identifies the codebook a prior's codes came from: a prior is only meaningful for the VQ-VAE weights that
    produced its training codes (a resumed run with a new best checkpoint writes new codes)."""
    emb = vqvae_ckpt["model"]["quantizer.codebook.embedding"].detach().float().cpu().contiguous()
    return hashlib.sha256(emb.numpy().tobytes()).hexdigest()


def find_prior_checkpoint(vqvae_ckpt_path: Path) -> Path | None:
    """`<run>/prior/best-*.ckpt` beside a VQ-VAE checkpoint, or None when the run has no prior."""
    best = sorted((Path(vqvae_ckpt_path).parent / PRIOR_DIR).glob("best-*.ckpt"))
    return best[-1] if best else None


def load_prior_checkpoint(path: Path, vqvae_ckpt: dict) -> dict:
    """Load a prior checkpoint and check it belongs to `vqvae_ckpt`. CheckpointError otherwise."""
    ckpt = load_checkpoint(path, required=("prior_config", "model"), kind="prior")
    if "position_nll" not in ckpt:  # written when training.train_prior finishes
        raise CheckpointError(f"{path} is from an unfinished training.train_prior run; rerun it")
    if ckpt.get("codebook_sha256") != codebook_fingerprint(vqvae_ckpt):
        raise CheckpointError(f"the prior {path} was trained on the codes of another VQ-VAE checkpoint "
                         f"({ckpt.get('vqvae_checkpoint')}); rerun training.train_prior, or leave the prior out")
    ckpt["path"] = str(path)
    return ckpt
