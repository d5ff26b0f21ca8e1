"""The container scripts run for real on this host: the health probe against a live HTTP server, the entrypoint's
choice of model store (the mounted volume, else the image's own with the shipped model), and its `train` mode end
to end (phantom → train → export into a model store)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from deployfiles import ROOT

from octcore.manifest import list_versions, read_manifest, resolve_version_dir

ENTRYPOINT = ROOT / "docker" / "entrypoint.sh"
HEALTHCHECK = ROOT / "docker" / "healthcheck.py"
VENV_BIN = str(Path(sys.executable).parent)


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OCT_", "TRAIN_", "PHANTOM_", "EXPORT_"))}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"  # `python` in the scripts is this venv's
    env["PYTHONPATH"] = str(ROOT)
    env.update(extra)
    return env


class _Probe(BaseHTTPRequestHandler):
    status = {"/readyz": 200, "/healthz": 200, "/loading": 503}

    def do_GET(self) -> None:
        self.send_response(self.status.get(self.path, 404))
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def http_port() -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Probe)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def _probe(path: str, port: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(HEALTHCHECK), path], env=_env(OCT_PORT=str(port)),
                          capture_output=True, text=True, timeout=30)


def test_healthcheck_passes_on_200(http_port) -> None:
    assert _probe("/readyz", http_port).returncode == 0


def test_healthcheck_fails_while_not_ready(http_port) -> None:
    r = _probe("/loading", http_port)
    assert r.returncode == 1 and "503" in r.stderr


def test_healthcheck_fails_when_nothing_listens(http_port) -> None:
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    free = s.getsockname()[1]
    s.close()
    assert _probe("/readyz", free).returncode == 1


def _fake_version(store: Path, name: str = "m", version: int = 1) -> None:
    d = store / name / str(version)
    d.mkdir(parents=True)
    (d / "manifest.json").write_text("{}")


def _served_store(tmp_path: Path, volume: Path, image: Path, **env: str) -> str:
    r = subprocess.run(["bash", str(ENTRYPOINT), "python", "-c", "import os; print(os.environ['OCT_MODEL_STORE'])"],
                       env=_env(OCT_MODEL_STORE=str(volume), IMAGE_MODEL_STORE=str(image), **env),
                       capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def test_the_shipped_model_is_served_from_the_image_until_the_volume_holds_the_model_asked_for(tmp_path) -> None:
    """What compose and Kubernetes start with: an empty volume, the image's store holding every version of the
    shipped model. Setting OCT_MODEL_NAME to the trained model's name serves it from the volume; setting the shipped
    name again goes back."""
    from service.settings import SHIPPED_MODEL

    volume, image = tmp_path / "models", tmp_path / "image"
    volume.mkdir()
    shutil.copytree(ROOT / "model_store" / SHIPPED_MODEL, image / SHIPPED_MODEL)  # what Dockerfile.gpu copies
    (image / "README.md").write_text("docker/baked_model/README.md lands here too")

    def served(**env: str) -> Path:
        return Path(_served_store(tmp_path, volume, image, **env))

    assert served() == image  # no OCT_MODEL_NAME: the service's default
    assert served(OCT_MODEL_NAME=SHIPPED_MODEL, OCT_MODEL_VERSION=" Latest") == image
    assert served(OCT_MODEL_NAME="vqvae") == volume  # in neither: the service then says what is missing where
    _fake_version(volume, "vqvae", 1)  # the train profile or Job exported vqvae/1
    assert served(OCT_MODEL_NAME="vqvae") == served(OCT_MODEL_NAME="vqvae", OCT_MODEL_VERSION="1") == volume
    assert served(OCT_MODEL_NAME=SHIPPED_MODEL) == served(OCT_MODEL_NAME=SHIPPED_MODEL, OCT_MODEL_VERSION="1") == image
    incoming = volume / SHIPPED_MODEL / ".incoming-1"  # a copy on its way in (docs/deploy.md) is no version
    incoming.mkdir(parents=True)
    (incoming / "manifest.json").write_text("{}")
    assert served(OCT_MODEL_NAME=SHIPPED_MODEL) == image
    _fake_version(volume, SHIPPED_MODEL, 7)  # a store filled by hand under that name wins, for the versions it holds
    assert served(OCT_MODEL_NAME=SHIPPED_MODEL) == volume
    assert served(OCT_MODEL_NAME=SHIPPED_MODEL, OCT_MODEL_VERSION="1") == image


def test_entrypoint_names_the_services_default_model() -> None:
    from service.settings import SHIPPED_MODEL

    assert f"\nSHIPPED_MODEL={SHIPPED_MODEL}\n" in ENTRYPOINT.read_text()


def test_train_refuses_the_shipped_models_name(tmp_path) -> None:
    from service.settings import SHIPPED_MODEL

    r = subprocess.run(["bash", str(ENTRYPOINT), "train"], env=_env(EXPORT_NAME=SHIPPED_MODEL,
                       OCT_MODEL_STORE=str(tmp_path)), capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert r.returncode == 2 and "EXPORT_NAME" in r.stderr and not list(tmp_path.iterdir())


def test_entrypoint_execs_the_command(tmp_path) -> None:
    r = subprocess.run(["bash", str(ENTRYPOINT), "bash", "-c", "exit 7"], env=_env(), capture_output=True,
                       text=True, timeout=60, cwd=tmp_path)
    assert r.returncode == 7


def test_train_refuses_arguments(tmp_path) -> None:
    r = subprocess.run(["bash", str(ENTRYPOINT), "train", "--epochs", "3"], env=_env(EXPORT_NAME="m",
                       OCT_MODEL_STORE=str(tmp_path)), capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert r.returncode == 2 and "TRAIN_ARGS" in r.stderr


@pytest.mark.slow
def test_train_mode_exports_a_new_version_from_phantom_data(tmp_path) -> None:
    """What `docker compose --profile train run train` does, on this host: no dataset mounted → phantom data,
    a tiny training run, export of that run (not an older one) into the store as EXPORT_VERSION."""
    data, runs, store = tmp_path / "data", tmp_path / "runs", tmp_path / "store"
    data.mkdir()
    older = runs / "train" / "0000-older-run"  # sorts first; the entrypoint must export the run it just made
    older.mkdir(parents=True)
    (older / "best-epoch=00-val_loss=0.0000.ckpt").write_bytes(b"not a checkpoint")
    env = _env(
        EXPORT_NAME="tiny", OCT_MODEL_STORE=str(store), TRAIN_DATA_DIR=str(data), TRAIN_RUNS_DIR=str(runs),
        TRAIN_DEVICE="cpu", EXPORT_VERSION="3",
        PHANTOM_ARGS="--train-normal 48 --test-per-class 6 --seed 3 --workers 1",
        TRAIN_ARGS="--image_size 64 --epochs 1 --batch_size 8 --n_hiddens 16 --n_residual_hiddens 8 "
                   "--n_residual_layers 1 --embedding_dim 8 --n_embeddings 16 --num_workers 0 --seed 0",
        OMP_NUM_THREADS="1",
    )
    r = subprocess.run(["bash", str(ENTRYPOINT), "train"], env=env, capture_output=True, text=True,
                       timeout=600, cwd=tmp_path)
    assert r.returncode == 0, f"{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    assert "generating a phantom dataset" in r.stderr
    assert list_versions(store, "tiny") == [3]
    manifest = read_manifest(resolve_version_dir(store, "tiny"))
    assert manifest.name == "tiny" and manifest.version == 3
