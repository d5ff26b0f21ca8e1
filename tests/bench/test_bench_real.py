"""bench/bench_real.py: pooling sample folders, the protocol's roles and folds, and its bootstrap intervals."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))
spec = importlib.util.spec_from_file_location("bench_real", ROOT / "bench" / "bench_real.py")
bench_real = importlib.util.module_from_spec(spec)
sys.modules["bench_real"] = bench_real  # its dataclasses look their module up there
spec.loader.exec_module(bench_real)
import real_protocol  # noqa: E402


def scan(folder: Path, name: str, value: int, cls: str | None = None) -> None:
    d = folder / (cls or name.split("-")[0])
    d.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 12), value, np.uint8)).save(d / name, format="PNG")


def test_pooled_folders_keep_each_content_once_and_every_name_unique(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    scan(a, "NORMAL-1-1.jpeg", 1)
    scan(a, "CNV-7-1.jpeg", 2)
    scan(b, "NORMAL-1-1.jpeg", 1)  # the same scan again: dropped
    scan(b, "CNV-7-1.jpeg", 3)  # the same name, other content (the data set reuses names): kept, renamed
    scan(b, "normal_train_1234.jpg", 4, cls="NORMAL")  # a numbered copy
    pooled = bench_real.pool_samples([a, b])
    assert [s.name for s in pooled if s.cls == "NORMAL"] == ["NORMAL-1-1.jpeg", "normal_train_1234.jpg"]
    assert [s.name for s in pooled if s.cls == "CNV"] == ["CNV-7-1.jpeg", "CNV-7-1b.jpeg"]
    assert next(s for s in pooled if s.name == "CNV-7-1b.jpeg").path == b / "CNV" / "CNV-7-1.jpeg"
    assert {s.protocol for s in pooled} == {"12x8"}
    numbered = next(s for s in pooled if s.name.startswith("normal_train"))
    assert numbered.patient == "block-49"  # 1234 // 25: numbered copies are grouped in blocks


def test_numbered_copies_report_by_block_and_a_guard_keeps_neighbours_out() -> None:
    role = real_protocol.role
    assert role("normal_train_1150.jpg", True) == "report"  # block 11: 11 % 5 == 1
    assert role("normal_train_1099.jpg", True) == "guard"  # the last numbers before a report block
    assert role("normal_train_1205.jpg", True) == "guard"  # the first after it
    assert role("normal_train_1089.jpg", True) == "select"
    assert role("normal_train_1215.jpg", True) == "select"
    # Every number of a block has one fold: a block's patients are never split between folds.
    assert {real_protocol.fold(f"normal_train_{n}.jpg", 3) for n in range(1300, 1400)} == {13 % 3}


def test_named_copies_are_split_by_patient_the_same_way_whatever_else_is_there() -> None:
    role, fold = real_protocol.role, real_protocol.fold
    for patient in range(200):
        scans = [f"NORMAL-{patient}-{i}.jpeg" for i in range(1, 4)] + [f"NORMAL-{patient}-1b.jpeg"]
        assert len({role(s, True) for s in scans}) == 1
        assert len({fold(s, 3) for s in scans}) == 1
    normal_share = np.mean([role(f"NORMAL-{p}-1.jpeg", True) == "report" for p in range(2000)])
    abnormal_share = np.mean([role(f"DME-{p}-1.jpeg", False) == "report" for p in range(2000)])
    assert 0.17 < normal_share < 0.23 and 0.46 < abnormal_share < 0.54


def scored(normal: list[float], abnormal: list[float], patients: list[str]) -> bench_real.Scored:
    scans = [bench_real.Scan(f"NORMAL-{p}-{i}.jpeg", Path("x"), "NORMAL", 512, 496)
             for i, p in enumerate(patients[:len(normal)])]
    scans += [bench_real.Scan(f"CNV-{p}-{i}.jpeg", Path("x"), "CNV", 768, 496)
              for i, p in enumerate(patients[len(normal):])]
    s = np.array(normal + abnormal, dtype=float)
    return bench_real.Scored(manifest=None, scans=scans, scores={bench_real.SERVED: s},
                             refused=~np.isfinite(s))


def test_decision_counts_a_refused_scan_as_flagged_and_reports_each_width() -> None:
    s = scored([0.1, 0.2, np.inf], [0.9, np.inf], ["1", "2", "3", "4", "5"])
    d = bench_real.decision(s, threshold=0.5)
    assert d["specificity"] == 2 / 3 and d["sensitivity"] == 1.0
    assert d["specificity 512x496"] == 2 / 3 and d["n 512x496"] == 3
    assert bench_real.auroc(np.array([0.1, np.inf]), np.array([np.inf, 0.9])) == 0.625


def test_bootstrap_intervals_resample_patients_and_cover_the_point() -> None:
    rng = np.random.default_rng(0)
    normal = list(rng.normal(0, 1, 60))
    abnormal = list(rng.normal(1.5, 1, 40))
    patients = [str(i // 3) for i in range(100)]  # 3 scans a patient
    s = scored(normal, abnormal, patients)
    ci = bench_real.bootstrap(s, threshold=0.8, reps=300, seed=0)
    point = bench_real.decision(s, 0.8)
    lo, hi = ci["specificity"]
    assert lo <= point["specificity"] <= hi and hi - lo > 0.05
    lo, hi = ci["NORMAL vs rest served"]
    assert 0.7 < lo < hi < 1.0


def test_simulated_volumes_use_the_volume_rule_and_a_window_finds_adjacent_lesion_frames() -> None:
    """Normal scores log-normal around 0.1, lesion B-scans at 0.25: under the threshold of the maximum of 32 normal
    B-scans (0.33), over that of the highest mean of 3 adjacent ones (0.21). The maximum misses even three adjacent
    lesion B-scans; a window of three finds them, and normal volumes stay clear about as often as promised (5 %)."""
    from octcore.manifest import Calibration, TailFit

    rng = np.random.default_rng(0)
    normal = list(np.exp(rng.normal(np.log(0.1), 0.4, 400)))
    s = scored(normal, [0.25] * 20, [str(i) for i in range(420)])
    tail = TailFit(family="lognormal", mu=float(np.log(0.1)), sigma=0.4)
    cal = Calibration(n=400, mean=0.1, std=0.05, percentiles=[float(v) for v in np.percentile(normal, np.arange(101))],
                      threshold_percentile=95, threshold=tail.quantile(0.95), tail=tail)
    by_max = bench_real.volumes(s, cal, reps=300)
    by_window = bench_real.volumes(s, cal.model_copy(update={"volume_window": 3}), reps=300)
    for v in (by_max, by_window):
        assert v["32 B-scans: normal volumes flagged"] < 0.12 and v["128 B-scans: normal volumes flagged"] < 0.12
    assert by_max["32 B-scans: 1 adjacent CNV flagged"] < 0.3 and by_max["32 B-scans: 3 adjacent CNV flagged"] < 0.3
    assert by_window["32 B-scans: 3 adjacent CNV flagged"] > 0.9
