"""The one preprocessing path from a decoded B-scan to the model's input.

Training, evaluation, export calibration and the service all call `preprocess`; the parameters travel in
`manifest.json` (`Preprocessing`), so a served model always sees pixels prepared exactly as in training.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

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

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Preprocessing:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


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
    """Drop border rows/columns that are (almost) entirely white. Returns the crop and its box (x0, y0, x1, y1)."""
    bright = gray > cfg.margin_threshold
    margin_rows = bright.mean(axis=1) >= cfg.margin_fraction
    margin_cols = bright.mean(axis=0) >= cfg.margin_fraction
    y0, y1 = _trim(margin_rows)
    x0, x1 = _trim(margin_cols)
    if y1 - y0 < 8 or x1 - x0 < 8:  # an all-white image: nothing sensible to crop to
        return gray, (0, 0, gray.shape[1], gray.shape[0])
    return gray[y0:y1, x0:x1], (x0, y0, x1, y1)


def fill_border_padding(gray: np.ndarray, cfg: Preprocessing) -> np.ndarray:
    """Paint saturated pixels that connect straight to an image edge (along their row or column) with `margin_fill`."""
    bright = gray > cfg.margin_threshold
    if not (bright[0].any() or bright[-1].any() or bright[:, 0].any() or bright[:, -1].any()):
        return gray  # nothing saturated touches the border: the common case, and the cheap one
    h, w = bright.shape
    rows, cols = np.arange(h)[:, None], np.arange(w)[None, :]
    # Length of the saturated run starting at each edge, per column (top/bottom) and per row (left/right).
    top, bottom = _run_length(bright, 0), _run_length(bright[::-1], 0)
    left, right = _run_length(bright, 1), _run_length(bright[:, ::-1], 1)
    pad = (rows < top[None, :]) | (rows >= h - bottom[None, :]) | (cols < left[:, None]) | (cols >= w - right[:, None])
    for _ in range(2):  # grow by 2 px: JPEG ringing leaves a bright fringe along the wedge's edge
        grown = pad.copy()
        grown[1:] |= pad[:-1]
        grown[:-1] |= pad[1:]
        grown[:, 1:] |= pad[:, :-1]
        grown[:, :-1] |= pad[:, 1:]
        pad = grown
    out = gray.copy()
    out[pad] = cfg.margin_fill
    return out


def _run_length(mask: np.ndarray, axis: int) -> np.ndarray:
    """Number of leading True values along `axis` (the whole length when all are True)."""
    first_false = np.argmin(mask, axis=axis)
    return np.where(mask.all(axis=axis), mask.shape[axis], first_false)


def _trim(is_margin: np.ndarray) -> tuple[int, int]:
    keep = np.flatnonzero(~is_margin)
    if keep.size == 0:
        return 0, 0
    return int(keep[0]), int(keep[-1]) + 1


def preprocess_gray(gray: np.ndarray, cfg: Preprocessing) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """Gray [0, 1] (H, W) → model input float32 (size, size), plus the crop box in input pixels."""
    cropped, box = crop_white_margins(gray, cfg)
    cropped = fill_border_padding(cropped, cfg)
    resized = Image.fromarray(np.ascontiguousarray(cropped, dtype=np.float32)).resize(
        (cfg.size, cfg.size), _RESAMPLE[cfg.resample])
    x = (np.asarray(resized, dtype=np.float32) - cfg.mean) / cfg.std
    return x, box


def preprocess(image: Image.Image, cfg: Preprocessing) -> np.ndarray:
    """Decoded image → model input float32 (size, size). The function training, evaluation and serving share."""
    return preprocess_gray(to_gray(image), cfg)[0]
