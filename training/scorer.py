"""The module that gets exported: preprocessed batch → anomaly maps and per-image scores.

This is the scorer contract of `octcore.manifest.load_scorer`: input (B, 1, S, S) float32 in the preprocessing's
range; output a dict of maps (B, 1, S, S) and scores (B,). The same class runs eagerly in evaluation and scripted in
the service, so what was evaluated is what is served. A run with a latent prior exports `PriorScorer`, which wraps
the same `Scorer` and adds the prior's outputs; a run without one exports `Scorer` unchanged.
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from training.model import VQVAE
from training.prior import GatedPixelCNN

MAPS = ["reconstruction", "residual_map", "alm_map"]
SCORE_DESCRIPTIONS = {
    "residual": "mean of the top {top:.1%} pixels of |x - x_hat| (model input units)",
    "alm": "mean of the top {top:.1%} latent positions of the alignment loss map mean_c (z_e - z_q)^2",
}
SCORE_MAPS = {"residual": "residual_map", "alm": "alm_map"}

# With a prior. `combined` has no map of its own: it summarises the others.
PRIOR_MAPS = ["nll_map"]
PRIOR_SCORE_DESCRIPTIONS = {
    "nll": "mean of the top {nll_top:.1%} latent positions of the prior's map -log p(code | codes before it in "
           "raster order) (nats); nll_map is that per-position NLL, bilinearly upsampled to the image",
    "combined": "mean over {of} of (score - normal mean) / normal std, the normal statistics being those of the "
                "calibration images (computed inside the scorer)",
}
PRIOR_SCORE_MAPS = {"nll": "nll_map"}
COMBINED_OF = ["residual", "alm", "nll"]
RESTORE_MAPS = ["restoration", "restored_residual_map"]
RESTORE_SCORE_DESCRIPTIONS = {
    "restored_residual": "mean of the top {top:.1%} pixels of |x - x_r| averaged over {n} restorations x_r: the "
                         "codes whose NLL exceeds {thr:.3g} nats (at most {max_pos} per image, the highest) are "
                         "redrawn from the prior in raster order and decoded",
}
RESTORE_SCORE_MAPS = {"restored_residual": "restored_residual_map"}


def top_fraction_mean(m: Tensor, fraction: float) -> Tensor:
    """(B, ...) → (B,): mean of each image's largest values. Lesions are small, so a whole-image mean would let
    healthy tissue dilute them; the top fraction keeps the score sensitive to focal change."""
    flat = m.flatten(1)
    k = max(1, int(fraction * flat.shape[1]))
    return flat.topk(k, dim=1).values.mean(1)


def zscore_mean(scores: list[Tensor], mean: Tensor, std: Tensor) -> Tensor:
    """K scores (B,) → (B,): the mean of their z-scores against normal statistics mean, std (K,). Scores on
    different scales (pixel residuals, squared feature distances, nats) become comparable, so none dominates."""
    return ((torch.stack(scores, 1) - mean) / std).mean(1)


class Scorer(nn.Module):
    def __init__(self, model: VQVAE, top_fraction: float = 0.01) -> None:
        super().__init__()
        model = model.eval()
        self.encoder = model.encoder
        self.quantizer = model.quantizer
        self.decoder = model.decoder
        self.top_fraction = top_fraction

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        if x.dim() != 4 or x.shape[1] != 1:
            raise ValueError("expected a (B, 1, S, S) batch")
        z_e = self.encoder(x).float()
        z_q, codes = self.quantizer.quantize(z_e)
        x_hat = self.decoder(z_q.to(x.dtype))
        residual_map = (x - x_hat).abs()
        alm = (z_e - z_q).pow(2).mean(1, keepdim=True)  # (B, 1, S/4, S/4): how far the encoder is from any code
        alm_map = F.interpolate(alm, size=[x.shape[-2], x.shape[-1]], mode="bilinear", align_corners=False)
        return {
            "reconstruction": x_hat,
            "residual_map": residual_map,
            "alm_map": alm_map,
            "codes": codes,
            "residual": top_fraction_mean(residual_map, self.top_fraction),
            "alm": top_fraction_mean(alm, self.top_fraction),
        }


class PriorScorer(nn.Module):
    """`Scorer` plus the latent prior: `nll_map` / `nll` from one prior pass over the code grid, `combined`, and,
    when `restore_samples` > 0, a restoration (high-NLL codes redrawn from the prior, decoded) and its residual."""

    def __init__(self, base: Scorer, prior: GatedPixelCNN, position_threshold: float, nll_top_fraction: float = 0.05,
                 restore_samples: int = 0, restore_max_positions: int = 64) -> None:
        super().__init__()
        self.base = base
        self.prior = prior.eval()
        self.top_fraction = base.top_fraction
        self.nll_top_fraction = nll_top_fraction
        self.position_threshold = position_threshold
        self.restore_samples = restore_samples
        self.restore_max_positions = restore_max_positions
        self.combined_of = list(COMBINED_OF)
        # Normal statistics of the combined scores; export and evaluation fit them on the calibration images.
        self.register_buffer("normal_mean", torch.zeros(len(COMBINED_OF)))
        self.register_buffer("normal_std", torch.ones(len(COMBINED_OF)))

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        out = self.base(x)
        size = [x.shape[-2], x.shape[-1]]
        codes = out["codes"]
        nll = self.prior.nll(codes).unsqueeze(1)  # (B, 1, S/4, S/4) nats
        out["nll_map"] = F.interpolate(nll, size=size, mode="bilinear", align_corners=False)
        out["nll"] = top_fraction_mean(nll, self.nll_top_fraction)
        out["combined"] = zscore_mean([out[k] for k in self.combined_of], self.normal_mean, self.normal_std)
        if self.restore_samples > 0:
            restored = self.restore(codes, nll[:, 0])  # (B, n, 1, S, S)
            residual = (x.unsqueeze(1) - restored).abs().mean(1)  # (B, 1, S, S)
            out["restoration"] = restored.mean(1)
            out["restored_residual_map"] = residual
            out["restored_residual"] = top_fraction_mean(residual, self.top_fraction)
        return out

    def restore(self, codes: Tensor, nll: Tensor) -> Tensor:
        """codes, nll (B, h, w) → `restore_samples` decoded restorations per image (B, n, 1, S, S)."""
        b, h, w = codes.shape
        n = self.restore_samples
        flagged = nll > self.position_threshold
        k = min(self.restore_max_positions, h * w)
        if k < h * w:  # the cost is one prior pass per flagged position: keep each image's k most unlikely
            kth = nll.flatten(1).topk(k, dim=1).values[:, -1]
            flagged = flagged & (nll >= kth.view(b, 1, 1))
        new = self.prior.resample(codes.repeat_interleave(n, 0), flagged.repeat_interleave(n, 0))  # (B·n, h, w)
        z_q = self.base.quantizer.codebook.embedding.float()[new].permute(0, 3, 1, 2)  # (B·n, D, h, w)
        x_r = self.base.decoder(z_q)  # (B·n, 1, S, S)
        return x_r.view(b, n, x_r.shape[1], x_r.shape[2], x_r.shape[3])
