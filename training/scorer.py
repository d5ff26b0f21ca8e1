"""The module that gets exported: preprocessed batch → anomaly maps and per-image scores.

This is the scorer contract of `octcore.manifest.load_scorer`: input (B, 1, S, S) float32 in the preprocessing's
range; output a dict of maps (B, 1, S, S) and scores (B,). The same class runs eagerly in evaluation and scripted in
the service, so what was evaluated is what is served. A run with a latent prior exports `PriorScorer`, which wraps
the same `Scorer` and adds the prior's outputs; a run without one exports `Scorer` unchanged.
"""

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from training.model import VQVAE
from training.prior import GatedPixelCNN

BANK_CHUNK_ROWS = 4096  # latent positions per distance matmul (4 images at 128 px): 64 MB with a 4,096-vector bank
# The ALM map is 1/16 the pixels of the image: 1 % of a 32x32 grid is 10 positions, too few to be stable.
ALM_TOP_FRACTION = 0.05
# The decoder's zero padding makes its error largest along the image's edges on every scan: a quarter of a normal
# scan's top 1 % residual pixels lay in the outer 4 px at 128 px (docs/quality.md). Scores that use the frame
# ignore the outer S/16; the lesions the maps are for sit in the retina, away from the edges.
FRAME_FRACTION = 1.0 / 16
# residual_contrast subtracts the scan's own (1 - this) quantile of residual_map: its layer-boundary error level.
CONTRAST_BASE_FRACTION = 0.05
FUSED_SCALE_PERCENTILE = 99.5
# Retina band only (its rows are depths under the RPE, the same on every scan): nll_map is the NLL above this
# percentile of normal training scans' NLL at the same depth. Each depth has its own normal level (the vitreous' codes
# are predictable, the layer boundaries' less so); above it, what remains is where a scan is unlike normal retinas at
# that depth. On the selection folds (bench/bench_real.py) it moved the map's mass inside the retina on abnormal
# scans from 42 % to 81 % and left the score's AUROC unchanged (0.993).
DEPTH_BASE_PERCENTILE = 99.0

Needs = Literal["vqvae", "prior", "restore"]
# Roles a score can play beyond being a candidate for the served score:
PREFERRED = "preferred"  # served when a run's own evidence does not clearly point to another score (export)
OVERLAY = "overlay"  # its map is shown first when the served score has none (export writes overlay_score)
FUSED_TERM = "fused term"  # its map is a term of the fused map
COMBINED_TERM = "combined term"  # a term of the combined z-score
NORMALISED = "normalised"  # needs the calibration images' statistics fitted into the scorer (`fit_combined`)


@dataclass(frozen=True)
class ScoreDecl:
    """One score a scorer emits, declared once: export writes the manifest's score table from these, evaluation and
    the README's table read them, and the scorers' outputs carry exactly these names."""

    name: str
    summary: str  # what it measures, for a reader (README)
    description: str  # how it is computed (the manifest), a template filled by `describe`
    map: str | None  # the output holding its spatial evidence, rendered as a heatmap; None: no map of its own
    needs: Needs = "vqvae"
    roles: frozenset[str] = frozenset()


