"""The latent prior: causality of the gated PixelCNN, scripting, its CLI, the exported scorer's NLL, the service."""

from __future__ import annotations

import base64
import io
import json
import re
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import yaml
from export_probe import score_without_training
from PIL import Image

from octcore.manifest import load_scorer
from octcore.preprocess import Preprocessing, preprocess
from training import train_prior
from training.checkpoint import CheckpointError, load_checkpoint
from training.export import auroc_standard_error, build_scorer
from training.model import VQVAE
from training.prior import GatedPixelCNN, PriorConfig, find_prior_checkpoint, load_prior_checkpoint
from training.scorer import COMBINED_TERM, PriorScorer, Scorer, top_fraction_mean, with_role

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "service"))
from service_helpers import ServiceProcess  # noqa: E402 (the service tests' helper, found through the path above)


def small_prior(k: int = 8, layers: int = 4) -> GatedPixelCNN:
    torch.manual_seed(0)
    return GatedPixelCNN(PriorConfig(n_embeddings=k, n_layers=layers, n_channels=8)).eval()


@torch.no_grad()
def test_changing_a_code_never_changes_logits_at_or_before_it() -> None:
    prior = small_prior()
    codes = torch.randint(0, 8, (1, 6, 7))
    base = prior(codes)
    w = codes.shape[-1]
    for p in range(codes[0].numel()):
        changed = codes.clone()
        changed[0, p // w, p % w] = (changed[0, p // w, p % w] + 1) % 8
        diff = (prior(changed) - base).abs().amax(1).flatten()  # per position, raster order
        assert diff[: p + 1].max() == 0, f"position {p} leaks into logits at or before it"
        if (p + 1) % w:  # the next position in the same row always sees this one
            assert diff[p + 1] > 0, f"position {p} does not reach the next position"


@torch.no_grad()
def test_no_blind_spot_every_earlier_position_in_reach_counts() -> None:
    prior = small_prior(layers=4)  # receptive field: 4 rows up, 4 columns either side
    codes = torch.randint(0, 8, (1, 6, 9))
    target = (4, 4)
    base = prior(codes)[0, :, 4, 4]
    for i in range(1, 5):
        for j in range(9):
            if (i, j) >= target:
                continue
            changed = codes.clone()
            changed[0, i, j] = (changed[0, i, j] + 1) % 8
            assert (prior(changed)[0, :, 4, 4] - base).abs().max() > 0, f"({i}, {j}) is in a blind spot"


def test_scripted_prior_matches_eager_after_save_and_load(tmp_path: Path) -> None:
    prior = small_prior()
    path = tmp_path / "prior.pt"
    torch.jit.script(prior).save(str(path))
    loaded = torch.jit.load(str(path))
    codes = torch.randint(0, 8, (3, 5, 6))
    where = torch.rand(3, 5, 6) > 0.7
    with torch.no_grad():
        torch.testing.assert_close(loaded(codes), prior(codes))
        torch.testing.assert_close(loaded.nll(codes), prior.nll(codes))
        torch.manual_seed(1)
        eager = prior.resample(codes, where)
        torch.manual_seed(1)
        scripted = loaded.resample(codes, where)
    assert torch.equal(eager, scripted)
    assert torch.equal(eager[~where], codes[~where]), "restoration changed codes it was not asked to redraw"


def test_train_prior_writes_its_files(tiny_prior_model) -> None:
    out = tiny_prior_model.run_dir / "prior"
    for name in ("last.ckpt", "config.yaml", "metrics.csv"):
        assert (out / name).is_file(), name
    best = find_prior_checkpoint(tiny_prior_model.ckpt)
    assert best is not None and best.name.startswith("best-epoch=")
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["prior_config"] == {"n_embeddings": 32, "n_layers": 4, "n_channels": 32, "kernel_size": 3}
    assert len((out / "metrics.csv").read_text().splitlines()) == 1 + 3
    ckpt = load_prior_checkpoint(best, load_checkpoint(tiny_prior_model.ckpt))
    prior = GatedPixelCNN.from_checkpoint(ckpt)  # rebuilt from the checkpoint alone
    val = torch.from_numpy(np.load(tiny_prior_model.run_dir / "latent" / "val_codes.npy").astype(np.int64))
    with torch.no_grad():
        val_nll = float(prior.nll(val).mean())
    assert val_nll == pytest.approx(ckpt["state"]["best_val"], rel=1e-4)
    assert val_nll < np.log(32), "the prior learned nothing: no better than uniform over the codebook"
    assert len(ckpt["position_nll"]["percentiles"]) == 101
    assert not (tiny_prior_model.run_dir.parent / "prior").exists()


def test_prior_of_another_vqvae_is_refused(tiny_prior_model, tiny_model) -> None:
    other = load_checkpoint(tiny_model.ckpt)
    other["model"] = dict(other["model"])
    other["model"]["quantizer.codebook.embedding"] = other["model"]["quantizer.codebook.embedding"] + 1
    with pytest.raises(CheckpointError, match="another VQ-VAE checkpoint"):
        load_prior_checkpoint(find_prior_checkpoint(tiny_prior_model.ckpt), other)


@pytest.mark.parametrize(("args", "message"), [
    (["--kernel_size", "4"], "--kernel_size must be odd"),
    (["--epochs", "0"], "--epochs and --batch_size must be positive"),
    (["--position_percentile", "100"], "--position_percentile must be in"),
    ([], r"/nonexistent\.ckpt does not exist"),
])
def test_train_prior_rejects_bad_arguments(args: list[str], message: str, capsys: pytest.CaptureFixture) -> None:
    # A message and a non-zero exit, without a traceback.
    assert train_prior.main(["--model_dir", "/nonexistent.ckpt", *args]) == 2
    assert re.search(message, capsys.readouterr().err)


def test_train_prior_needs_latent_codes(tiny_model, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / tiny_model.ckpt.name).symlink_to(tiny_model.ckpt)
    assert train_prior.main(["--model_dir", str(run), "--device", "cpu"]) == 2
    assert "train_codes.npy does not exist" in capsys.readouterr().err


def test_export_includes_nll_and_its_calibration(tiny_prior_model, tiny_model) -> None:
    man = json.loads((tiny_prior_model.version_dir / "manifest.json").read_text())
    assert {"residual", "residual_contrast", "alm", "alm_raw", "fused", "nll", "combined"} == set(man["scores"])
    assert "nll_map" in man["scores"]["fused"]["description"]  # with a prior, the fused map includes it
    _, module = load_scorer(tiny_prior_model.version_dir)
    assert module.fused_scale.shape == (3,) and bool((module.fused_scale != 1.0).all())  # fitted at export
    assert man["scores"]["nll"]["map"] == "nll_map" and "nats" in man["scores"]["nll"]["description"]
    assert man["scores"]["combined"]["map"] is None
    assert "nll_map" in man["maps"]
    assert man["calibration"]["nll"]["map_scale"] > 0 and man["calibration"]["nll"]["threshold"] > 0
    # combined is a mean of z-scores against the calibration images themselves: mean 0 there.
    assert man["calibration"]["combined"]["mean"] == pytest.approx(0.0, abs=1e-5)
    assert set(man["evaluation"]["held_out"]) == set(man["scores"])
    aurocs = {k: v["auroc"] for k, v in man["evaluation"]["held_out"].items()}
    best = max(aurocs, key=aurocs.get)
    held = man["evaluation"]["held_out"][best]
    close = aurocs[best] - aurocs["fused"] <= auroc_standard_error(aurocs[best], held["n_normal"],
                                                                   held["n_abnormal"])
    assert man["primary_score"] == ("fused" if close else best)
    assert man["training"]["prior"]["prior_config"]["n_layers"] == 4
    # A run without a prior exports exactly what it did before.
    plain = json.loads((tiny_model.version_dir / "manifest.json").read_text())
    assert set(plain["scores"]) == {"residual", "residual_contrast", "alm", "alm_raw", "fused"}
    assert "nll_map" not in plain["maps"]


def test_scorer_with_prior_loads_without_training_and_nll_matches_eager_prior(tiny_prior_model) -> None:
    files = sorted((tiny_prior_model.data_root / "OCT2017" / "test").glob("*/*.jpeg"))[::8][:5]
    served = score_without_training(tiny_prior_model.version_dir, files, ("nll_map",))

    # The eager pieces, put together by hand: VQ-VAE codes → prior NLL per position → top-fraction mean.
    ckpt = load_checkpoint(tiny_prior_model.ckpt)
    vqvae = VQVAE.from_checkpoint(ckpt)
    prior = GatedPixelCNN.from_checkpoint(load_prior_checkpoint(find_prior_checkpoint(tiny_prior_model.ckpt), ckpt))
    manifest, _ = load_scorer(tiny_prior_model.version_dir)
    x = torch.stack([torch.from_numpy(preprocess(Image.open(f), manifest.preprocessing_config())) for f in files])
    with torch.no_grad():
        nll = prior.nll(vqvae.encode_codes(x[:, None])).unsqueeze(1)
    np.testing.assert_allclose(served["nll"], top_fraction_mean(nll, 0.05).numpy(), rtol=1e-4, atol=1e-6)
    nll_map = np.asarray(served["nll_map"])
    assert nll_map.shape == (len(files), 1, 128, 128)
    np.testing.assert_allclose(nll_map[:, :, 1::4, 1::4].mean(), nll.mean().item(), rtol=0.05)
    # The combined score is what the manifest says: the mean z-score of its parts against normal statistics.
    cal = manifest.calibration
    z = np.mean([(np.asarray(served[k]) - cal[k].mean) / cal[k].std for k in with_role(COMBINED_TERM)], axis=0)
    np.testing.assert_allclose(served["combined"], z, rtol=1e-3, atol=1e-3)


@torch.no_grad()
def test_restoration_redraws_unlikely_codes_and_scripts(tiny_prior_model, tmp_path: Path) -> None:
    ckpt = load_checkpoint(tiny_prior_model.ckpt)
    scorer, specs, maps = build_scorer(ckpt, 0.01, restore_samples=2, restore_max_positions=8)
    assert isinstance(scorer, PriorScorer) and "restored_residual" in specs and "restoration" in maps
    scan = sorted((tiny_prior_model.data_root / "OCT2017" / "test" / "DME").glob("*.jpeg"))[0]
    x = torch.from_numpy(preprocess(Image.open(scan), Preprocessing.from_dict(ckpt["preprocessing"])))[None, None]
    torch.manual_seed(0)
    out = scorer(x)
    assert out["restoration"].shape == out["restored_residual_map"].shape == (1, 1, 128, 128)
    # Restoration only touches codes above the position threshold, at most 8 of them, so it stays near x̂.
    changed = (out["restoration"] - out["reconstruction"]).abs()
    assert changed.max() > 0 and (changed > 1e-6).float().mean() < 0.5
    path = tmp_path / "scorer.pt"
    torch.jit.script(scorer).save(str(path))
    torch.manual_seed(0)
    scripted = torch.jit.load(str(path))(x)
    for k in ("restoration", "restored_residual", "nll", "combined", "fused_map", "fused"):
        torch.testing.assert_close(scripted[k], out[k])
    plain, plain_specs, _ = build_scorer(ckpt, 0.01, use_prior=False)
    assert type(plain) is Scorer and set(plain_specs) == {"residual", "residual_contrast", "alm", "alm_raw", "fused"}


def test_inference_reports_nll_and_combined(tiny_prior_model, tmp_path: Path) -> None:
    from training import inference

    out = tmp_path / "inference"
    assert inference.main(["--model_dir", str(tiny_prior_model.ckpt), "--device", "cpu", "--examples", "1",
                           "--output", str(out)]) == 0
    results = json.loads((out / "metrics.json").read_text())["results"]
    assert {"nll", "combined"} <= set(results["NORMAL vs rest"])
    assert all(np.isfinite(results["NORMAL vs rest"][k]["auroc"]) for k in ("nll", "combined"))
    header = (out / "scores.csv").read_text().splitlines()[0]
    assert header == "file,category,residual,residual_contrast,alm,alm_raw,fused,nll,combined"
    assert (out / "grid_DME.png").is_file()
    assert set(json.loads((out / "metrics.json").read_text())["pixel"]) == {"residual_map", "alm_map", "fused_map",
                                                                                "nll_map"}


def test_service_returns_nll_score_and_heatmap(tiny_prior_model, tmp_path: Path) -> None:
    scan = sorted((tiny_prior_model.data_root / "OCT2017" / "test" / "DME").glob("*.jpeg"))[0]
    manifest, scorer = load_scorer(tiny_prior_model.version_dir)
    x = torch.from_numpy(preprocess(Image.open(scan), manifest.preprocessing_config()))[None, None]
    with torch.inference_mode():
        direct = scorer(x)
    svc = ServiceProcess(tiny_prior_model.store, tiny_prior_model.name, tmp_path / "service.log")
    try:
        svc.wait_ready()
        r = httpx.post(f"{svc.url}/score", files={"file": (scan.name, scan.read_bytes(), "image/jpeg")}, timeout=60)
    finally:
        svc.stop()
    assert r.status_code == 200, r.text
    body = r.json()
    for k in ("nll", "combined"):
        assert body["scores"][k] == pytest.approx(float(direct[k][0]), rel=1e-4, abs=1e-6), k
    assert body["score"] == body["scores"][manifest.primary_score]
    assert "nll" in body["heatmaps"] and "combined" not in body["heatmaps"]
    Image.open(io.BytesIO(base64.b64decode(body["heatmaps"]["nll"]))).verify()
