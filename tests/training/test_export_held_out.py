"""The held-out abnormal scans export scores to choose the primary score: bounded and seeded on real-size data."""

from __future__ import annotations

from pathlib import Path

import pytest

from training.export import held_out_abnormal, main


def make_tree(root: Path, per_class: int) -> Path:
    for c in ("NORMAL", "CNV", "DME", "DRUSEN"):
        d = root / "OCT2017" / "train" / c
        d.mkdir(parents=True)
        for i in range(per_class):
            (d / f"{c}-{i}-1.jpeg").touch()  # only listed, never opened
    return root / "OCT2017"


def test_small_sets_are_scored_whole(tmp_path: Path) -> None:
    files = held_out_abnormal(make_tree(tmp_path, 5), max_n=100, seed=0)
    assert len(files) == 15 and not any("NORMAL" in f.name for f in files)


def test_large_sets_are_a_seeded_draw(tmp_path: Path) -> None:
    oct_root = make_tree(tmp_path, 400)
    a = held_out_abnormal(oct_root, max_n=300, seed=0)
    assert len(a) == len(set(a)) == 300
    assert a == held_out_abnormal(oct_root, max_n=300, seed=0)
    assert a != held_out_abnormal(oct_root, max_n=300, seed=1)
    assert {f.parent.name for f in a} == {"CNV", "DME", "DRUSEN"}


def test_bad_held_out_flags_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--model_dir", "nowhere.ckpt", "--heldout_max", "0"]) == 2
    assert "error: --heldout_max must be positive" in capsys.readouterr().err
