"""The synthetic OCT phantom: layout, naming, determinism, lesions where they belong, CLI errors, real samples."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from training.phantom import (
    CLASSES,
    PhantomError,
    generate,
    image_rng,
    main,
    mask_path,
    render_bscan,
    render_bscan_and_mask,
)

ROOT = Path(__file__).resolve().parents[2]
KERMANY = ROOT / "tests" / "data" / "kermany"
NAME = re.compile(r"^(NORMAL|CNV|DME|DRUSEN)-(\d+)-(\d+)\.jpeg$")
DISEASES = ("CNV", "DME", "DRUSEN")


def _files(root: Path) -> dict[str, bytes]:
    base = root / "OCT2017"
    return {str(p.relative_to(base)): p.read_bytes() for p in sorted(base.rglob("*.jpeg"))}


@pytest.fixture(scope="module")
def small_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("phantom")
    generate(root, train_normal=8, test_per_class=3, seed=11, train_abnormal=2)
    return root


def test_layout_counts_and_names(small_set: Path) -> None:
    base = small_set / "OCT2017"
    expected = {"train": {"NORMAL": 8, "CNV": 2, "DME": 2, "DRUSEN": 2}, "test": dict.fromkeys(CLASSES, 3)}
    patients: dict[str, set[str]] = {"train": set(), "test": set()}
    for split, per_class in expected.items():
        for cls, n in per_class.items():
            files = sorted((base / split / cls).iterdir())
            assert len(files) == n, f"{split}/{cls}"
            for f in files:
                m = NAME.match(f.name)
                assert m and m.group(1) == cls, f.name
                patients[split].add(m.group(2))
    # A patient is never in both splits, as in the real data set (no leakage from train into test).
    assert not patients["train"] & patients["test"]
    marker = json.loads((base / "phantom.json").read_text())
    assert marker["seed"] == 11 and marker["counts"] == expected


def test_images_are_8bit_grayscale_oct_sized(small_set: Path) -> None:
    for path in (small_set / "OCT2017").rglob("*.jpeg"):
        with Image.open(path) as im:
            assert im.format == "JPEG" and im.mode == "L"
            assert im.height == 496 and im.width in (512, 768), path.name


def test_same_seed_same_bytes_regardless_of_workers(tmp_path: Path) -> None:
    args = {"train_normal": 8, "test_per_class": 2, "train_abnormal": 1}
    generate(tmp_path / "a", seed=3, workers=1, **args)
    generate(tmp_path / "b", seed=3, workers=2, **args)
    generate(tmp_path / "c", seed=4, workers=1, **args)
    a, b, c = _files(tmp_path / "a"), _files(tmp_path / "b"), _files(tmp_path / "c")
    assert len(a) == 19 and a == b
    assert a.keys() != c.keys()  # other patients …
    assert set(a.values()).isdisjoint(c.values())  # … and other images


def test_test_split_does_not_depend_on_train_size(tmp_path: Path) -> None:
    generate(tmp_path / "a", train_normal=2, test_per_class=2, seed=5, train_abnormal=0)
    generate(tmp_path / "b", train_normal=9, test_per_class=2, seed=5, train_abnormal=1)
    test_a = {k: v for k, v in _files(tmp_path / "a").items() if k.startswith("test")}
    test_b = {k: v for k, v in _files(tmp_path / "b").items() if k.startswith("test")}
    assert len(test_a) == 8 and test_a == test_b


def test_rerun_replaces_own_images_but_refuses_foreign_files(tmp_path: Path) -> None:
    generate(tmp_path, train_normal=6, test_per_class=1, seed=0, train_abnormal=0)
    generate(tmp_path, train_normal=3, test_per_class=1, seed=0, train_abnormal=0)  # smaller re-run: no leftovers
    assert len(list((tmp_path / "OCT2017" / "train" / "NORMAL").iterdir())) == 3

    other = tmp_path / "other"
    (other / "OCT2017" / "train" / "NORMAL").mkdir(parents=True)
    real_looking = other / "OCT2017" / "train" / "NORMAL" / "NORMAL-123-1.jpeg"
    real_looking.write_bytes(b"not ours")
    with pytest.raises(PhantomError, match="--overwrite"):
        generate(other, train_normal=1, test_per_class=0, seed=0, train_abnormal=0)
    assert real_looking.exists()
    generate(other, train_normal=1, test_per_class=0, seed=0, train_abnormal=0, overwrite=True)
    assert not real_looking.exists()


def test_render_is_deterministic_and_shaped() -> None:
    a = render_bscan(np.random.default_rng(1), "NORMAL")
    b = render_bscan(np.random.default_rng(1), "NORMAL")
    assert a.dtype == np.uint8 and a.shape == (496, 512)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, render_bscan(np.random.default_rng(2), "NORMAL"))
    assert render_bscan(np.random.default_rng(1), "DME", height=300, width=768).shape == (300, 768)
    with pytest.raises(ValueError, match="unknown class"):
        render_bscan(np.random.default_rng(1), "GLAUCOMA")


def test_normal_scan_looks_like_oct() -> None:
    """Dark noisy vitreous on top, a bright RPE band, a choroid that fades with depth."""
    img = render_bscan(image_rng(0, "test", "NORMAL", 0), "NORMAL").astype(np.float32)
    profile = np.median(img[:, 40:90], axis=1)  # away from the fovea (which lies in the middle 30 %)
    rpe = int(np.argmax(profile))
    ilm = int(np.argmax(profile > 2 * np.median(profile[:30])))
    assert 30 < ilm < rpe - 40, "retina about 50–150 rows thick under a vitreous"
    assert profile[rpe] > 100 and profile[rpe] > 3 * np.median(profile[:30])
    vitreous = img[5:ilm - 10, 40:90]
    assert 15 < vitreous.mean() < 50 and vitreous.std() > 5, "grainy dark vitreous"
    assert profile[rpe + 20] > profile[rpe + 200] + 20, "choroid brighter than the sclera below it"


def _tissue(img: np.ndarray) -> np.ndarray:
    """The scan as float with its white (255) registration margins blanked."""
    f = img.astype(np.float32)
    f[f >= 250] = 0.0
    return f


def _rpe_rows(img: np.ndarray) -> np.ndarray:
    """Row of the brightest band (the RPE) per column, after a little smoothing."""
    f = _tissue(img)
    f = (f[:-2] + f[1:-1] + f[2:]) / 3
    return np.argmax(f, axis=0)


def _ilm_rows(img: np.ndarray) -> np.ndarray:
    """First row per column where the (box-smoothed) signal rises above the vitreous."""
    f = _tissue(img)
    f = sum(f[i:f.shape[0] - 4 + i] for i in range(5)) / 5
    return np.argmax(f > 90, axis=0)


@pytest.mark.parametrize("index", range(3))
@pytest.mark.parametrize("cls", DISEASES)
def test_lesion_changes_only_its_region(cls: str, index: int) -> None:
    sick = render_bscan(image_rng(9, "test", cls, index), cls).astype(np.int16)
    twin = render_bscan(image_rng(9, "test", cls, index), cls, lesion=False).astype(np.int16)
    changed_cols = np.flatnonzero(np.abs(sick - twin).max(axis=0) > 0)
    assert changed_cols.size > 15, "a visible lesion"
    assert changed_cols.size < 0.8 * sick.shape[1], "the lesion is local; the rest of the scan is the same"
    assert np.array_equal(sick[:, : changed_cols[0]], twin[:, : changed_cols[0]])

    diff = sick - twin
    lifted = _rpe_rows(twin) - _rpe_rows(sick)
    thicker = _ilm_rows(twin) - _ilm_rows(sick)
    if cls == "DRUSEN":  # dome-shaped RPE elevations under an otherwise unchanged retina
        assert (lifted >= 4).sum() >= 10
        assert (thicker >= 10).sum() < (lifted >= 4).sum() / 2
    elif cls == "CNV":  # hyper-reflective lesion, a dark fluid pocket, retina lifted and thickened
        assert (diff > 60).sum() > 300 and (diff < -30).sum() > 200
        assert (lifted >= 4).sum() >= 20 and (thicker >= 10).sum() >= 20
    else:  # DME: thickened retina holding dark cystoid spaces
        assert (thicker >= 10).sum() >= 20
        assert (diff < -30).sum() > 300


@pytest.mark.parametrize("index", range(3))
@pytest.mark.parametrize("cls", DISEASES)
def test_mask_marks_what_the_lesion_changed(cls: str, index: int) -> None:
    """The mask lies where the scan differs from its healthy twin and covers what the lesion drew: drusen and PED
    material under the lifted RPE, CNV fluid and hyper-reflective material, DME cysts in the thickened retina."""
    sick, mask = render_bscan_and_mask(image_rng(9, "test", cls, index), cls)
    assert np.array_equal(sick, render_bscan(image_rng(9, "test", cls, index), cls)), "the mask draws no RNG"
    twin = render_bscan(image_rng(9, "test", cls, index), cls, lesion=False).astype(np.int16)
    diff = sick.astype(np.int16) - twin
    assert mask.shape == sick.shape and 0.0005 < mask.mean() < 0.2
    changed_cols = np.abs(diff).max(axis=0) > 0
    assert changed_cols[mask.any(axis=0)].all(), "no mask where the lesion changed nothing"
    # Strong changes around the lesion (speckle blurs them a few pixels past its edge) are mostly inside the mask;
    # what is left is the consequence, not the lesion: the retina pushed up, CNV's shadows.
    grown = mask.copy()
    for _ in range(3):
        grown[1:] |= grown[:-1].copy()
        grown[:-1] |= grown[1:].copy()
        grown[:, 1:] |= grown[:, :-1].copy()
        grown[:, :-1] |= grown[:, 1:].copy()
    assert grown[diff < -60].mean() > 0.75, "darkening (fluid, cysts, deposits under the RPE) is lesion"
    assert grown[np.abs(diff) > 60].mean() > 0.35
    assert (np.abs(diff[mask]) > 20).mean() > 0.25, "the mask is not mostly unchanged tissue"
    assert not render_bscan_and_mask(image_rng(9, "test", cls, index), cls, lesion=False)[1].any()


def test_masks_written_for_abnormal_scans_only(small_set: Path) -> None:
    base = small_set / "OCT2017"
    for split in ("train", "test"):
        assert not (base / "masks" / split / "NORMAL").exists()
        for cls in DISEASES:
            scans = sorted((base / split / cls).iterdir())
            masks = sorted((base / "masks" / split / cls).iterdir())
            assert [mask_path(base, split, cls, p.name) for p in scans] == masks
            for scan, m in zip(scans, masks, strict=True):
                with Image.open(scan) as a, Image.open(m) as b:
                    assert b.format == "PNG" and b.mode == "L" and b.size == a.size
                    assert set(np.unique(np.asarray(b))) == {0, 255}


def test_smaller_rerun_removes_stale_masks(tmp_path: Path) -> None:
    generate(tmp_path, train_normal=0, test_per_class=3, seed=0, train_abnormal=0)
    generate(tmp_path, train_normal=0, test_per_class=1, seed=0, train_abnormal=0)
    assert len(list((tmp_path / "OCT2017" / "masks" / "test" / "DME").iterdir())) == 1


def test_normal_has_no_lesion_to_remove() -> None:
    rng_a, rng_b = image_rng(2, "train", "NORMAL", 0), image_rng(2, "train", "NORMAL", 0)
    assert np.array_equal(render_bscan(rng_a, "NORMAL"), render_bscan(rng_b, "NORMAL", lesion=False))


def test_cli_writes_and_reports(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "training.phantom", str(tmp_path), "--train-normal", "3", "--test-per-class", "1",
         "--train-abnormal", "1", "--seed", "2", "--workers", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"wrote 10 images .* in [\d.]+ s \(\d+ img/s", proc.stdout), proc.stdout
    assert len(_files(tmp_path)) == 10


def test_cli_rejects_bad_arguments(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "training.phantom", str(tmp_path), "--train-normal", "-5"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--train-normal" in proc.stderr and "zero or more" in proc.stderr
    assert not (tmp_path / "OCT2017").exists()


@pytest.mark.parametrize("argv", [
    [],
    ["{root}", "--seed", "abc"],
    ["{root}", "--test-per-class", "1.5"],
    ["{root}", "--workers", "0"],
    ["{root}", "--frobnicate"],
])
def test_cli_argument_errors_exit_2(tmp_path: Path, argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main([a.format(root=tmp_path) for a in argv])
    assert exc.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_cli_refuses_foreign_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "OCT2017" / "test" / "CNV"
    folder.mkdir(parents=True)
    (folder / "notes.txt").write_text("mine")
    assert main([str(tmp_path), "--train-normal", "1", "--test-per-class", "1", "--workers", "1"]) == 1
    assert "already holds" in capsys.readouterr().err
    assert (folder / "notes.txt").read_text() == "mine"


def test_real_samples_are_8bit_grayscale_and_match_their_attribution() -> None:
    readme = (KERMANY / "README.md").read_text()
    assert "CC BY 4.0" in readme and "10.17632/rscbjbr9sj" in readme
    files = sorted(KERMANY.glob("*.jpeg"))
    assert len(files) == 8
    assert sorted(NAME.match(f.name).group(1) for f in files) == sorted(CLASSES * 2)
    widths = set()
    for f in files:
        with Image.open(f) as im:
            assert im.format == "JPEG" and im.mode == "L" and im.height == 496
            widths.add(im.width)
            assert np.asarray(im).dtype == np.uint8
        # Each file is listed with its source and the md5 of the bytes here.
        assert f"`{hashlib.md5(f.read_bytes()).hexdigest()}`" in readme, f.name
    assert 512 in widths and widths - {512}, "the standard width and a wider scan"


def test_phantom_is_compressed_like_the_real_scans(small_set: Path) -> None:
    """Same JPEG quantisation tables as the Kermany scans (IJG quality 75), and a similar bit rate: the speckle costs
    what a real scan's costs to store and to decode."""
    def tables_and_bits(path: Path) -> tuple[dict, float]:
        with Image.open(path) as im:
            return {k: list(v) for k, v in im.quantization.items()}, 8 * path.stat().st_size / (im.width * im.height)

    real = [tables_and_bits(f) for f in sorted(KERMANY.glob("*.jpeg"))]
    fake = [tables_and_bits(f) for f in sorted((small_set / "OCT2017" / "test").rglob("*.jpeg"))]
    assert all(t == real[0][0] for t, _ in real), "the real samples share one set of tables"
    assert all(t == real[0][0] for t, _ in fake)
    real_bits, fake_bits = np.median([b for _, b in real]), np.median([b for _, b in fake])
    assert 0.7 < fake_bits / real_bits < 1.4, (fake_bits, real_bits)