SCORES: tuple[ScoreDecl, ...] = (
    ScoreDecl("residual", "what the decoder cannot reproduce from normal codes: the local RMS error at the scale of "
              "the retina's layers (speckle averages out, a lesion does not)",
              "mean of the top {top:.1%} pixels of residual_map = sqrt(G * (x - x_hat)^2), the local RMS "
              "reconstruction error in a Gaussian window G of sigma = S/64 pixels (model input units)",
              "residual_map", roles=frozenset({FUSED_TERM})),
    # It reads residual_map, but a map entry would make the service render that heatmap twice.
    ScoreDecl("residual_contrast", "the residual's top away from the image edges minus the scan's own 95th "
              "percentile there: the decoder's edge error and a scan's overall error level cancel, a lesion stands "
              "out", "residual_map inside a frame of S/16 pixels: the mean of its top {top:.1%} minus its own 95th "
              "percentile there (the scan's typical layer-boundary error)", None, roles=frozenset({COMBINED_TERM})),
    ScoreDecl("alm", "how unlike the normal training scans each region looks to the encoder: distance of its "
              "features to the nearest of 4,096 normal ones stored in the scorer",
              "mean of the top {alm_top:.0%} latent positions of alm_map: the distance of the encoder's features "
              "(before the quantizer) to the nearest of {bank} feature vectors of normal training scans (a coreset)",
              "alm_map", roles=frozenset({FUSED_TERM})),
    ScoreDecl("alm_raw", "the original alignment loss, kept for comparison",
              "the original alignment loss: mean of the top {top:.1%} latent positions of mean_c (z_e - z_q)^2",
              None),
    # Each map errs in its own places on normal tissue, so their mean localises lesions better than any one of them.
    ScoreDecl("fused", "the residual, ALM and NLL maps in one, each over its normal 99.5th percentile: the best "
              "localiser", "mean of the top {top:.1%} pixels of fused_map: the mean of {fused_of}, each divided by "
              "its 99.5th percentile on normal training scans, inside a frame of S/16 pixels (0 outside)",
              "fused_map", roles=frozenset({PREFERRED, OVERLAY, COMBINED_TERM})),
    ScoreDecl("nll", "codes a PixelCNN prior over normal code grids finds unlikely (when the run trained a prior; on "
              "the retina band, above what normal retinas reach at the same depth)",
              "mean of the top {nll_top:.1%} {nll_of} the prior's map -log p(code | codes before it in raster order) "
              "(nats), bilinearly upsampled to the image{nll_depth}", "nll_map", needs="prior",
              roles=frozenset({FUSED_TERM})),
    # The contrast score finds drusen, the fused map's top finds DME: on the demo's held-out scans this pair separated
    # best of the combinations tried (0.970, against 0.892 for the former residual, alm, nll; docs/quality.md).
    ScoreDecl("combined", "mean of the z-scores of `residual_contrast` and `fused` against the normal calibration "
              "scans", "mean over {combined_of} of (score - normal mean) / normal std, the normal statistics being "
              "those of the calibration images (computed inside the scorer)", None, needs="prior",
              roles=frozenset({NORMALISED})),
    ScoreDecl("restored_residual", "what remains after the prior redraws unlikely codes and the decoder draws them "
              "(`--restore_samples`, slow)", "mean of the top {top:.1%} pixels of |x - x_r| averaged over {n} "
              "restorations x_r: the codes whose NLL exceeds {thr:.3g} nats (at most {max_pos} per image, the "
              "highest) are redrawn from the prior in raster order and decoded", "restored_residual_map",
              needs="restore"),
)
# Outputs that are maps without being a score's evidence: the decoder's reconstruction, the prior's restoration.
EXTRA_MAPS: dict[str, list[str]] = {"vqvae": ["reconstruction"], "prior": [], "restore": ["restoration"]}
_LEVELS: dict[str, tuple[str, ...]] = {"vqvae": ("vqvae",), "prior": ("vqvae", "prior"),
                                       "restore": ("vqvae", "prior", "restore")}


def declared(level: Needs) -> list[ScoreDecl]:
    """The scores of a scorer with `level`: the VQ-VAE alone, with its prior, with prior restoration."""
    return [d for d in SCORES if d.needs in _LEVELS[level]]


def with_role(role: str, level: Needs = "restore") -> list[str]:
    """The names of the scores (of a scorer with `level`) that play `role`, in declaration order."""
    return [d.name for d in declared(level) if role in d.roles]


def map_outputs(level: Needs) -> list[str]:
    """Every map output of a scorer with `level`, each once: extra maps first, then the scores' in their order."""
    extra = [m for k in _LEVELS[level] for m in EXTRA_MAPS[k]]
    return list(dict.fromkeys([extra[0], *(d.map for d in declared(level) if d.map), *extra[1:]]))


def fused_maps(level: Needs) -> list[str]:
    """The maps fused_map averages in a scorer with `level`."""
    return [d.map for d in declared(level) if FUSED_TERM in d.roles and d.map]


