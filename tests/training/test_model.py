from __future__ import annotations

import copy

import pytest
import torch
from script_roundtrip import script_roundtrip

from training.model import VQVAE, VQVAEConfig
from training.scorer import Scorer, top_fraction_mean

CFG = VQVAEConfig(n_hiddens=16, n_residual_hiddens=8, n_residual_layers=2, embedding_dim=8, n_embeddings=16,
                  dropout=0.1)


def test_shapes() -> None:
    model = VQVAE(CFG)
    out = model(torch.randn(2, 1, 32, 32))
    assert out["x_hat"].shape == (2, 1, 32, 32)
    assert out["codes"].shape == (2, 8, 8)
    assert out["z_e"].shape == (2, 8, 8, 8)


def test_residual_layers_have_their_own_weights() -> None:
    stack = VQVAE(CFG).encoder.net[5].layers
    assert stack[0].block[1].weight.data_ptr() != stack[1].block[1].weight.data_ptr()


def test_straight_through_gradient_reaches_encoder() -> None:
    model = VQVAE(CFG).train()
    out = model(torch.randn(2, 1, 32, 32))
    (out["x_hat"].pow(2).mean() + out["vq_loss"]).backward()
    assert model.encoder.net[0].weight.grad.abs().sum() > 0


def test_gradient_codebook_mode_trains_the_codebook() -> None:
    model = VQVAE(VQVAEConfig(**{**CFG.to_dict(), "ema_decay": 0.0})).train()
    out = model(torch.randn(2, 1, 32, 32))
    out["vq_loss"].backward()
    assert model.quantizer.codebook.embedding.grad is not None


def test_codebook_starts_at_data_and_dead_codes_restart() -> None:
    cfg = VQVAEConfig(**{**CFG.to_dict(), "dead_code_steps": 1})
    model = VQVAE(cfg).train()
    model(torch.randn(4, 1, 32, 32))
    assert bool(model.quantizer.codebook.initialized)
    cb = model.quantizer.codebook
    before = cb.embedding.detach().clone()
    cb.steps_since_used.fill_(5)  # pretend every code has been idle
    flat = torch.randn(64, 8) + 100.0
    restarted = cb.restart_dead_codes(flat, torch.zeros(64, dtype=torch.long), patience=1)
    assert restarted == 15  # all but code 0, which this batch used
    assert not torch.equal(before[1:], cb.embedding[1:]) and (cb.embedding[1:] > 50).all()


def test_top_fraction_mean() -> None:
    m = torch.zeros(2, 1, 10, 10)
    m[0, 0, 0, 0] = 10.0
    s = top_fraction_mean(m, 0.01)
    assert s.tolist() == [10.0, 0.0]


def test_scripted_scorer_matches_eager_after_save_load() -> None:
    torch.manual_seed(0)
    model = VQVAE(CFG)
    model.train()(torch.randn(4, 1, 32, 32))  # initialise the codebook from data
    scorer = Scorer(model.eval()).eval()
    loaded = script_roundtrip(scorer)
    x = torch.randn(3, 1, 32, 32)
    eager, got = scorer(x), loaded(x)
    for k in ("reconstruction", "residual_map", "alm_map", "residual", "alm"):
        torch.testing.assert_close(got[k], eager[k])
    assert got["alm_map"].shape == (3, 1, 32, 32) and got["residual"].shape == (3,)


def test_scorer_rejects_wrong_shape() -> None:
    with pytest.raises(ValueError):
        Scorer(VQVAE(CFG))(torch.randn(1, 3, 32, 32))


def test_autocast_picks_the_float32_codes() -> None:
    """Under --amp the codes chosen in training must be the ones the float32 scorer serves: bf16 distances flip the
    argmin of near-equal codes, and `.float()` alone does not leave autocast."""
    torch.manual_seed(0)
    q32 = VQVAE(VQVAEConfig(**{**CFG.to_dict(), "n_embeddings": 64})).quantizer
    q32.codebook.embedding.data.normal_()
    q32.codebook.initialized.fill_(True)
    qamp = copy.deepcopy(q32)
    z_e = torch.randn(4, 8, 32, 32)
    want = q32.eval().quantize(z_e)[1]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(qamp.eval().quantize(z_e)[1], want)
        _, _, codes_amp, _ = qamp.train()(z_e)  # training step: assignment and EMA update
    _, _, codes_32, _ = q32.train()(z_e)
    assert torch.equal(codes_amp, want) and torch.equal(codes_32, want)
    torch.testing.assert_close(qamp.codebook.embedding, q32.codebook.embedding)
