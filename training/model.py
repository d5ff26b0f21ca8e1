"""VQ-VAE for OCT B-scans: encoder with residual blocks → vector quantizer → decoder, one channel in and out.

Read top-down: residual layer, quantizer, encoder/decoder, the composed model, its hyper-parameters.
Shapes: x (B, 1, S, S) → z_e (B, D, S/4, S/4) → codes (B, S/4, S/4) → x̂ (B, 1, S, S).
No `from __future__ import annotations` here: TorchScript resolves the signatures of `@torch.jit.unused` methods
from real annotation objects, not strings.
"""

from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from training import distributed as dist


@dataclass
class VQVAEConfig:
    in_channels: int = 1
    n_hiddens: int = 128
    n_residual_hiddens: int = 64
    n_residual_layers: int = 4
    embedding_dim: int = 64
    n_embeddings: int = 64
    beta: float = 0.25
    dropout: float = 0.1
    # A code unused for this many training steps is restarted from a live encoder vector (keeps the codebook alive).
    dead_code_steps: int = 5
    # EMA codebook updates (0 = the original gradient codebook loss).
    ema_decay: float = 0.95

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "VQVAEConfig":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


class ResidualLayer(nn.Module):
    """x + conv1x1(relu(conv3x3(relu(x)))). Each layer of a stack has its own weights."""

    def __init__(self, channels: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.block = nn.Sequential(
            nn.ReLU(),
            nn.Conv2d(channels, hidden, 3, padding=1, bias=False),
            nn.ReLU(),
            nn.Dropout2d(dropout),
            nn.Conv2d(hidden, channels, 1, bias=False),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.block(x)


class ResidualStack(nn.Module):
    def __init__(self, channels: int, hidden: int, n_layers: int, dropout: float) -> None:
        super().__init__()
        self.layers = nn.Sequential(*[ResidualLayer(channels, hidden, dropout) for _ in range(n_layers)])

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.layers(x))


class Codebook(nn.Module):
    """Codebook state only: embeddings, EMA statistics and per-code idle counters (buffers). Scriptable `lookup`."""

    def __init__(self, n_embeddings: int, embedding_dim: int, ema_decay: float) -> None:
        super().__init__()
        self.ema_decay = ema_decay
        init = torch.empty(n_embeddings, embedding_dim).uniform_(-1 / n_embeddings, 1 / n_embeddings)
        # With EMA the codes follow running means of their assigned vectors, not gradients.
        self.embedding = nn.Parameter(init, requires_grad=ema_decay == 0)
        self.register_buffer("ema_count", torch.ones(n_embeddings))
        self.register_buffer("ema_sum", init.clone())
        self.register_buffer("steps_since_used", torch.zeros(n_embeddings, dtype=torch.long))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    def lookup(self, flat: Tensor) -> tuple[Tensor, Tensor]:
        """flat (N, D) → nearest codes (N, D) and their indices (N,). Distances in float32: under AMP, half precision
        makes near-equal distances tie and the argmin flicker between codes, so training would pick other codes than
        the float32 scorer serves. `.float()` alone is not enough: autocast would run the matmul in bf16 anyway."""
        if not torch.jit.is_scripting():  # the served scorer runs in float32; TorchScript skips this branch
            with torch.autocast(flat.device.type, enabled=False):
                return self._lookup(flat)
        return self._lookup(flat)

    def _lookup(self, flat: Tensor) -> tuple[Tensor, Tensor]:
        flat = flat.float()
        emb = self.embedding.float()
        dist = flat.pow(2).sum(1, keepdim=True) - 2.0 * flat @ emb.t() + emb.pow(2).sum(1).unsqueeze(0)
        idx = dist.argmin(1)
        return emb.index_select(0, idx), idx

    @torch.jit.unused
    @torch.no_grad()
    def init_from(self, flat: Tensor) -> None:
        """Training only, once: start the codes at real encoder vectors. A random init far from the encoder's range
        leaves most codes unreachable and the codebook collapsing to a handful of codes in the first epochs."""
        pick = torch.randint(0, flat.shape[0], (self.embedding.shape[0],), device=flat.device)
        # Under torchrun every rank starts from rank 0's draw, so all ranks hold one codebook.
        self._set(torch.arange(self.embedding.shape[0], device=flat.device), dist.broadcast(flat[pick].contiguous()))
        self.initialized.fill_(True)

    @torch.jit.unused
    @torch.no_grad()
    def ema_update(self, flat: Tensor, idx: Tensor) -> None:
        """Training only: move each code to the running mean of the vectors assigned to it. Under torchrun the counts
        and sums are summed over ranks first: every rank then applies the same update to the same codebook."""
        k = self.embedding.shape[0]
        counts = dist.all_reduce_sum(torch.bincount(idx, minlength=k).float())
        sums = dist.all_reduce_sum(torch.zeros_like(self.ema_sum).index_add_(0, idx, flat.float()))
        self.ema_count.mul_(self.ema_decay).add_(counts, alpha=1 - self.ema_decay)
        self.ema_sum.mul_(self.ema_decay).add_(sums, alpha=1 - self.ema_decay)
        n = self.ema_count.sum()
        smoothed = (self.ema_count + 1e-5) / (n + k * 1e-5) * n  # Laplace smoothing: no division by zero
        self.embedding.data.copy_(self.ema_sum / smoothed.unsqueeze(1))

    @torch.jit.unused
    @torch.no_grad()
    def restart_dead_codes(self, flat: Tensor, idx: Tensor, patience: int) -> int:
        """Training only: codes idle for `patience` steps jump to random live vectors of this batch. Under torchrun
        "used" means used on any rank, and the new vectors are rank 0's draw, broadcast."""
        used = dist.all_reduce_sum(torch.bincount(idx, minlength=self.embedding.shape[0])) > 0
        self.steps_since_used.add_(1).masked_fill_(used, 0)
        dead = (self.steps_since_used >= patience).nonzero().flatten()
        if dead.numel() == 0 or flat.shape[0] == 0:
            return 0
        vectors = flat[torch.randint(0, flat.shape[0], (dead.numel(),), device=flat.device)].contiguous()
        self._set(dead, dist.broadcast(vectors))
        return int(dead.numel())

    @torch.jit.unused
    def _set(self, which: Tensor, vectors: Tensor) -> None:
        self.embedding.data[which] = vectors.float()
        self.ema_sum[which] = vectors.float()
        self.ema_count[which] = 1.0
        self.steps_since_used[which] = 0


class VectorQuantizer(nn.Module):
    """Maps each latent vector to its nearest code; straight-through gradients to the encoder.

    Loss = ‖sg[z_e] − e‖² (codebook) + β·‖z_e − sg[e]‖² (commitment): β weighs the commitment term because it is the
    encoder, not the codebook, that must be kept from drifting away from the codes (van den Oord 2017). With
    `ema_decay > 0` the codebook term is replaced by EMA updates of the codes (more stable on small data sets); with
    `ema_decay = 0` it is the original gradient codebook loss.
    """

    def __init__(self, n_embeddings: int, embedding_dim: int, beta: float, dead_code_steps: int,
                 ema_decay: float) -> None:
        super().__init__()
        self.codebook = Codebook(n_embeddings, embedding_dim, ema_decay)
        self.beta = beta
        self.dead_code_steps = dead_code_steps
        self.use_ema = ema_decay > 0

    def quantize(self, z_e: Tensor) -> tuple[Tensor, Tensor]:
        """z_e (B, D, H, W) → z_q (B, D, H, W) float32 and codes (B, H, W)."""
        b, d, h, w = z_e.shape
        flat = z_e.permute(0, 2, 3, 1).reshape(-1, d)
        z_q, idx = self.codebook.lookup(flat)
        return z_q.view(b, h, w, d).permute(0, 3, 1, 2).contiguous(), idx.view(b, h, w)

    def forward(self, z_e: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Returns (z_q with straight-through gradient, vq loss, codes (B, H, W), perplexity)."""
        z_e32 = z_e.float()
        if self.training and not bool(self.codebook.initialized):
            self._train_step(z_e32, None)
        z_q, codes = self.quantize(z_e32)
        loss = self.beta * F.mse_loss(z_e32, z_q.detach())
        if not self.use_ema:
            loss = loss + F.mse_loss(z_q, z_e32.detach())
        if self.training:
            self._train_step(z_e32, codes)
        z_st = z_e32 + (z_q - z_e32).detach()
        counts = torch.bincount(codes.flatten(), minlength=self.codebook.embedding.shape[0]).float()
        probs = counts / counts.sum()
        perplexity = torch.exp(-(probs * torch.log(probs + 1e-10)).sum())
        return z_st, loss, codes, perplexity

    @torch.jit.unused
    def _train_step(self, z_e: Tensor, codes: Optional[Tensor]) -> None:  # noqa: UP045 (TorchScript signature)
        """Codebook bookkeeping that only training does: first-batch init, EMA update, dead-code restarts."""
        flat = z_e.detach().permute(0, 2, 3, 1).reshape(-1, z_e.shape[1]).float()
        with torch.autocast(flat.device.type, enabled=False):  # codebook statistics accumulate in float32
            self._codebook_step(flat, codes)

    @torch.jit.unused
    def _codebook_step(self, flat: Tensor, codes: Optional[Tensor]) -> None:  # noqa: UP045 (TorchScript signature)
        if codes is None:
            self.codebook.init_from(flat)
            return
        idx = codes.flatten()
        if self.use_ema:
            self.codebook.ema_update(flat, idx)
        self.codebook.restart_dead_codes(flat, idx, self.dead_code_steps)


class Encoder(nn.Module):
    """Two stride-2 4×4 convs (S → S/4), a 3×3 conv, a residual stack, then 1×1 to the embedding dim."""

    def __init__(self, cfg: VQVAEConfig) -> None:
        super().__init__()
        h = cfg.n_hiddens
        self.net = nn.Sequential(
            nn.Conv2d(cfg.in_channels, h // 2, 4, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(h // 2, h, 4, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(h, h, 3, padding=1),
            ResidualStack(h, cfg.n_residual_hiddens, cfg.n_residual_layers, cfg.dropout),
        )
        self.to_embedding = nn.Conv2d(h, cfg.embedding_dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.to_embedding(self.net(x))


class Decoder(nn.Module):
    """Mirror of the encoder: 3×3 conv, residual stack, two stride-2 4×4 transposed convs (S/4 → S)."""

    def __init__(self, cfg: VQVAEConfig) -> None:
        super().__init__()
        h = cfg.n_hiddens
        self.net = nn.Sequential(
            nn.Conv2d(cfg.embedding_dim, h, 3, padding=1),
            ResidualStack(h, cfg.n_residual_hiddens, cfg.n_residual_layers, cfg.dropout),
            nn.ConvTranspose2d(h, h // 2, 4, stride=2, padding=1), nn.ReLU(),
            nn.ConvTranspose2d(h // 2, cfg.in_channels, 4, stride=2, padding=1),
        )

    def forward(self, z: Tensor) -> Tensor:
        return self.net(z)


class VQVAE(nn.Module):
    def __init__(self, cfg: VQVAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.quantizer = VectorQuantizer(cfg.n_embeddings, cfg.embedding_dim, cfg.beta, cfg.dead_code_steps,
                                         cfg.ema_decay)
        self.decoder = Decoder(cfg)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        z_e = self.encoder(x)
        z_q, vq_loss, codes, perplexity = self.quantizer(z_e)
        x_hat = self.decoder(z_q.to(z_e.dtype))
        return {"x_hat": x_hat, "vq_loss": vq_loss, "codes": codes, "perplexity": perplexity, "z_e": z_e}

    @torch.no_grad()
    def encode_codes(self, x: Tensor) -> Tensor:
        """Code-index grid (B, S/4, S/4) — the prior's training data."""
        return self.quantizer.quantize(self.encoder(x))[1]

    @classmethod
    def from_checkpoint(cls, ckpt: dict) -> "VQVAE":
        """A checkpoint carries its own hyper-parameters: nothing else is needed to rebuild the model."""
        model = cls(VQVAEConfig.from_dict(ckpt["model_config"]))
        model.load_state_dict(ckpt["model"])
        return model.eval()
