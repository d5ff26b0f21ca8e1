"""Shared fixtures. `tiny_model` runs the real pipeline (phantom → train → export) once per test session through the
same command-line entry points a user runs, for the tests of training and of a trained model's numbers.
`fixture_model` and `retina_model` are the service's: scorers with the shipped export's outputs that cost nothing
(bench/null_scorer.py), whose maps are half their input, so a test knows what every answer must be."""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

# Tests run servers, clients and trainers side by side on 2 cores; several multi-threaded torch processes spinning on
# the same cores run 10-20x slower than single-threaded ones. Subprocesses inherit this.
os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parents[1]
KERMANY = ROOT / "tests" / "data" / "kermany"
SHIPPED = ROOT / "model_store" / "kermany-oct" / "1"  # the template of the fixture scorers' manifests
SLOW_WORK = 1500  # 256² matrix products a batch of `slow_model`: about a second on one core of the development box
sys.path.insert(0, str(ROOT))  # bench/
from bench.null_scorer import build_null_store  # noqa: E402

# Small enough to train in under a minute on one CPU core, big enough (128 px, 10 epochs) that lesions are resolved
# and the phantom AUROC is above chance.
TINY_TRAIN_ARGS = [
    "--image_size", "128", "--epochs", "10", "--batch_size", "8", "--n_hiddens", "32", "--n_residual_hiddens", "16",
    "--n_residual_layers", "2", "--embedding_dim", "16", "--n_embeddings", "32", "--learning_rate", "3e-3",
    "--device", "cpu", "--num_workers", "0", "--seed", "0",
]


# A prior small enough to add seconds, not minutes: a few layers, a few epochs over the tiny run's 32×32 code grids.
TINY_PRIOR_ARGS = ["--epochs", "3", "--batch_size", "16", "--n_layers", "4", "--n_channels", "32",
                   "--learning_rate", "3e-3", "--device", "cpu", "--seed", "0"]


@dataclass(frozen=True)
class StoredModel:
    store: Path
    name: str
    version: int

    @property
    def version_dir(self) -> Path:
        return self.store / self.name / str(self.version)


@dataclass(frozen=True)
class TinyModel(StoredModel):
    data_root: Path
    run_dir: Path
    ckpt: Path


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 600) -> str:
    """Run `python -m <args>`; fail the test with the command's output when it exits non-zero."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.run([sys.executable, "-m", *args], cwd=cwd or ROOT, env=full_env, capture_output=True,
                          text=True, timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(f"python -m {' '.join(args)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n"
                    f"{proc.stderr[-3000:]}")
    return proc.stdout + proc.stderr


def built_once(tmp_path_factory: pytest.TempPathFactory, name: str, build: Callable[[Path], None]) -> Path:
    """A folder `build` fills once per test run, shared by every pytest-xdist worker: the first to ask builds it
    under a file lock, the others wait and reuse it (each worker training its own copy costs a core for a minute)."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the run's folder, above each worker's own
    target = root / name
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / ".built").exists():
            shutil.rmtree(target, ignore_errors=True)
            target.mkdir()
            build(target)
            (target / ".built").touch()
    return target


def _best_checkpoint(runs: Path) -> Path:
    """The best checkpoint of the one run training wrote under `runs`."""
    return next(next(p for p in sorted(runs.iterdir()) if p.is_dir()).glob("best-*.ckpt"))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    def build(base: Path) -> None:
        run_cli("training.phantom", str(base / "data"), "--train-normal", "96", "--test-per-class", "12", "--seed", "7")
        run_cli("training.train", "--data_root", str(base / "data"), "--output_dir", str(base / "runs"),
                *TINY_TRAIN_ARGS)
        run_cli("training.export", "--model_dir", str(_best_checkpoint(base / "runs")), "--model_store",
                str(base / "store"), "--name", "tiny", "--version", "1")

    base = built_once(tmp_path_factory, "tiny", build)
    ckpt = _best_checkpoint(base / "runs")
    return TinyModel(data_root=base / "data", run_dir=ckpt.parent, ckpt=ckpt, store=base / "store", name="tiny",
                     version=1)


@pytest.fixture(scope="session")
def tiny_prior_model(tiny_model: TinyModel, tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    """`tiny_model`'s run, copied (the original stays prior-free), with a tiny latent prior trained by
    `training.train_prior` and exported with it into a store of its own."""
    def build(base: Path) -> None:
        run_dir = base / "runs" / tiny_model.run_dir.name
        shutil.copytree(tiny_model.run_dir, run_dir)
        run_cli("training.train_prior", "--model_dir", str(run_dir / tiny_model.ckpt.name), *TINY_PRIOR_ARGS)
        run_cli("training.export", "--model_dir", str(run_dir / tiny_model.ckpt.name), "--model_store",
                str(base / "store"), "--name", "tiny", "--version", "1")

    base = built_once(tmp_path_factory, "tiny-prior", build)
    run_dir = base / "runs" / tiny_model.run_dir.name
    return TinyModel(data_root=tiny_model.data_root, run_dir=run_dir, ckpt=run_dir / tiny_model.ckpt.name,
                     store=base / "store", name="tiny", version=1)


@pytest.fixture(scope="session")
def fixture_model(tmp_path_factory: pytest.TempPathFactory) -> StoredModel:
    """The service tests' scorer: the shipped model's manifest (scores, calibration, whole-scan input) at 64², and a
    scorer that costs nothing (bench/null_scorer.py)."""
    store = tmp_path_factory.mktemp("fixture-store")
    build_null_store(SHIPPED, store, size=64, name="fixture")
    return StoredModel(store=store, name="fixture", version=1)


@pytest.fixture(scope="session")
def retina_model(tmp_path_factory: pytest.TempPathFactory) -> StoredModel:
    """`fixture_model` whose input is the retina band (preprocessing region `retina`), at 64²."""
    store = tmp_path_factory.mktemp("retina-store")
    build_null_store(SHIPPED, store, size=64, name="retina", region="retina")
    return StoredModel(store=store, name="retina", version=1)


@pytest.fixture(scope="session")
def slow_model(tmp_path_factory: pytest.TempPathFactory) -> StoredModel:
    """`fixture_model` whose every batch takes about a second of CPU (matrix products), whatever its size: for tests
    that need requests to wait for the model (a full queue, a drain under load)."""
    store = tmp_path_factory.mktemp("slow-store")
    build_null_store(SHIPPED, store, size=64, name="slow", work=SLOW_WORK)
    return StoredModel(store=store, name="slow", version=1)
