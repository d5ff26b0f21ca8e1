"""The module that gets exported: preprocessed batch → anomaly maps and per-image scores.

This is the scorer contract of `octcore.manifest.load_scorer`: input (B, 1, S, S) float32 in the preprocessing's
range; output a dict of maps (B, 1, S, S) and scores (B,). The same class runs eagerly in evaluation and scripted in
the service, so what was evaluated is what is served.
"""

import torch.nn.functional as F
from torch import Tensor, nn

from training.model import VQVAE

MAPS = ["reconstruction", "residual_map", "alm_map"]
SCORE_DESCRIPTIONS = {
    "residual": "mean of the top {top:.1%} pixels of |x - x_hat| (model input units)",
    "alm": "mean of the top {top:.1%} latent positions of the alignment loss map mean_c (z_e - z_q)^2",
}
SCORE_MAPS = {"residual": "residual_map", "alm": "alm_map"}


def top_fraction_mean(m: Tensor, fraction: float) -> Tensor:
    """(B, ...) → (B,): mean of each image's largest values. Lesions are small, so a whole-image mean would let
    healthy tissue dilute them; the top fraction keeps the score sensitive to focal change."""
    flat = m.flatten(1)
    k = max(1, int(fraction * flat.shape[1]))
    return flat.topk(k, dim=1).values.mean(1)


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
