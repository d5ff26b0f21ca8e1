"""Maps of the retina band laid back on the scan (octcore/scanmap.py), and what else follows the band."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from octcore.preprocess import Preprocessing, preprocess_gray, to_input
from octcore.scanmap import scan_size, unflatten

DATA = Path(__file__).resolve().parents[1] / "data"
CFG = Preprocessing(size=128, region="retina")


def gray(name: str) -> np.ndarray:
    with Image.open(next(DATA.glob(f"*/{name}"))) as im:
        return np.asarray(im.convert("L"))


@pytest.mark.parametrize("name", ["normal_train_2091.jpg", "DME-1102486-1.jpeg", "NORMAL-1759350-1.jpeg"])
def test_the_input_itself_laid_back_matches_the_scan(name: str) -> None:
    """Unflattening the band input must land its pixels on the scan rows they came from: compare it with the scan
    resized to the same grid, inside the band."""
    g = gray(name)
    x, geo = preprocess_gray(g, CFG)
    x0, y0, x1, y1 = geo.box
    w, h = scan_size(geo, CFG.size)
    assert w == CFG.size and h == round((y1 - y0) * CFG.size / geo.band_rows)
    back = unflatten(torch.from_numpy(x)[None] + 1.0, torch.from_numpy(geo.band_top)[None], geo.band_rows, h)[0]
    scan = np.asarray(Image.fromarray(g[y0:y1, x0:x1].astype(np.float32)).resize((w, h), Image.Resampling.BILINEAR))
    inside = back.numpy() > 0.05  # the band (the input is shifted to > 0 so that 0 means "outside")
    assert 0.35 < inside.mean() < 0.75  # 256 of 496 rows, less where the band runs off the scan
    r = np.corrcoef(back.numpy()[inside], scan[inside])[0, 1]
    assert r > 0.9


def test_outside_the_band_is_zero_and_a_shifted_column_moves_with_its_top() -> None:
    maps = torch.ones(1, 8, 8)
    top = torch.tensor([[0.0, 0, 0, 0, 16, 16, 16, 16]])  # right half of the band starts 16 box rows lower
    out = unflatten(maps, top, band_rows=32, height=12)[0]  # 48 box rows at 4 a row
    assert out[:, 0].tolist() == [1.0] * 8 + [0.0] * 4  # rows 0-31: inside, 32-47: outside
    assert out[:, 7].tolist() == [0.0] * 4 + [1.0] * 8


def test_a_mask_follows_the_band() -> None:
    """A lesion mask given over the scan lands where the lesion's pixels land in the input."""
    g = gray("DRUSEN-228939-1.jpeg")
    geo = preprocess_gray(g, CFG)[1]
    mask = np.zeros(g.shape, np.float32)
    x0, y0, _, _ = geo.box
    assert geo.retina is not None
    rpe = geo.retina.reference
    cols = np.arange(200, 260)
    for c in cols:  # a patch just above the RPE's reference line
        mask[y0 + int(rpe[c]) - 30:y0 + int(rpe[c]) - 10, x0 + c] = 1.0
    m = to_input(mask, geo, CFG) >= 0.5
    rows = np.nonzero(m.any(axis=1))[0]
    line = CFG.band_above * CFG.size / geo.band_rows  # where the reference lands: input row 96
    assert rows.min() >= line - 16 and rows.max() <= line - 4  # 30-10 scan rows above it, 2 scan rows an input row
    assert m.sum() > 0


def test_a_manifest_written_before_regions_reads_as_the_whole_scan() -> None:
    legacy = {"size": 128, "margin_threshold": 0.97, "margin_fraction": 0.95, "margin_fill": 0.0,
              "resample": "bilinear", "mean": 0.5, "std": 0.5}
    assert Preprocessing.from_dict(legacy).region == "scan"
    with pytest.raises(ValueError, match="lacks"):  # one band field without the others is not a legacy dict
        Preprocessing.from_dict({**legacy, "band_above": 10})
    with pytest.raises(ValueError, match="region"):
        Preprocessing(region="choroid")  # type: ignore[arg-type]
