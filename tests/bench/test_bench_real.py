"""bench/bench_real.py's pooling of sample folders and its patient-wise folds."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("bench_real", ROOT / "bench" / "bench_real.py")
bench_real = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench_real)


def scan(folder: Path, name: str, content: bytes) -> None:
    (folder / name.split("-")[0]).mkdir(parents=True, exist_ok=True)
    (folder / name.split("-")[0] / name).write_bytes(content)


def test_pooled_folders_keep_each_content_once_and_every_name_unique(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    scan(a, "NORMAL-1-1.jpeg", b"n1")
    scan(a, "CNV-7-1.jpeg", b"c1")
    scan(b, "NORMAL-1-1.jpeg", b"n1")  # the same scan again: dropped
    scan(b, "CNV-7-1.jpeg", b"c2")  # the same name, other content (the data set reuses names): kept, renamed
    scan(b, "NORMAL-2-1.jpeg", b"n2")
    pooled = bench_real.pool_samples([a, b])
    assert [n for n, _ in pooled["NORMAL"]] == ["NORMAL-1-1.jpeg", "NORMAL-2-1.jpeg"]
    assert [n for n, _ in pooled["CNV"]] == ["CNV-7-1.jpeg", "CNV-7-1b.jpeg"]
    assert pooled["CNV"][1][1] == b / "CNV" / "CNV-7-1.jpeg"
    assert pooled["DME"] == [] and pooled["DRUSEN"] == []


def test_folds_never_split_a_patient(tmp_path: Path) -> None:
    files = [(f"NORMAL-{p}-{i}.jpeg", tmp_path / "x") for p in range(10) for i in range(p % 3 + 1)]
    folds = bench_real.patient_folds(files, 3, seed=0)
    assert sorted(f for fold in folds for f in fold) == sorted(files)
    owners = [{bench_real.patient(Path(n)) for n, _ in fold} for fold in folds]
    assert all(not (owners[i] & owners[j]) for i in range(3) for j in range(i + 1, 3))
    assert folds == bench_real.patient_folds(files, 3, seed=0)
