"""The one preprocessing path from a decoded B-scan to the model's input.

Training, evaluation, export calibration and the service all call `preprocess_gray` (or `preprocess`); the
parameters travel in `manifest.json` (`Preprocessing`), so a served model always sees pixels prepared exactly as in
training.

Two regions of the scan can become the input. `scan`: the whole B-scan (white margins cropped) resized to the input
square. `retina`: the retina found in it (`octcore.retina`), flattened to a smooth line under its RPE, a band of
`band_above` rows over that line and `band_below` under it, resized to the square. A scan's rows are the same depth
of tissue whatever its protocol (496 rows of about 3.9 µm on Spectralis), so the band is the same tissue on every
scan, and the input spends its pixels on the retina instead of the vitreous. `Geometry` says where each input pixel
came from, so that a map of the input lands back on the scan.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
from PIL import Image

from octcore.retina import NoRetinaError, Retina, find_retina

__all__ = ["Geometry", "NoRetinaError", "Preprocessing", "preprocess", "preprocess_gray"]

# Formats a scan can arrive in: 8-bit, 16-bit, float, palette, with or without alpha.
_SIXTEEN_BIT_MODES = {"I;16", "I;16B", "I;16L", "I;16N"}


@dataclass(frozen=True)
class Preprocessing:
    """Everything needed to reproduce the model's input. Serialised verbatim into the manifest."""

    size: int = 256
    # Kermany scans carry pure-white padding at the sides/top; a row or column counts as margin when at least
    # `margin_fraction` of its pixels are brighter than `margin_threshold` (in [0, 1] units).
    margin_threshold: float = 0.97
    margin_fraction: float = 0.95
    # Registration leaves white wedges that are not whole rows (a tilted lower edge): saturated runs touching the
    # border are painted with this value (the dark of the background) so they do not read as anatomy.
    margin_fill: float = 0.0
    resample: str = "bilinear"
    # Affine map of [0, 1] intensities into the model's range: x' = (x - mean) / std, i.e. [-1, 1] by default.
    mean: float = 0.5
    std: float = 0.5
    # What becomes the input: the whole scan, or the band of rows around its retina (module docstring).
    region: Literal["scan", "retina"] = "scan"
    band_above: int = 192  # rows of the scan above the line under the RPE (room for a retina twice as thick)
    band_below: int = 64  # and under it (the RPE's own rows, Bruch's membrane, the choroid)

    def __post_init__(self) -> None:
        if self.region not in ("scan", "retina"):
            raise ValueError(f"preprocessing region {self.region!r} is not 'scan' or 'retina'")
        if self.band_above < 0 or self.band_below < 0 or self.band_above + self.band_below < 8:
            raise ValueError("preprocessing band_above and band_below must be >= 0 and span at least 8 rows")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Preprocessing:
        """Strict: every field, and nothing else. A missing field would silently take today's default and an unknown
        one would be a step this code does not perform; either way the model would see other pixels than in
        training. The one exception: a dict written before regions existed (no `region` nor band field) meant the
        whole scan, and reads as region `scan`."""
        if not {"region", "band_above", "band_below"} & set(d):
            d = {**d, "region": "scan", "band_above": cls.band_above, "band_below": cls.band_below}
        fields = set(cls.__dataclass_fields__)
        unknown, missing = sorted(set(d) - fields), sorted(fields - set(d))
        if unknown or missing:
            raise ValueError("preprocessing " + "; ".join(
                ([f"has unknown field(s) {', '.join(unknown)}"] if unknown else [])
                + ([f"lacks field(s) {', '.join(missing)}"] if missing else [])))
        return cls(**d)


_RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
             "nearest": Image.Resampling.NEAREST, "lanczos": Image.Resampling.LANCZOS}


def to_gray(image: Image.Image) -> np.ndarray:
    """Decoded image of any PIL mode → float32 (H, W) in [0, 1].

    Colour is averaged with ITU-R 601 luma weights (what `convert("L")` does), alpha is dropped, 16-bit data
    keeps its full precision instead of being truncated to 8 bits.
    """
    mode = image.mode
    if mode in _SIXTEEN_BIT_MODES:
        arr = np.asarray(image, dtype=np.float32) / 65535.0
    elif mode in ("I", "F"):
        arr = np.asarray(image, dtype=np.float32)
        hi = 65535.0 if arr.max(initial=0.0) > 255.0 else 255.0
        arr = arr / hi if mode == "I" else _minmax(arr)
    else:
        if mode == "P":
            image = image.convert("RGBA")
        if image.mode in ("RGB", "RGBA", "CMYK", "YCbCr", "LAB", "HSV"):
            image = image.convert("RGB").convert("L")
        elif image.mode != "L":
            image = image.convert("L")
        return np.asarray(image, dtype=np.float32) / 255.0  # already in [0, 1]
    return np.clip(arr, 0.0, 1.0).astype(np.float32, copy=False)


