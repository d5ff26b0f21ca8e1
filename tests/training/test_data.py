from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from octcore.preprocess import Preprocessing
from training.data import (
    Augment,
    DataError,
    OCTImages,
    list_images,
    resolve_data_root,
    split_train_val,
    train_loader,
)


def make_tree(root: Path, folder: str = "OCT2017", n: int = 6) -> Path:
    d = root / folder / "train" / "NORMAL"
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        ext = [".jpeg", ".jpg", ".png"][i % 3]
        Image.fromarray((rng.random((40, 50)) * 255).astype(np.uint8)).save(d / f"NORMAL-{100 + i // 2}-{i}{ext}")
    (d / "notes.txt").write_text("not an image")
    return root / folder


@pytest.mark.parametrize("folder", ["OCT2017", "OCT2017 "])
def test_data_root_accepts_parent_and_trailing_space(tmp_path: Path, folder: str) -> None:
    oct_root = make_tree(tmp_path, folder)
    assert resolve_data_root(tmp_path) == oct_root
    assert resolve_data_root(oct_root) == oct_root
    assert len(list_images(oct_root, "train", "NORMAL")) == 6


def test_data_root_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    oct_root = make_tree(tmp_path)
    monkeypatch.setenv("OCT_DATA_ROOT", str(tmp_path))
    assert resolve_data_root(None) == oct_root
    monkeypatch.delenv("OCT_DATA_ROOT")
    with pytest.raises(DataError, match="--data_root"):
        resolve_data_root(None)
    with pytest.raises(DataError, match="holds no OCT2017"):
        resolve_data_root(tmp_path / "nowhere")


def test_split_is_seeded_and_by_patient() -> None:
    files = [Path(f"NORMAL-{p}-{i}.jpeg") for p in range(30) for i in range(3)]
    a_train, a_val = split_train_val(files, 0.1, seed=1)
    _, b_val = split_train_val(files, 0.1, seed=1)
    assert a_val == b_val and len(a_val) == 9
    assert not {f.name.split("-")[1] for f in a_val} & {f.name.split("-")[1] for f in a_train}
    assert split_train_val(files, 0.1, seed=2)[1] != a_val


def test_augmentation_is_train_only_and_reproducible(tmp_path: Path) -> None:
    oct_root = make_tree(tmp_path)
    files = list_images(oct_root, "train", "NORMAL")
    cfg = Preprocessing(size=32)
    plain = OCTImages(files, cfg)
    aug = OCTImages(files, cfg, Augment(), seed=3)
    assert plain[0].shape == (1, 32, 32)
    assert torch.equal(aug[0], aug[0])  # same (seed, epoch, index) → same augmentation
    assert not all(torch.allclose(plain[i], aug[i]) for i in range(len(files)))


def test_cache_matches_direct_loading(tmp_path: Path) -> None:
    oct_root = make_tree(tmp_path)
    files = list_images(oct_root, "train", "NORMAL")
    cfg = Preprocessing(size=32)
    direct = OCTImages(files, cfg)
    cached = OCTImages(files, cfg, cache_dir=tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 1
    for i in range(len(files)):
        torch.testing.assert_close(cached[i], direct[i], atol=2e-3, rtol=0)  # float16 storage


def test_persistent_workers_see_each_epoch(tmp_path: Path) -> None:
    """The configuration users run (workers > 0, persistent): each epoch's augmentation must be new. Workers hold
    their own copy of the dataset, so an epoch set on the main process's copy never reached them."""
    oct_root = make_tree(tmp_path)
    ds = OCTImages(list_images(oct_root, "train", "NORMAL"), Preprocessing(size=32), Augment(), seed=3)
    loader = train_loader(ds, batch_size=3, num_workers=2, seed=0)
    assert loader.persistent_workers
    epochs = []
    for epoch in (1, 2):
        loader.sampler.set_epoch(epoch)
        ds.epoch = epoch  # what the training loop used to rely on
        epochs.append(torch.cat(list(loader)))
    expected = [torch.stack([ds[(e, i)] for i in range(len(ds))]) for e in (1, 2)]
    for got, want in zip(epochs, expected, strict=True):  # every image is its epoch's augmentation of some file
        assert all(any(torch.equal(g, w) for w in want) for g in got)
    assert not any(torch.equal(a, b) for a in epochs[0] for b in epochs[1])