def test_phantom_and_real_scans_have_similar_intensity_statistics() -> None:
    """Loose guard that the phantom stays in the real scans' intensity range (see the sample images)."""
    def stats(img: np.ndarray) -> tuple[float, float, float]:
        body = img[img < 250].astype(np.float32)
        return float(np.median(body)), float(np.percentile(body, 99)), float((img >= 250).mean())

    real = [stats(np.asarray(Image.open(f))) for f in sorted(KERMANY.glob("*.jpeg"))]
    fake = [stats(render_bscan(image_rng(0, "test", c, i), c)) for c in CLASSES for i in range(2)]
    for name, values in (("real", real), ("phantom", fake)):
        med = np.median([v[0] for v in values])
        p99 = np.median([v[1] for v in values])
        assert 20 < med < 60, f"{name} median {med}"
        assert 140 < p99 < 250, f"{name} 99th percentile {p99}"


def test_white_margins_like_real_scans_and_cropped_by_shared_preprocessing() -> None:
    from octcore.preprocess import Preprocessing, crop_white_margins

    scans = [render_bscan(image_rng(1, "train", "NORMAL", i), "NORMAL") for i in range(40)]
    with_white = [a for a in scans if (a == 255).any()]
    assert 0.2 < len(with_white) / len(scans) < 0.8, "some scans, not all, carry white registration padding"
    with_strip = [a for a in scans if (a == 255).all(axis=0).any()]
    assert with_strip, "some carry a full-height white side strip"
    for a in with_strip:
        cropped, _ = crop_white_margins(a.astype(np.float32) / 255.0, Preprocessing())
        assert not (cropped >= 1.0).all(axis=0).any()