def describe(decl: ScoreDecl, **params: object) -> str:
    """The manifest's description of `decl` with this scorer's numbers filled in (unused parameters are ignored)."""
    return decl.description.format(**params)


def readme_table() -> str:
    """The README's score table (a test keeps README.md equal to it)."""
    rows = [f"| `{d.name}` | {d.summary} |" for d in SCORES if d.needs != "restore"]
    return "\n".join(["| score | what it measures |", "|---|---|", *rows])


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


def coreset(flat: Tensor, size: int, seed: int = 0, proj_dim: int = 16) -> Tensor:
    """Indices of `size` rows of `flat` (N, C) by greedy farthest-point selection (PatchCore's coreset, Roth et al.
    2022), distances taken in a seeded random projection to `proj_dim` dimensions to keep it cheap. A random
    subset of normal features misses the rare normal patterns (image borders, the fovea, tilted layers), which
    then read as anomalies: on the demo phantom the ALM's image AUROC rose from 0.67 to 0.87 (docs/quality.md)."""
    n = flat.shape[0]
    if size >= n:
        return torch.arange(n)
    g = torch.Generator().manual_seed(seed)
    z = flat @ (torch.randn(flat.shape[1], proj_dim, generator=g) / proj_dim ** 0.5).to(flat)
    picked = torch.empty(size, dtype=torch.long)
    picked[0] = int(torch.randint(0, n, (1,), generator=g))
    # ‖z - z_p‖² = ‖z‖² + ‖z_p‖² - 2 z·z_p: one matrix-vector product a step instead of an (N, d) difference (~9×
    # faster; rounding may break a near-tie the other way, which changes nothing the bank is for).
    zsq = z.pow(2).sum(1)
    nearest = torch.addmv(zsq + zsq[picked[0]], z, z[picked[0]], alpha=-2)  # squared distance to the nearest pick
    for i in range(1, size):
        p = nearest.argmax()
        picked[i] = p
        torch.minimum(nearest, torch.addmv(zsq + zsq[p], z, z[p], alpha=-2), out=nearest)
    return picked


def frame_contrast(m: Tensor, border: int, top_fraction: float, base_fraction: float) -> Tensor:
    """(B, 1, H, W) → (B,): inside a frame of `border` pixels, the mean of each map's top `top_fraction` minus the
    map's own value at its top `base_fraction` (its 1 - base_fraction quantile). A lesion is local; what raises the
    whole of a scan's residual (speckle, a slightly blurred layer band) raises both terms and cancels."""
    inner = m[:, :, border:m.shape[2] - border, border:m.shape[3] - border].flatten(1)
    k_top = max(1, int(top_fraction * inner.shape[1]))
    k_base = max(1, int(base_fraction * inner.shape[1]))
    vals = inner.topk(max(k_top, k_base), dim=1).values
    return vals[:, :k_top].mean(1) - vals[:, k_base - 1]


def frame_mask(like: Tensor, border: int) -> Tensor:
    """(B, 1, H, W) → a (1, 1, H, W) mask: 1 inside a frame of `border` pixels, 0 on it."""
    inner = torch.ones(1, 1, like.shape[2] - 2 * border, like.shape[3] - 2 * border, dtype=like.dtype,
                       device=like.device)
    return F.pad(inner, [border, border, border, border])


def fuse(maps: list[Tensor], scale: Tensor, border: int) -> Tensor:
    """K maps (B, 1, S, S) → their mean, each divided by its normal scale (K,), 0 on a frame of `border` pixels."""
    return frame_mask(maps[0], border) * (torch.stack(maps, 0) / scale.view(-1, 1, 1, 1, 1)).mean(0)