def _minmax(arr: np.ndarray) -> np.ndarray:
    lo, hi = float(arr.min(initial=0.0)), float(arr.max(initial=0.0))
    return (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)


def crop_white_margins(gray: np.ndarray, cfg: Preprocessing) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """Drop border rows/columns that are (almost) entirely white. Returns the crop and its box (x0, y0, x1, y1).

    `gray` is float [0, 1] or uint8 (value v standing for v / 255); the crop keeps its dtype.
    """
    cropped, box, _ = _crop(gray, cfg)
    return cropped, box


def _crop(gray: np.ndarray, cfg: Preprocessing) -> tuple[np.ndarray, tuple[int, int, int, int], np.ndarray]:
    """`crop_white_margins`, plus the saturation mask of the crop (what the border fill needs next)."""
    bright = _bright(gray, cfg)
    h, w = bright.shape
    y0, y1 = _kept_span(bright, 0, cfg.margin_fraction)
    x0, x1 = _kept_span(bright, 1, cfg.margin_fraction)
    if y1 - y0 < 8 or x1 - x0 < 8:  # an all-white image: nothing sensible to crop to
        return gray, (0, 0, w, h), bright
    return gray[y0:y1, x0:x1], (x0, y0, x1, y1), bright[y0:y1, x0:x1]


def fill_border_padding(gray: np.ndarray, cfg: Preprocessing) -> np.ndarray:
    """Paint saturated pixels that connect straight to an image edge (along their row or column) with `margin_fill`,
    and the 2 pixels around them (JPEG ringing leaves a bright fringe along a wedge's edge). Float in, float out."""
    bright = _bright(gray, cfg)
    edges = _border_edges(bright)
    if not any(edges):
        return gray
    out = gray.copy()
    _paint_border_padding(bright, out, cfg.margin_fill, edges)
    return out


def _border_edges(bright: np.ndarray) -> tuple[bool, bool, bool, bool]:
    """Whether the top, bottom, left and right border lines hold a saturated pixel. None do in the common case, the
    cheap one; only an edge that does can have padding to paint."""
    return bool(bright[0].any()), bool(bright[-1].any()), bool(bright[:, 0].any()), bool(bright[:, -1].any())


def _paint_border_padding(bright: np.ndarray, out: np.ndarray, fill: float,
                          edges: tuple[bool, bool, bool, bool]) -> None:
    """Paint, in place, the padding `bright` (the saturation mask of `out`) shows at the `edges` that have some (see
    `_border_edges`): see `fill_border_padding`."""
    # Each edge's saturated runs, grown by 2 px in the L1 sense (two 4-neighbour dilations), painted on the slab of
    # rows/columns they can reach: one vector per edge instead of whole-image masks. Flipped views make every edge
    # the top (axis 0) or the left (axis 1). The runs all come from `bright`, so painting one edge changes no other.
    views = ((bright, out, 0), (bright[::-1], out[::-1], 0), (bright, out, 1), (bright[:, ::-1], out[:, ::-1], 1))
    for (mask, view, along), touches in zip(views, edges, strict=True):
        if not touches:
            continue
        runs = _grow(_run_length(mask, along))
        lines = runs.nonzero()[0]  # painted only between the first and last line that has a run
        a, b = int(lines[0]), int(lines[-1]) + 1
        depth = min(int(runs[a:b].max()), view.shape[along])
        inward = np.arange(depth)  # distance from the edge
        if along == 0:
            view[:depth, a:b][inward[:, None] < runs[None, a:b]] = fill
        else:
            view[a:b, :depth][inward[None, :] < runs[a:b, None]] = fill


def _bright(gray: np.ndarray, cfg: Preprocessing) -> np.ndarray:
    if gray.dtype == np.uint8:
        return gray >= _first_bright_u8(cfg.margin_threshold)
    return gray > cfg.margin_threshold


@functools.lru_cache(maxsize=16)
def _first_bright_u8(threshold: float) -> int:
    """The smallest v with v / 255 > threshold, computed as the float path computes it (256 when none)."""
    above = np.arange(256, dtype=np.float32) / 255.0 > threshold
    return int(np.argmax(above)) if above.any() else 256


