"""OCT_* environment → Settings, and how `python -m service` reacts to bad settings or an unusable model."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from octcore.manifest import list_versions, resolve_version_dir
from service.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


def test_values_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OCT_API_KEYS", " k1, k2 ,,")
    monkeypatch.setenv("OCT_MODEL_VERSION", "3")
    monkeypatch.setenv("OCT_MAX_BATCH_SIZE", "32")
    monkeypatch.setenv("OCT_PACS_TIMEOUT_S", "5")
    s = Settings()
    assert s.api_keys == ["k1", "k2"] and s.model_version == 3 and s.max_batch_size == 32 and s.pacs_timeout_s == 5
    assert "k1" not in repr(s)
    monkeypatch.setenv("OCT_MODEL_VERSION", "latest")
    assert Settings().model_version is None


@pytest.mark.parametrize(("var", "value"), [("OCT_DEVICE", "tpu"), ("OCT_MAX_BATCH_SIZE", "0"),
                                            ("OCT_LOG_FORMAT", "xml"), ("OCT_PORT", "http")])
def test_invalid_values_are_refused(monkeypatch: pytest.MonkeyPatch, var: str, value: str) -> None:
    monkeypatch.setenv(var, value)
    with pytest.raises(ValidationError):
        Settings()


def run_service(env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "service"], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "OCT_DEVICE": "cpu", "OCT_PORT": "0", **env})


def test_bad_setting_exits_with_one_line() -> None:
    proc = run_service({"OCT_MAX_BATCH_SIZE": "many"})
    assert proc.returncode == 2
    assert "OCT_MAX_BATCH_SIZE" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def broken_stores(src: Path, base: Path) -> dict[str, Path]:
    """Copies of a good model version, each broken one way."""
    out = {}
    for kind in ("corrupt", "mismatched", "wrong_sha"):
        store = base / kind
        shutil.copytree(src, store / "m" / "1")
        out[kind] = store
    (out["corrupt"] / "m" / "1" / "model.pt").write_bytes(b"not a torchscript archive")
    manifest_path = out["corrupt"] / "m" / "1" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    from octcore.manifest import sha256_file  # the corrupt file must pass the checksum to reach the loader

    manifest["sha256"] = sha256_file(out["corrupt"] / "m" / "1" / "model.pt")
    manifest_path.write_text(json.dumps(manifest))
    mm = out["mismatched"] / "m" / "1" / "manifest.json"
    manifest = json.loads(mm.read_text())
    manifest["scores"]["absent"] = {"description": "not produced by this scorer", "map": "absent_map"}
    manifest["calibration"]["absent"] = manifest["calibration"][manifest["primary_score"]]
    mm.write_text(json.dumps(manifest))
    ws = out["wrong_sha"] / "m" / "1" / "model.pt"
    ws.write_bytes(ws.read_bytes() + b"\0")
    return out


@pytest.mark.slow
def test_unusable_model_exits_non_zero_with_a_reason(fixture_model, tmp_path: Path) -> None:
    stores = broken_stores(fixture_model.version_dir, tmp_path)
    cases = {"missing": (tmp_path / "nowhere", "no versions"), "corrupt": (stores["corrupt"], "cannot load"),
             "mismatched": (stores["mismatched"], "absent"), "wrong_sha": (stores["wrong_sha"], "sha256")}
    for name, (store, reason) in cases.items():
        proc = run_service({"OCT_MODEL_STORE": str(store), "OCT_MODEL_NAME": "m"})
        last = proc.stderr.strip().splitlines()[-1]
        assert proc.returncode == 1, f"{name}: exit {proc.returncode}\n{proc.stderr[-2000:]}"
        assert last.startswith("oct-service: cannot load model:") and reason in last, f"{name}: {last}"


def test_safety_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OCT_ALLOW_ANONYMOUS", "true")
    monkeypatch.setenv("OCT_MAX_INFLIGHT_BYTES", "2048")
    monkeypatch.setenv("OCT_RESULTS_RETENTION_DAYS", "0")
    s = Settings()
    assert s.allow_anonymous and s.max_inflight_bytes == 2048 and s.results_retention_days == 0
    monkeypatch.setenv("OCT_MAX_INFLIGHT_VOXELS", "0")
    with pytest.raises(ValidationError):
        Settings()


def test_public_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OCT_PUBLIC_URL", " https://gateway.example:8443/oct/ ")
    assert Settings().public_url == "https://gateway.example:8443/oct"  # no trailing slash: paths are appended
    for bad in ("gateway.example/oct", "ftp://gateway.example", "https://", "https://gateway.example:99999",
                "https://gateway.example/oct?x=1", "https://gateway.example/#top"):
        monkeypatch.setenv("OCT_PUBLIC_URL", bad)
        with pytest.raises(ValidationError):
            Settings()


def test_the_default_model_is_the_newest_shipped_one_from_any_directory(monkeypatch: pytest.MonkeyPatch,
                                                                      tmp_path: Path) -> None:
    for var in ("OCT_MODEL_STORE", "OCT_MODEL_NAME", "OCT_MODEL_VERSION"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)
    s = Settings()
    assert s.model_store == ROOT / "model_store" and s.model_name == "kermany-oct" and s.model_version is None
    newest = list_versions(s.model_store, s.model_name)[-1]
    assert resolve_version_dir(s.model_store, s.model_name) == ROOT / "model_store" / "kermany-oct" / str(newest)
    monkeypatch.setenv("OCT_MODEL_STORE", "elsewhere")
    monkeypatch.setenv("OCT_MODEL_NAME", "phantom")
    s = Settings()
    assert s.model_store == Path("elsewhere") and s.model_name == "phantom"