def normal_scale(maps: list[Tensor], frame_fraction: float) -> Tensor:
    """K maps (N, 1, S, S) of normal scans → (K,) each map's FUSED_SCALE_PERCENTILE inside the frame: what `fuse`
    divides by, so that every term reads 1 at the top of normal and none dominates by its units."""
    border = int(maps[0].shape[-1] * frame_fraction)
    inside = frame_mask(maps[0], border)[0, 0].bool()
    scale = [float(np.percentile(m[:, 0][:, inside].float().cpu().numpy(), FUSED_SCALE_PERCENTILE)) for m in maps]
    return torch.tensor(scale).clamp_min(1e-8)


def gaussian_blur(x: Tensor, sigma: float) -> Tensor:
    """(B, 1, H, W) → the same, smoothed by a separable Gaussian (borders replicated)."""
    r = max(1, int(3.0 * sigma + 0.5))
    t = torch.arange(-r, r + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-t * t / (2.0 * sigma * sigma))
    k = k / k.sum()
    x = F.conv2d(F.pad(x, [r, r, 0, 0], mode="replicate"), k.view(1, 1, 1, -1))
    return F.conv2d(F.pad(x, [0, 0, r, r], mode="replicate"), k.view(1, 1, -1, 1))


class Scorer(nn.Module):
    """Residual and ALM maps of one VQ-VAE.

    residual: the local RMS of x - x̂ over a window the size of the retina's structures. Speckle is independent
    from pixel to pixel and averages out; a lesion the decoder cannot draw from normal codes is an error that
    persists over the window. Measured on the demo phantom (docs/quality.md), the raw |x - x̂| lights every layer
    edge and speckle grain about as brightly as the lesion.

    alm: the commitment loss pulls z_e onto its code everywhere, lesion or not, so the seed's mean_c (z_e - z_q)²
    (kept as the score `alm_raw`) sits at chance. The served ALM instead asks how far the encoder's features
    before the 1×1 projection into the code space — which the commitment loss does not pull onto the codes — are
    from the nearest feature vector of normal training scans (a memory bank, `fit_memory_bank`, stored in the
    scorer). Until it is fitted the bank is empty and alm is 0.

    residual_contrast: the residual's top inside the frame (`FRAME_FRACTION`) against the scan's own 95th percentile
    (`frame_contrast`): the decoder's normal error on the bright layer bands varies from scan to scan about as much
    as a small druse raises it, and the frame drops the edge error of the decoder's padding.

    fused: residual_map and alm_map (with a prior, nll_map too), each divided by its normal 99.5th percentile
    (`fit_fused_scale`, stored in the scorer), averaged inside the frame. Each map errs in its own places on normal
    tissue, so their mean localises lesions better than any one of them (docs/quality.md).
    """

    def __init__(self, model: VQVAE, top_fraction: float = 0.01) -> None:
        super().__init__()
        model = model.eval()
        self.encoder = model.encoder
        self.quantizer = model.quantizer
        self.decoder = model.decoder
        self.top_fraction = top_fraction
        self.alm_top_fraction = ALM_TOP_FRACTION
        self.bank_chunk_rows = BANK_CHUNK_ROWS
        self.frame_fraction = FRAME_FRACTION
        self.contrast_base_fraction = CONTRAST_BASE_FRACTION
        self.register_buffer("memory_bank", torch.zeros(0, model.cfg.n_hiddens))
        self.fused_of = fused_maps("vqvae")
        # The normal 99.5th percentile of each map in `fused_of` (`fit_fused_scale`); 1 until fitted.
        self.register_buffer("fused_scale", torch.ones(len(self.fused_of)))

    def features(self, x: Tensor) -> Tensor:
        """x (B, 1, S, S) → encoder features before the projection into the code space (B, C, S/4, S/4)."""
        return self.encoder.net(x).float()

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        if x.dim() != 4 or x.shape[1] != 1:
            raise ValueError("expected a (B, 1, S, S) batch")
        size = [x.shape[-2], x.shape[-1]]
        h = self.features(x)
        z_e = self.encoder.to_embedding(h.to(x.dtype)).float()
        z_q, codes = self.quantizer.quantize(z_e)
        x_hat = self.decoder(z_q.to(x.dtype))
        residual_map = gaussian_blur((x - x_hat).float().pow(2), x.shape[-1] / 64.0).clamp_min(0.0).sqrt()
        alm_raw = (z_e - z_q).pow(2).mean(1, keepdim=True)  # (B, 1, S/4, S/4)
        alm = self.bank_distance(h)  # (B, 1, S/4, S/4)
        alm_map = F.interpolate(alm, size=size, mode="bilinear", align_corners=False)
        border = int(x.shape[-1] * self.frame_fraction)
        fused_map = fuse([residual_map, alm_map], self.fused_scale, border)
        return {
            "reconstruction": x_hat,
            "residual_map": residual_map,
            "alm_map": alm_map,
            "fused_map": fused_map,
            "codes": codes,
            "residual": top_fraction_mean(residual_map, self.top_fraction),
            "residual_contrast": frame_contrast(residual_map, border, self.top_fraction,
                                                self.contrast_base_fraction),
            "alm": top_fraction_mean(alm, self.alm_top_fraction),
            "alm_raw": top_fraction_mean(alm_raw, self.top_fraction),
            "fused": top_fraction_mean(fused_map, self.top_fraction),
        }

    def bank_distance(self, h: Tensor) -> Tensor:
        """h (B, C, H, W) → Euclidean distance of each position's feature vector to its nearest bank vector."""
        b, c, hgt, wid = h.shape
        if self.memory_bank.shape[0] == 0:
            return torch.zeros(b, 1, hgt, wid, device=h.device)
        flat = h.permute(0, 2, 3, 1).reshape(-1, c)
        bank = self.memory_bank
        bank_sq = bank.pow(2).sum(1).unsqueeze(0)
        # ‖a - m‖² = ‖a‖² - 2 a·m + ‖m‖²: one matmul instead of cdist's pairwise differences, in chunks of rows so
        # that a large batch never holds its whole (positions × bank) distance matrix (1 GB at batch 64, 128 px).
        mins: list[Tensor] = []
        chunk = self.bank_chunk_rows
        for start in range(0, flat.shape[0], chunk):
            part = flat[start:start + chunk]
            d2 = part.pow(2).sum(1, keepdim=True) - 2.0 * part @ bank.t() + bank_sq
            mins.append(d2.min(1).values)
        return torch.cat(mins).clamp_min(0.0).sqrt().view(b, 1, hgt, wid)

    @torch.jit.unused
    @torch.no_grad()
    def fit_memory_bank(self, features: Tensor, size: int, seed: int = 0) -> None:
        """features (N, C, H, W) of normal training scans → `size` of their N·H·W vectors become the bank (buffer
        `memory_bank`, exported with the scorer), chosen by `coreset`."""
        flat = features.float().permute(0, 2, 3, 1).reshape(-1, features.shape[1])
        self.memory_bank = flat[coreset(flat, size, seed)].to(self.memory_bank.device).contiguous()


    @torch.jit.unused
    @torch.no_grad()
    def fit_fused_scale(self, maps: list[Tensor]) -> None:
        """The maps named in `fused_of`, (N, 1, S, S) each, of normal scans → `fused_scale` (`normal_scale`)."""
        self.fused_scale.copy_(normal_scale(maps, self.frame_fraction))