def _run_length(mask: np.ndarray, axis: int) -> np.ndarray:
    """Number of leading True values along `axis` (the whole length when all are True)."""
    if axis == 1:  # rows are contiguous: gather the few whose first pixel is saturated
        runs = np.zeros(mask.shape[0], dtype=np.int64)
        rows = mask[:, 0].nonzero()[0]
        if rows.size:
            sub = mask[rows]
            runs[rows] = np.where(sub.all(axis=1), mask.shape[1], sub.argmin(axis=1))
        return runs
    n = mask.shape[0]
    k = min(n, 32)  # columns are strided: look at a few rows first, more only where a column is saturated throughout
    while True:
        full = mask[:k].all(axis=0)
        if k == n or not full.any():
            return np.where(full, k, mask[:k].argmin(axis=0))
        k = min(n, 4 * k)


def _grow(runs: np.ndarray, by: int = 2) -> np.ndarray:
    """Run lengths after dilating the runs by `by` px in L1: a neighbour d columns away reaches `by - d` further."""
    reach = np.where(runs > 0, runs + by, 0)
    grown = reach.copy()
    n = runs.size
    for d in range(1, by + 1):
        # Now runs + by - d where there is a run, negative elsewhere (the maximum keeps what `grown` has there).
        np.subtract(reach, 1, out=reach)
        np.maximum(grown[d:], reach[:n - d], out=grown[d:])
        np.maximum(grown[:n - d], reach[d:], out=grown[:n - d])
    return grown


def _kept_span(bright: np.ndarray, axis: int, fraction: float) -> tuple[int, int]:
    """First and one-past-last row (axis 0) or column (axis 1) that is not margin; (0, 0) when all are.

    Only lines from each end inwards are counted, 16 at a time, until a kept one is found: the answer depends on
    nothing else, and margins are a few lines while images are hundreds."""
    n, length = bright.shape[axis], bright.shape[1 - axis]
    ones = _ones(length)

    def kept_lines(a: int, b: int) -> np.ndarray:
        """Indices (from a) of the lines a..b-1 that are not margin."""
        # Counts over the length as a matrix-vector product (half the time of a sum down strided columns; whole
        # numbers below 2**24, so exact in float32), divided in float64: exactly what `bright.mean(...)` gives.
        counts = bright[a:b] @ ones if axis == 0 else ones @ bright[:, a:b]
        return (counts / np.float64(length) < fraction).nonzero()[0]

    lo, a = None, 0
    while lo is None and a < n:
        kept = kept_lines(a, min(n, a + 16))
        lo = a + int(kept[0]) if kept.size else None
        a += 16
    if lo is None:
        return 0, 0
    b = n
    while True:  # terminates: line `lo` is kept
        a = max(lo, b - 16)
        kept = kept_lines(a, b)
        if kept.size:
            return lo, a + int(kept[-1]) + 1
        b = a


@functools.lru_cache(maxsize=64)
def _ones(n: int) -> np.ndarray:
    ones = np.ones(n, np.float32)
    ones.flags.writeable = False  # shared between calls
    return ones


def gray_pixels(image: Image.Image) -> np.ndarray:
    """`to_gray`, except that 8-bit gray stays uint8 (value v stands for v / 255): the common scan, decoded without a
    float copy of every pixel. `preprocess_gray` treats both alike."""
    return np.asarray(image) if image.mode == "L" else to_gray(image)


Box = tuple[int, int, int, int]


@dataclass(frozen=True)
class Geometry:
    """Where the model's input came from in the image it was made from.

    `box`: the crop (x0, y0, x1, y1) in image pixels, white margins excluded. Region `scan`: the input is the box
    resized. Region `retina`: input column j is the box's columns around x0 + (j + 0.5) * width / size, and input row
    i is the rows around y0 + band_top[j] + (i + 0.5) * band_rows / size (rows of the box that do not exist, above
    or below it, were the margin fill)."""

    box: Box
    band_top: np.ndarray | None = None  # (size,) float32: the band's first row at each input column, in box rows
    band_rows: int = 0
    retina: Retina | None = None  # the layers found, in box rows (region `retina`)

    @property
    def flattened(self) -> bool:
        return self.band_top is not None


