"""The exported scorer's maps: the local-RMS residual and its contrast score, the memory-bank ALM and its coreset,
the fused map."""

from __future__ import annotations

from pathlib import Path

import torch
from script_roundtrip import script_roundtrip

from training.model import VQVAE, VQVAEConfig
from training.scorer import Scorer, coreset, declared, frame_contrast, gaussian_blur, map_outputs, readme_table

CFG = VQVAEConfig(n_hiddens=16, n_residual_hiddens=8, n_residual_layers=1, embedding_dim=8, n_embeddings=16)


def _scorer() -> Scorer:
    torch.manual_seed(0)
    model = VQVAE(CFG)
    model.train()(torch.randn(4, 1, 32, 32))  # initialise the codebook from data
    return Scorer(model.eval()).eval()


def test_gaussian_blur_keeps_constants_and_mass() -> None:
    x = torch.full((1, 1, 16, 16), 3.0)
    torch.testing.assert_close(gaussian_blur(x, 2.0), x)
    dot = torch.zeros(1, 1, 33, 33)
    dot[0, 0, 16, 16] = 1.0
    out = gaussian_blur(dot, 2.0)
    assert abs(float(out.sum()) - 1.0) < 1e-5 and float(out.max()) < 0.05  # spread out, nothing lost


def test_coreset_takes_the_far_points_a_random_subset_would_miss() -> None:
    """900 vectors in one tight cluster, 3 far outliers: a 4-vector coreset holds all 3 outliers."""
    torch.manual_seed(0)
    flat = torch.cat([0.01 * torch.randn(900, 8), 10 * torch.eye(8)[:3]])
    picked = coreset(flat, 4, seed=1, proj_dim=8)
    assert set(range(900, 903)) <= set(picked.tolist())
    assert coreset(flat, 5000).tolist() == list(range(903))  # asking for more than there is: all of them


def test_alm_is_zero_on_the_bank_and_grows_away_from_it() -> None:
    scorer = _scorer()
    x = torch.randn(2, 1, 32, 32)
    assert float(scorer(x)["alm"].abs().max()) == 0.0  # unfitted: no bank, no ALM
    with torch.no_grad():
        feats = scorer.features(x)
    scorer.fit_memory_bank(feats, size=10_000)  # every vector of x's own features
    with torch.no_grad():
        same, other = scorer(x), scorer(x + 2 * torch.randn_like(x))
    assert float(same["alm_map"].abs().max()) < 1e-2
    assert bool((other["alm"] > same["alm"] + 1e-3).all())


def test_residual_map_averages_speckle_but_keeps_a_blob() -> None:
    """Same total squared error: scattered single pixels (speckle) vs one compact blob. The local RMS keeps the
    blob's peak and flattens the speckle; the raw |x - x̂| could not tell the two apart."""
    torch.manual_seed(0)
    speckle = torch.zeros(1, 1, 128, 128)
    speckle.view(-1)[torch.randperm(128 * 128)[:36]] = 1.0
    blob = torch.zeros(1, 1, 128, 128)
    blob[0, 0, 20:26, 20:26] = 1.0
    rms = [gaussian_blur(r.pow(2), 128 / 64.0).sqrt().max() for r in (speckle, blob)]
    assert float(rms[1]) > 2 * float(rms[0])


def test_scripted_scorer_with_a_bank_matches_eager_after_save_load() -> None:
    scorer = _scorer()
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        scorer.fit_memory_bank(scorer.features(torch.randn(3, 1, 32, 32)), size=50)
        out = scorer(torch.randn(3, 1, 32, 32))
        scorer.fit_fused_scale([out["residual_map"], out["alm_map"]])
    loaded = script_roundtrip(scorer)
    eager, got = scorer(x), loaded(x)
    assert loaded.memory_bank.shape == (50, CFG.n_hiddens)
    torch.testing.assert_close(loaded.fused_scale, scorer.fused_scale)
    for k in ("residual_map", "alm_map", "fused_map", "residual", "residual_contrast", "alm", "alm_raw", "fused"):
        torch.testing.assert_close(got[k], eager[k])
    assert float(eager["alm"].min()) > 0.0


