"""Phantom volumes: one eye scanned as parallel B-scans, the fovea in the middle one, a lesion in a few."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from training.phantom import main, render_volume


def test_a_volume_is_one_eye_with_the_lesion_in_consecutive_frames() -> None:
    scans, lesioned = render_volume(np.random.default_rng(0), "CNV", frames=9, lesion_frames=3, height=128,
                                    width=128)
    assert scans.shape == (9, 128, 128) and scans.dtype == np.uint8
    idx = np.nonzero(lesioned)[0]
    assert len(idx) == 3 and np.all(np.diff(idx) == 1)
    healthy = [k for k in range(9) if not lesioned[k]]
    # the same eye: neighbouring healthy frames differ by speckle only, far less than two different eyes do
    other, _ = render_volume(np.random.default_rng(1), "NORMAL", frames=9, height=128, width=128)
    same = np.abs(scans[healthy[0]].astype(float) - scans[healthy[1]]).mean()
    differ = np.abs(scans[healthy[0]].astype(float) - other[healthy[0]]).mean()
    assert same < differ
    normal_scans, none = render_volume(np.random.default_rng(0), "NORMAL", frames=9, height=128, width=128)
    assert not none.any()
    # with the same seed, the lesion frames are where the normal volume differs most
    diff = np.abs(scans.astype(float) - normal_scans).reshape(9, -1).mean(axis=1)
    assert set(np.argsort(diff)[-3:]) == set(idx)


def test_cli_writes_volumes_and_their_index(tmp_path: Path) -> None:
    assert main([str(tmp_path), "--train-normal", "0", "--test-per-class", "0", "--train-abnormal", "0",
                 "--volumes", "1", "--volume-frames", "3", "--workers", "1"]) == 0
    index = json.loads((tmp_path / "volumes" / "volumes.json").read_text())
    assert index["frames"] == 3 and index["lesion_frames"]["NORMAL"] == {"NORMAL-1": []}
    for cls in ("NORMAL", "CNV", "DME", "DRUSEN"):
        frames = sorted((tmp_path / "volumes" / cls / f"{cls}-1").glob("*.jpeg"))
        assert [f.name for f in frames] == [f"{cls}-1-{k}.jpeg" for k in (1, 2, 3)]
    assert len(index["lesion_frames"]["CNV"]["CNV-1"]) == 3  # 5 lesion frames asked, 3 exist
