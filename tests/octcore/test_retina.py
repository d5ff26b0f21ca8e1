"""Finding the retina (octcore/retina.py) on real scans of every protocol, and refusing what is not one."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from octcore.preprocess import Preprocessing, fill_border_padding, preprocess_gray
from octcore.retina import NoRetinaError, find_retina

DATA = Path(__file__).resolve().parents[1] / "data"
# Every protocol the shipped model serves: 512×496, 512×512, 768×496, 1,536×496, and the abnormal classes.
REAL = sorted([*DATA.glob("kermany/*.jpeg"), *DATA.glob("kermany-c8/*.jpg")])
# The traced layers of each real test scan, median over columns (box rows): pinned, so that a change to the tracing
# (which changes the input of every model trained on the retina band) is a deliberate one.
PINNED = {  # name: (reference under the RPE, ILM)
    "normal_train_1090.jpg": (171.6, 92.4), "normal_train_1206.jpg": (260.4, 186.4),
    "normal_train_1207.jpg": (375.4, 300.5), "normal_train_2091.jpg": (255.4, 176.8),
    "CNV-103044-2.jpeg": (172.3, 80.2), "CNV-154835-1.jpeg": (222.5, 144.8), "DME-1102486-1.jpeg": (281.2, 157.0),
    "DME-30521-11.jpeg": (215.4, 126.2), "DRUSEN-1487749-3.jpeg": (207.7, 143.5),
    "DRUSEN-228939-1.jpeg": (198.5, 116.2), "NORMAL-1017237-1.jpeg": (287.5, 206.5),
    "NORMAL-1759350-1.jpeg": (247.2, 170.5),
}
CFG = Preprocessing(size=128, region="retina")


def gray(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("L"))


def test_every_protocol_is_among_the_test_scans() -> None:
    sizes = {Image.open(f).size for f in REAL}
    assert {(512, 496), (512, 512), (768, 496), (1536, 496)} <= sizes
    assert set(PINNED) == {f.name for f in REAL}


@pytest.mark.parametrize("path", REAL, ids=lambda p: p.name)
def test_real_scans_are_traced_where_their_layers_are(path: Path) -> None:
    x, geo = preprocess_gray(gray(path), CFG)
    r = geo.retina
    assert r is not None and geo.band_top is not None
    ref, ilm = PINNED[path.name]
    assert np.median(r.reference) == pytest.approx(ref, abs=1.0)
    assert np.median(r.ilm) == pytest.approx(ilm, abs=1.0)
    # The retina is 60-90 rows thick on these scans (about 250-350 µm at 3.9 µm a row).
    assert 55 <= r.thickness <= 95
    # Flattened: the RPE is the band's brightest row, at the line it was flattened to, on every protocol.
    ridge = int(x.mean(axis=1).argmax())
    line = CFG.band_above * CFG.size / (CFG.band_above + CFG.band_below)
    assert line - 8 <= ridge <= line + 2


def junk() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    shape = (496, 512)
    text = Image.new("L", shape[::-1], 0)
    ImageDraw.Draw(text).text((100, 200), "NOT A RETINA", fill=255)
    return {
        "noise": rng.random(shape), "speckle": rng.gamma(1.0, 0.1, shape), "black": np.zeros(shape),
        "gray": np.full(shape, 0.5), "horizontal gradient": np.tile(np.linspace(0, 1, shape[1]), (shape[0], 1)),
        "vertical gradient": np.tile(np.linspace(0, 1, shape[0])[:, None], (1, shape[1])),
        "one line": np.where(np.abs(np.arange(shape[0])[:, None] - 250) < 3, 0.8, 0.05) + rng.random(shape) * 0.05,
        "text": np.asarray(text) / 255.0,
    }


@pytest.mark.parametrize("name", list(junk()))
def test_what_is_not_a_retina_is_refused_with_a_reason(name: str) -> None:
    image = (junk()[name] * 255).astype(np.float32)
    with pytest.raises(NoRetinaError) as e:
        find_retina(image)
    assert str(e.value) and "\n" not in str(e.value)
    with pytest.raises(NoRetinaError):
        preprocess_gray((junk()[name] * 255).astype(np.uint8), CFG)


def test_a_tiny_image_is_refused() -> None:
    with pytest.raises(NoRetinaError, match="too small"):
        find_retina(np.zeros((10, 300), np.float32))


def test_a_tilted_retina_is_flattened() -> None:
    """A synthetic retina on a slope of 1 row in 4 columns: after flattening, its layers are horizontal."""
    rng = np.random.default_rng(1)
    h, w = 496, 512
    rows = np.arange(h)[:, None]
    rpe = 150 + np.arange(w)[None, :] / 4  # 150 → 278
    img = 20 + rng.normal(0, 6, (h, w))
    img += np.where((rows > rpe - 80) & (rows < rpe - 6), 70, 0)  # the retina's tissue
    img += 160 * np.exp(-0.5 * ((rows - rpe) / 3.0) ** 2)  # the RPE
    img += np.where(rows > rpe + 6, 40, 0) * np.exp(-(rows - rpe) / 60.0)  # the choroid, fading
    x, geo = preprocess_gray(np.clip(img, 0, 255).astype(np.uint8), CFG)
    ridge_rows = x.argmax(axis=0)[8:-8]  # the RPE's row in every input column
    assert np.ptp(ridge_rows) <= 2  # flat (it climbed 128 rows, 64 input rows, before)
    assert geo.band_top is not None and geo.band_top[96] - geo.band_top[32] == pytest.approx(64, abs=3)


def test_a_scan_whose_white_wedges_are_painted_is_traced_alike() -> None:
    """find_retina wants margins painted dark; preprocessing paints them, so its retina matches a direct call."""
    path = DATA / "kermany" / "NORMAL-1759350-1.jpeg"
    g = gray(path)
    _, geo = preprocess_gray(g, CFG)
    x0, y0, x1, y1 = geo.box
    direct = find_retina(fill_border_padding(g[y0:y1, x0:x1] / 255.0, CFG) * 255.0)
    assert geo.retina is not None
    np.testing.assert_allclose(direct.reference, geo.retina.reference, atol=0.5)