def test_frame_contrast_ignores_the_frame_and_the_scans_own_level() -> None:
    """The decoder's padding error along the edges and a scan-wide error level (speckle, a soft layer band) do not
    count; a local excess inside the frame does."""
    flat = torch.full((1, 1, 64, 64), 0.2)
    edges = flat.clone()
    edges[..., :4, :] = edges[..., -4:, :] = edges[..., :, :4] = edges[..., :, -4:] = 5.0
    blob = flat.clone()
    blob[..., 30:36, 30:36] = 1.0  # 36 px: more than the top 1 % of the 56² inside pixels, fewer than 5 %
    c = [float(frame_contrast(m, 4, 0.01, 0.05)) for m in (flat, edges, blob, blob + 0.3)]
    assert abs(c[0]) < 1e-6 and abs(c[1]) < 1e-6
    assert abs(c[2] - 0.8) < 1e-6 and abs(c[3] - c[2]) < 1e-6


def test_fused_map_reads_one_at_the_normal_top_and_zero_on_the_frame() -> None:
    scorer = _scorer()
    normal = torch.randn(8, 1, 32, 32)
    with torch.no_grad():
        scorer.fit_memory_bank(scorer.features(normal[:4]), size=200)
        out = scorer(normal)
        scorer.fit_fused_scale([out["residual_map"], out["alm_map"]])
        fused = scorer(normal)["fused_map"]
    on_frame = fused.clone()
    on_frame[..., 2:-2, 2:-2] = 0.0  # S/16 = 2 px at 32
    assert float(on_frame.abs().max()) == 0.0 and float(fused.min()) >= 0.0 and float(fused.max()) > 0.0
    for k, scale in zip(("residual_map", "alm_map"), scorer.fused_scale, strict=True):
        top = torch.quantile(out[k][..., 2:-2, 2:-2].flatten(), 0.995)
        assert abs(float(top / scale) - 1.0) < 1e-3


def test_readme_score_table_is_the_scorers_declaration() -> None:
    """The README's table of scores comes from the one declaration export, evaluation and the service read."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert readme_table() in readme


def test_declared_scores_are_what_the_scorer_emits() -> None:
    """Every declared score of a VQ-VAE-only scorer, and its map, is an output; nothing else is a score."""
    with torch.no_grad():
        out = _scorer()(torch.zeros(2, 1, 32, 32))
    names = [d.name for d in declared("vqvae")]
    assert all(out[k].shape == (2,) for k in names)
    assert set(map_outputs("vqvae")) <= set(out)
    scalar = {k for k, v in out.items() if v.dim() == 1}
    assert scalar == set(names)


def test_nll_by_depth_is_the_excess_over_normal_rows_inside_the_frame() -> None:
    """On the retina band, nll_map is the NLL above the normal level of its row, 0 on the frame; `nll` pools it."""
    from training.prior import GatedPixelCNN, PriorConfig
    from training.scorer import PriorScorer

    torch.manual_seed(0)
    base = _scorer()
    prior = GatedPixelCNN(PriorConfig(n_embeddings=CFG.n_embeddings, n_layers=2, n_channels=8)).eval()
    scorer = PriorScorer(base, prior, position_threshold=10.0, size=32, by_depth=True).eval()
    normal = [torch.randn(8, 1, 32, 32) for _ in range(4)]
    with torch.no_grad():
        raw = PriorScorer(base, prior, 10.0, size=32)(normal[0])["nll_map"]  # by_depth off: the plain map
        scorer.fit_depth_base(normal)
        out = scorer(normal[0])
    m = out["nll_map"]
    border = 2  # 32 / 16
    assert (m[:, :, :border] == 0).all() and (m[:, :, :, -border:] == 0).all()
    assert (m >= 0).all() and scorer.nll_depth_base.shape == (32,)
    # On the scans it was fitted on, at most about 1 % of a row's pixels pass its 99th percentile.
    inner = m[:, 0, border:-border, border:-border]
    assert (inner > 0).float().mean() <= 0.02
    expected = (raw - scorer.nll_depth_base.view(1, 1, -1, 1)).clamp_min(0)[:, :, border:-border, border:-border]
    torch.testing.assert_close(inner, expected[:, 0])
    scripted = script_roundtrip(scorer)
    torch.testing.assert_close(scripted(normal[1])["nll"], scorer(normal[1])["nll"])