def preprocess_gray(gray: np.ndarray, cfg: Preprocessing) -> tuple[np.ndarray, Geometry]:
    """Gray (H, W), float [0, 1] or uint8, → model input float32 (size, size), and where it came from. Region
    `retina`: raises NoRetinaError (a one-line reason, no pixel values) when the image holds no retina."""
    cropped, box, bright = _crop(gray, cfg)
    edges = _border_edges(bright)  # the saturation mask comes from the crop step (on uint8, a quarter the bytes)
    touches = any(edges)
    fill = _fill_level(cfg.margin_fill)
    # Painted and resized in 0..255 units, then normalised ((x / 255) - mean) / std. Float pixels are scaled up to
    # the same units, so v / 255 from a DICOM frame and v from a JPEG give bit-identical inputs (v / 255 * 255 == v
    # for every 8-bit v in float32).
    if cropped.dtype == np.uint8 and (fill is not None or not touches):
        # 8-bit pixels (the usual scan) stay 8-bit until the resize's conversion to float: a quarter of the bytes
        # painted, and no float copy made twice.
        x = cropped
        if touches:
            x = cropped.copy()  # the caller's pixels are never painted
            _paint_border_padding(bright, x, fill, edges)
    else:  # float pixels, or a fill between two 8-bit levels: a float copy in 0..255 units, painted
        x = (cropped.astype(np.float32) if cropped.dtype == np.uint8
             else np.multiply(cropped, np.float32(255.0), dtype=np.float32))
        if touches:
            _paint_border_padding(bright, x, float(np.float32(cfg.margin_fill) * np.float32(255.0)), edges)
    if cfg.region == "retina":
        return _retina_band(x, box, cfg)
    return _resize(x, cfg), Geometry(box)


def _retina_band(x: np.ndarray, box: Box, cfg: Preprocessing) -> tuple[np.ndarray, Geometry]:
    """The crop `x` (0..255 units, margins painted) → the band around its retina, resized to the input square."""
    retina = find_retina(x)
    reference = retina.reference
    h, w = x.shape
    rows = cfg.band_above + cfg.band_below
    # Each column shifted by whole rows (half an input pixel at most, with 256 rows to 128): the band is a gather,
    # and what the shift rounds off is far under the resize's own smoothing.
    top = np.rint(reference).astype(np.int64) - cfg.band_above
    src = top[None, :] + np.arange(rows)[:, None]  # (rows, w) row of x each band pixel comes from
    inside = (src >= 0) & (src < h)
    band = x[np.clip(src, 0, h - 1), np.arange(w)[None, :]].astype(np.float32)
    band[~inside] = np.float32(cfg.margin_fill) * np.float32(255.0)
    centres = (np.arange(cfg.size) + 0.5) * w / cfg.size - 0.5
    band_top = np.interp(centres, np.arange(w), top.astype(np.float64)).astype(np.float32)
    return _resize(band, cfg), Geometry(box, band_top, rows, retina)


@functools.lru_cache(maxsize=16)
def _fill_level(fill: float) -> int | None:
    """The border fill as an 8-bit level v (fill == v / 255 exactly, in float32), or None when it lies between two."""
    v = round(fill * 255.0)
    return v if 0 <= v <= 255 and np.float32(v) / np.float32(255.0) == np.float32(fill) else None


def to_input(values: np.ndarray, geometry: Geometry, cfg: Preprocessing) -> np.ndarray:
    """Any float (H, W) array over the image a scan was preprocessed from (a lesion mask, say) → (size, size), taken
    where the input was: the same crop, band and resize, without the intensity scaling."""
    x0, y0, x1, y1 = geometry.box
    crop = np.asarray(values, np.float32)[y0:y1, x0:x1]
    if geometry.band_top is not None:
        h, w = crop.shape
        centres = (np.arange(cfg.size) + 0.5) * w / cfg.size - 0.5
        top = np.rint(np.interp(np.arange(w), centres, geometry.band_top)).astype(np.int64)
        src = top[None, :] + np.arange(geometry.band_rows)[:, None]
        crop = np.where((src >= 0) & (src < h), crop[np.clip(src, 0, h - 1), np.arange(w)[None, :]], 0.0)
    return np.asarray(Image.fromarray(crop.astype(np.float32)).resize((cfg.size, cfg.size), _RESAMPLE[cfg.resample]))


def _resize(x: np.ndarray, cfg: Preprocessing) -> np.ndarray:
    """Pixels in 0..255 units (uint8 or float32) → the model input: PIL's antialiased float resize to (size, size),
    then (x / 255 - mean) / std."""
    gain, offset = np.float32(1.0 / (255.0 * cfg.std)), np.float32(-cfg.mean / cfg.std)
    resized = np.asarray(Image.fromarray(x.astype(np.float32, copy=False)).resize((cfg.size, cfg.size),
                                                                                  _RESAMPLE[cfg.resample]))
    return np.add(np.multiply(resized, gain, dtype=np.float32), offset, dtype=np.float32)


def preprocess(image: Image.Image, cfg: Preprocessing) -> np.ndarray:
    """Decoded image → model input float32 (size, size): `preprocess_gray` of its pixels."""
    return preprocess_gray(gray_pixels(image), cfg)[0]