class PriorScorer(nn.Module):
    """`Scorer` plus the latent prior: `nll_map` / `nll` from one prior pass over the code grid, `combined`, and,
    when `restore_samples` > 0, a restoration (high-NLL codes redrawn from the prior, decoded) and its residual."""

    def __init__(self, base: Scorer, prior: GatedPixelCNN, position_threshold: float, nll_top_fraction: float = 0.05,
                 restore_samples: int = 0, restore_max_positions: int = 64, size: int = 0,
                 by_depth: bool = False) -> None:
        super().__init__()
        self.base = base
        self.prior = prior.eval()
        self.top_fraction = base.top_fraction
        self.nll_top_fraction = nll_top_fraction
        self.position_threshold = position_threshold
        self.restore_samples = restore_samples
        self.restore_max_positions = restore_max_positions
        self.combined_of = with_role(COMBINED_TERM)
        # Normal statistics of the combined scores; export and evaluation fit them on the calibration images.
        self.register_buffer("normal_mean", torch.zeros(len(self.combined_of)))
        self.register_buffer("normal_std", torch.ones(len(self.combined_of)))
        # The prior's fused_map replaces the base's: nll_map joins it (pixel AUROC 0.950 vs 0.936 on the demo).
        self.fused_of = fused_maps("prior")
        self.register_buffer("fused_scale", torch.ones(len(self.fused_of)))
        # The retina band's normal NLL per input row (DEPTH_BASE_PERCENTILE, `fit_depth_base`); unused when not
        # `by_depth` (a whole-scan input, whose rows are no depth).
        self.by_depth = by_depth
        self.register_buffer("nll_depth_base", torch.zeros(max(size, 1)))

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        out = self.base(x)
        size = [x.shape[-2], x.shape[-1]]
        codes = out["codes"]
        nll = self.prior.nll(codes).unsqueeze(1)  # (B, 1, S/4, S/4) nats
        nll_map = F.interpolate(nll, size=size, mode="bilinear", align_corners=False)
        border = int(x.shape[-1] * self.base.frame_fraction)
        if self.by_depth:
            # Inside the frame only: the prior's raster order makes its first rows and columns the least predictable.
            excess = (nll_map - self.nll_depth_base.view(1, 1, -1, 1)).clamp_min(0.0)
            nll_map = frame_mask(nll_map, border) * excess
            inner = nll_map[:, :, border:size[0] - border, border:size[1] - border]
            out["nll"] = top_fraction_mean(inner, self.nll_top_fraction)
        else:
            out["nll"] = top_fraction_mean(nll, self.nll_top_fraction)
        out["nll_map"] = nll_map
        out["fused_map"] = fuse([out["residual_map"], out["alm_map"], out["nll_map"]], self.fused_scale, border)
        out["fused"] = top_fraction_mean(out["fused_map"], self.top_fraction)
        out["combined"] = zscore_mean([out[k] for k in self.combined_of], self.normal_mean, self.normal_std)
        if self.restore_samples > 0:
            restored = self.restore(codes, nll[:, 0])  # (B, n, 1, S, S)
            residual = (x.unsqueeze(1) - restored).abs().mean(1)  # (B, 1, S, S)
            out["restoration"] = restored.mean(1)
            out["restored_residual_map"] = residual
            out["restored_residual"] = top_fraction_mean(residual, self.top_fraction)
        return out

    @torch.jit.unused
    @torch.no_grad()
    def fit_fused_scale(self, maps: list[Tensor]) -> None:
        """The maps named in `fused_of`, (N, 1, S, S) each, of normal scans → `fused_scale` (`normal_scale`)."""
        self.fused_scale.copy_(normal_scale(maps, self.base.frame_fraction))

    @torch.jit.unused
    @torch.no_grad()
    def fit_depth_base(self, images: list[Tensor]) -> None:
        """Batches (B, 1, S, S) of normal training scans → `nll_depth_base`: per input row, DEPTH_BASE_PERCENTILE of
        the upsampled NLL inside the frame's columns (the frame's rows take their neighbours' level). No-op when not
        `by_depth`."""
        if not self.by_depth:
            return
        maps = []
        for x in images:
            nll = self.prior.nll(self.base(x)["codes"]).unsqueeze(1)
            maps.append(F.interpolate(nll, size=[x.shape[-2], x.shape[-1]], mode="bilinear",
                                      align_corners=False)[:, 0].cpu())
        m = torch.cat(maps)  # (N, S, S)
        s = m.shape[-1]
        border = int(s * self.base.frame_fraction)
        rows = m[:, :, border:s - border].permute(1, 0, 2).reshape(s, -1).float().numpy()
        base = np.percentile(rows, DEPTH_BASE_PERCENTILE, axis=1)
        base[:border], base[s - border:] = base[border], base[s - border - 1]
        self.nll_depth_base.copy_(torch.from_numpy(base).float())

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
