"""The training package end to end, through its command lines: phantom → train → export → inference → reload."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from export_probe import score_without_training
from PIL import Image

from octcore.manifest import TailFit, load_scorer
from octcore.preprocess import preprocess
from training.checkpoint import load_checkpoint
from training.export import build_scorer, fit_normal_statistics

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def test_run_folder_holds_everything(tiny_model) -> None:
    run = tiny_model.run_dir
    for name in ("last.ckpt", "config.yaml", "metrics.csv", "loss_curve.png", "summary.json"):
        assert (run / name).is_file(), name
    assert len(list(run.glob("best-epoch=*-val_loss=*.ckpt"))) == 1
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["train_config"]["batch_size"] == 8 and config["model_config"]["n_embeddings"] == 32
    codes = np.load(run / "latent" / "train_codes.npy")
    n_files = len((run / "latent" / "train_files.txt").read_text().splitlines())
    assert codes.shape == (n_files, 32, 32) and codes.max() < 32


def test_manifest_contract(tiny_model) -> None:
    man = json.loads((tiny_model.version_dir / "manifest.json").read_text())
    assert man["format"] == "torchscript" and man["name"] == "tiny" and man["version"] == 1
    assert man["input"]["size"] == 128 and man["preprocessing"]["size"] == 128
    assert {"residual", "alm"} <= set(man["scores"]) and man["primary_score"] in man["scores"]
    for k in man["scores"]:
        c = man["calibration"][k]
        assert len(c["percentiles"]) == 101 and c["threshold_percentile"] == 95
        tail = TailFit.model_validate(c["tail"])  # the threshold is the fitted tail's 95th percentile
        assert c["threshold"] == pytest.approx(tail.quantile(0.95))
        assert c["map_scale"] > 0 if man["scores"][k]["map"] else c["map_scale"] is None  # alm_raw has no map
    assert man["training"]["config"]["epochs"] == 10
    assert set(man["evaluation"]["held_out"]) == set(man["scores"])
    assert "abnormal training scans" in man["evaluation"]["held_out_evidence"]  # the phantom ships some


def test_manifest_says_how_to_make_the_model_again_and_names_no_folder_of_this_machine(tiny_model) -> None:
    text = (tiny_model.version_dir / "manifest.json").read_text()
    assert str(tiny_model.data_root) not in text and '"/' not in text
    how = json.loads(text)["training"]["reproduce"]
    train_cmd, export_cmd = how["commands"]
    assert train_cmd.startswith("python -m training.train --data_root data --output_dir runs ")
    assert export_cmd.startswith("python -m training.export --model_dir best-epoch=")
    code = how["code"]  # this checkout's commit (a source tree without git records none)
    assert code is None or len(code["commit"]) == 40
    ckpt = load_checkpoint(tiny_model.ckpt)
    data = how["data"]
    assert data["train"] == sorted(ckpt["train_files"]) and data["validation"] == sorted(ckpt["val_files"])
    listing = subprocess.run(["md5sum", *sorted(data["train"] + data["validation"])], capture_output=True, text=True,
                             cwd=tiny_model.data_root / "OCT2017", check=True).stdout
    assert hashlib.sha256(listing.encode()).hexdigest() == data["md5sum_sha256"]  # what `md5sum` gives a user


def test_scorer_loads_without_training_and_matches_eager(tiny_model) -> None:
    files = sorted((tiny_model.data_root / "OCT2017" / "test").glob("*/*.jpeg"))[:6]
    served = score_without_training(tiny_model.version_dir, files)

    ckpt = load_checkpoint(tiny_model.ckpt)
    manifest, _ = load_scorer(tiny_model.version_dir)
    eager, _, _ = build_scorer(ckpt, top_fraction=0.01)
    cfg = manifest.preprocessing_config()
    fit_normal_statistics(eager, ckpt, tiny_model.data_root / "OCT2017", cfg, "cpu")  # seeded: the exported bank
    x = torch.stack([torch.from_numpy(preprocess(Image.open(f), cfg)) for f in files])[:, None]
    with torch.no_grad():
        expected = eager(x)
    for k, v in served.items():
        np.testing.assert_allclose(v, expected[k].numpy(), rtol=1e-4, atol=1e-6)


def test_inference_writes_report_and_beats_chance(tiny_model, tmp_path: Path) -> None:
    out = tmp_path / "inference"
    proc = subprocess.run([sys.executable, "-m", "training.inference", "--model_dir", str(tiny_model.ckpt),
                           "--data_root", str(tiny_model.data_root), "--device", "cpu", "--output", str(out)],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    print(proc.stdout)  # the AUROC table, visible with pytest -s / in the CI log on failure
    for name in ("scores.csv", "metrics.json", "roc_normal_vs_rest.png", "score_histograms.png", "grid_CNV.png",
                 "grid_NORMAL.png"):
        assert (out / name).is_file(), name
    results = json.loads((out / "metrics.json").read_text())["results"]
    assert set(results) == {"NORMAL vs rest", "CNV vs NORMAL", "DME vs NORMAL", "DRUSEN vs NORMAL"}
    best = max(results["NORMAL vs rest"][k]["auroc"] for k in ("residual", "alm"))
    assert best > 0.55, f"phantom NORMAL-vs-rest AUROC {best:.3f} is not above chance"
    pixel = json.loads((out / "metrics.json").read_text())["pixel"]  # the phantom writes lesion masks
    maps = [m for m in json.loads((tiny_model.version_dir / "manifest.json").read_text())["maps"]
            if m != "reconstruction"]
    assert set(pixel) == set(maps)
    assert all(0.0 <= v[m] <= 1.0 for v in pixel.values() for m in ("auroc", "aupro"))
    assert max(v["auroc"] for v in pixel.values()) > 0.6, pixel


def test_resume_continues_the_same_run(tiny_model, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(tiny_model.run_dir, run)
    ckpt = load_checkpoint(run / "last.ckpt")
    ckpt["run_dir_path"] = str(run)
    torch.save(ckpt, run / "last.ckpt")
    proc = subprocess.run([sys.executable, "-m", "training.train", "--resume", str(run), "--epochs", "11",
                           "--device", "cpu", "--num_workers", "0", "--batch_size", "8"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "resuming" in proc.stdout
    resumed = load_checkpoint(run / "last.ckpt")
    assert resumed["state"]["epoch"] == 11
    # the command that started the run, then the resume's own
    assert [c.split()[3] for c in resumed["train_config"]["commands"]] == ["--data_root", "--resume"]
    assert len((run / "metrics.csv").read_text().splitlines()) == 1 + 11


def test_export_versions_are_immutable_and_increment(tiny_model, tmp_path: Path) -> None:
    store = tmp_path / "store"
    shutil.copytree(tiny_model.store, store)
    base = [sys.executable, "-m", "training.export", "--model_dir", str(tiny_model.run_dir), "--model_store",
            str(store), "--name", "tiny"]
    again = subprocess.run([*base, "--version", "1"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert again.returncode != 0 and "already exists" in again.stderr
    nxt = subprocess.run(base, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert nxt.returncode == 0, nxt.stderr[-2000:]
    assert (store / "tiny" / "2" / "manifest.json").is_file()


@pytest.mark.parametrize(("args", "message"), [
    (["training.train", "--data_root", "/nonexistent", "--device", "cpu"], "holds no OCT2017"),
    (["training.train", "--data_root", ".", "--batch_size", "0"], "--batch_size must be positive"),
    (["training.export", "--model_dir", "/nonexistent.ckpt"], "does not exist"),
    (["training.inference", "--model_dir", "/nonexistent.ckpt"], "does not exist"),
])
def test_cli_errors_are_messages_not_tracebacks(args: list[str], message: str) -> None:
    proc = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode != 0
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_gpu_request_without_cuda_falls_back(tiny_model, tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    proc = subprocess.run([sys.executable, "-m", "training.train", "--data_root", str(tiny_model.data_root),
                           "--device", "gpu", "--epochs", "1", "--image_size", "32", "--n_hiddens", "8",
                           "--n_residual_hiddens", "4", "--n_residual_layers", "1", "--embedding_dim", "4",
                           "--n_embeddings", "8", "--num_workers", "0", "--save", "False"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "CUDA is not available" in proc.stderr
    assert not (tmp_path / "saved_models").exists()


def test_real_scan_goes_through_the_exported_scorer(tiny_model) -> None:
    manifest, scorer = load_scorer(tiny_model.version_dir)
    real = sorted((ROOT / "tests" / "data" / "kermany").rglob("*.jpeg"))[0]
    x = torch.from_numpy(preprocess(Image.open(real), manifest.preprocessing_config()))[None, None]
    with torch.no_grad():
        out = scorer(x)
    assert all(torch.isfinite(out[k]).all() for k in manifest.scores)
