"""Synthetic Spectralis-like OCT B-scans in the Kermany OCT2017 layout, so the pipeline runs without the 5 GB download.

    python -m training.phantom ROOT [--train-normal N] [--test-per-class M] [--train-abnormal K] [--seed S]

writes `ROOT/OCT2017/{train,test}/{NORMAL,CNV,DME,DRUSEN}/<CLASS>-<patient>-<n>.jpeg`, `ROOT/OCT2017/phantom.json`,
and for every abnormal scan its lesion mask `ROOT/OCT2017/masks/<split>/<CLASS>/<CLASS>-<patient>-<n>.png`.

A scan is built from per-column layer boundaries (ILM … Bruch's membrane) that follow a tilted, curved RPE line
and thin out into a foveal pit. Lesions are extra layers (sub-retinal fluid and hyper-reflective material,
sub-RPE drusen / PED material) or cut-outs (DME cysts), so a lesion deforms the layers around it as in real scans.
Speckle, depth attenuation, vessel shadows and white registration margins follow. Each image has its own RNG
derived from (seed, split, class, index): output is byte-identical per seed and independent of worker count.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from statistics import NormalDist

import numpy as np
from PIL import Image

CLASSES = ("NORMAL", "CNV", "DME", "DRUSEN")
SPLITS = ("train", "test")
HEIGHT = 496
WIDTH = 512
# Like the real set, a minority of scans have more A-scans over the same field of view.
WIDE_WIDTH = 768
WIDE_FRACTION = 0.1
# Written with IJG quality 75, the quantisation tables every one of the 166 Kermany samples carries
# (tests/training/test_phantom.py checks the copies in tests/data/kermany). Compressed so, the phantom's speckle
# takes ~1.3 bits a pixel, as real scans do (median 1.31 in the samples); at quality 90 it took 2.2, and decoding
# cost half as much again as a real scan's.
JPEG_QUALITY = 75
MARKER = "phantom.json"
MASKS = "masks"  # OCT2017/masks/<split>/<CLASS>/<stem>.png: lesion ground truth, 8-bit, the scan's size
GENERATOR_VERSION = 3  # 2: lesion masks; 3: JPEG quality 75 (the real scans' tables)
_NAME = re.compile(r"^(NORMAL|CNV|DME|DRUSEN)-(\d+)-(\d+)\.jpeg$")
# Distinct tags keep image and patient RNG streams apart.
_IMAGE_TAG, _PATIENT_TAG, _VOLUME_TAG = 0, 1, 2

# Layers from the vitreous down, with mean display reflectivity (0–255 before speckle). Lesion layers have zero
# thickness in healthy eyes. Spectralis: NFL and the RPE/EZ complex bright, nuclear layers dark.
_LAYERS = (
    ("NFL", 150.0), ("GCL", 90.0), ("IPL", 100.0), ("INL", 65.0), ("OPL", 90.0), ("ONL", 55.0),
    ("ELM", 100.0), ("IS", 75.0), ("EZ", 215.0), ("OS", 100.0), ("SRF", 5.0), ("SHRM", 190.0),
    ("IZ", 170.0), ("RPE", 240.0), ("SUBRPE", 120.0), ("BM", 180.0),
)
_LAYER_INDEX = {name: i for i, (name, _) in enumerate(_LAYERS)}
# Rows below Bruch's membrane that the choroid can reach before it has faded into the sclera.
_CHOROID_ROWS = 200
# Pixel noise is drawn as random bytes mapped through these 256 standard-normal quantiles: ~10× cheaper than
# `standard_normal`, and indistinguishable once blurred into speckle grains.
_NORMAL_Q = np.array([NormalDist().inv_cdf((i + 0.5) / 256) for i in range(256)], dtype=np.float32)


class PhantomError(Exception):
    """Generation cannot proceed (e.g. the target holds files that are not this phantom's). One-line reason."""


# ------------------------------------------------------------------------------------------------ rendering


@dataclass
class _Eye:
    """Per-column geometry of one scan: layer thicknesses (rows) and the Bruch's membrane line."""

    x: np.ndarray           # column coordinate in 512-wide units
    bm: np.ndarray          # Bruch's membrane row per column
    thick: np.ndarray       # (n_layers, W) thickness in rows
    fovea: float            # fovea column (512-wide units)
    scale: float            # columns per 512-wide unit

    def boundaries(self) -> np.ndarray:
        """(n_layers + 1, W) rows: ILM first, Bruch's membrane's lower edge last."""
        tops = self.bm[None, :] - np.cumsum(self.thick[::-1], axis=0)[::-1]
        return np.concatenate([tops, self.bm[None, :]], axis=0).astype(np.float32)

    def bump(self, rng: np.random.Generator, centre: float, half_width: float, height: float,
             power: float = 1.0, rough: float = 0.0) -> np.ndarray:
        """A dome (1 - d²)^power of the given height over columns, optionally with an irregular top."""
        d = (self.x - centre) / half_width
        dome = np.clip(1.0 - d * d, 0.0, None) ** power
        if rough:
            dome = dome * (1.0 + rough * _smooth_noise(rng, self.x.size, 20 * self.scale))
        return (height * dome).astype(np.float32)


def _smooth_noise(rng: np.random.Generator, n: int, corr: float) -> np.ndarray:
    """1-D noise in about [-1, 1], smooth over `corr` samples (coarse knots, interpolated, then box-smoothed)."""
    knots = max(2, int(n / max(corr, 1.0)) + 2)
    coarse = rng.uniform(-1.0, 1.0, knots)
    line = np.interp(np.linspace(0.0, knots - 1, n), np.arange(knots), coarse)
    k = max(1, int(corr) | 1)
    if k >= n:
        return line
    padded = np.pad(line, k // 2, mode="edge")
    return np.convolve(padded, np.full(k, 1.0 / k), mode="valid")


@lru_cache(maxsize=64)
def _spline_taps(n_out: int, n_in: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices and weights, each (4, n_out), of cubic B-spline interpolation from n_in to n_out samples."""
    u = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
    base = np.floor(u).astype(np.int64)
    t = u - base
    weights = np.stack([(1 - t) ** 3, 3 * t**3 - 6 * t**2 + 4, -3 * t**3 + 3 * t**2 + 3 * t + 1, t**3]) / 6
    idx = np.clip(base[None, :] + np.arange(-1, 3)[:, None], 0, n_in - 1)
    return idx, weights.astype(np.float32)


def _upsample(a: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Smooth (cubic B-spline) enlargement of a small 2-D array to `shape`.

    Four-tap gathers rather than interpolation matrices: BLAS would start spinning threads for products this
    size, which costs more than it saves on a shared 2-core machine.
    """
    a = np.asarray(a, dtype=np.float32)
    ci, cw = _spline_taps(shape[1], a.shape[1])
    wide = a[:, ci[0]] * cw[0]
    for t in range(1, 4):
        wide += a[:, ci[t]] * cw[t]
    ri, rw = _spline_taps(shape[0], a.shape[0])
    out = wide[ri[0]] * rw[0][:, None]
    for t in range(1, 4):
        out += wide[ri[t]] * rw[t][:, None]
    return out


def _double(a: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """2× linear enlargement, cropped to `shape`."""
    h, w = a.shape
    tall = np.empty((2 * h, w), dtype=np.float32)
    tall[0::2] = a
    tall[1:-1:2] = 0.5 * (a[:-1] + a[1:])
    tall[-1] = a[-1]
    out = np.empty((2 * h, 2 * w), dtype=np.float32)
    out[:, 0::2] = tall
    out[:, 1:-1:2] = 0.5 * (tall[:, :-1] + tall[:, 1:])
    out[:, -1] = tall[:, -1]
    return out[: shape[0], : shape[1]]


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int], cells: tuple[int, int]) -> np.ndarray:
    """2-D Gaussian noise of `shape` made of `cells` interpolated blobs, float32, normalised to unit variance."""
    field = _upsample(rng.standard_normal(cells, dtype=np.float32), shape)
    return field / max(float(field.std()), 1e-6)


def _healthy_eye(rng: np.random.Generator, height: int, width: int, pit_scale: float = 1.0) -> _Eye:
    """Normal macular anatomy (thicknesses in rows, ~3.9 µm each as on Spectralis) with per-scan variation.
    `pit_scale` < 1 shallows the foveal pit: a B-scan of a volume that passes beside the fovea."""
    s = width / WIDTH
    x = np.arange(width, dtype=np.float64) / s
    xc = WIDTH / 2
    # RPE line: depth, tilt, bowl curvature and a slow wobble vary between scans as in the real set.
    bm0 = height * rng.uniform(0.40, 0.60)
    tilt = rng.uniform(-0.12, 0.12)
    bowl = rng.uniform(-40.0, 20.0) / (xc * xc)  # negative: edges higher than the centre (the usual bowl)
    wobble = rng.uniform(0, 3) * np.sin(2 * np.pi * (x / rng.uniform(250, 600) + rng.uniform()))
    bm = bm0 + tilt * (x - xc) + bowl * (x - xc) ** 2 + wobble

    fovea = rng.uniform(0.35, 0.65) * WIDTH
    depth = 0.0 if rng.random() < 0.08 else rng.uniform(0.75, 1.0)  # a few scans miss the fovea
    depth *= pit_scale
    width_pit = rng.uniform(20.0, 34.0)
    dx = (x - fovea) / width_pit
    pit = depth * np.exp(-np.abs(dx) ** 1.8)
    rim = np.exp(-((np.abs(dx) - 2.0) ** 2) / 1.5)  # ganglion cells pile up on the parafoveal rim
    nasal = np.clip(rng.choice((-1.0, 1.0)) * (x - fovea) / xc, 0.0, 1.0)  # NFL thickens towards the disc

    k = rng.uniform(0.9, 1.2)  # overall retinal thickness
    t = {
        "NFL": (rng.uniform(3, 6) + rng.uniform(6, 16) * nasal) * (1 - pit),
        "GCL": k * (8 + 4 * rim) * (1 - pit),
        "IPL": k * (7 + 1.5 * rim) * (1 - pit),
        "INL": k * (7 + 1.5 * rim) * (1 - 0.95 * pit),
        "OPL": k * 5 * (1 - 0.7 * pit),
        "ONL": k * (18 + 8 * pit),
        "ELM": np.full_like(x, 1.2),
        "IS": np.full_like(x, 4.0),
        "EZ": np.full_like(x, rng.uniform(2.5, 3.5)),
        "OS": 4.5 + 2.5 * pit,  # longer cone outer segments: the foveal bulge of the EZ
        "IZ": np.full_like(x, 2.5),
        "RPE": np.full_like(x, rng.uniform(4.0, 5.5)),
        "BM": np.full_like(x, 1.5),
    }
    thick = np.zeros((len(_LAYERS), width), dtype=np.float64)
    for name, v in t.items():
        thick[_LAYER_INDEX[name]] = v
    return _Eye(x=x, bm=bm, thick=thick, fovea=fovea, scale=s)


def _add_layer(eye: _Eye, name: str, extra: np.ndarray, squeeze: str | None = None, share: float = 0.0) -> None:
    """Thicken layer `name` by `extra`; `squeeze` loses `share` of it (an elevation stretches the retina thin)."""
    eye.thick[_LAYER_INDEX[name]] += extra
    if squeeze:
        i = _LAYER_INDEX[squeeze]
        eye.thick[i] = np.maximum(eye.thick[i] - share * extra, 0.25 * eye.thick[i])


@dataclass
class _Spot:
    """An ellipse applied after the layers: `gain` multiplies the layered reflectivity inside it."""

    cx: float
    cy: float
    rx: float
    ry: float
    gain: float
    rim: float = 0.0  # bright wall, as around cystoid spaces


@dataclass
class _Streak:
    """A vertical shadow (gain < 1) or hyper-transmission (gain > 1) from row `top` down over columns x0:x1."""

    x0: int
    x1: int
    top: float
    gain: float


def _drusen(rng: np.random.Generator, eye: _Eye) -> None:
    """Several dome-shaped RPE elevations around the macula, one clearly visible, the others often small."""
    n = int(rng.integers(2, 9))
    span = rng.uniform(90, 190)
    sub = _LAYER_INDEX["SUBRPE"]
    for i in range(n):
        big = i == 0 or rng.random() < 0.3
        h = rng.uniform(7, 16) if big else rng.uniform(2.5, 7)  # always a clearly visible one, plus small ones
        w = h * rng.uniform(1.3, 2.4) + rng.uniform(3, 8)
        c = np.clip(eye.fovea + rng.uniform(-span, span) * (0.4 if i == 0 else 1.0), 20, WIDTH - 20)
        dome = eye.bump(rng, c, w, h, power=rng.uniform(0.6, 1.0))
        # Neighbouring drusen stay separate domes (no stacking); the retina above is pushed up and thinned.
        extra = np.maximum(dome - eye.thick[sub], 0.0)
        _add_layer(eye, "SUBRPE", extra, squeeze="ONL", share=0.6)
        eye.thick[_LAYER_INDEX["EZ"]] *= 1 - 0.5 * (dome > 8)  # photoreceptors over large drusen fade


def _cnv(rng: np.random.Generator, eye: _Eye, shape: tuple[int, int]) -> tuple[list[_Spot], list[_Streak]]:
    """Neovascular membrane: fibrovascular PED, sub-retinal hyper-reflective material, sub-retinal fluid, oedema."""
    c = eye.fovea + rng.uniform(-50, 50)
    w = rng.uniform(40, 110)
    # Fibrovascular PED: the RPE lifted over heterogeneous material.
    ped = eye.bump(rng, c + rng.uniform(-15, 15), w * rng.uniform(0.5, 0.9), rng.uniform(8, 30), 0.8, rough=0.35)
    _add_layer(eye, "SUBRPE", ped, squeeze="ONL", share=0.3)
    # Sub-retinal hyper-reflective material on top of it.
    shrm = eye.bump(rng, c + rng.uniform(-20, 20), w * rng.uniform(0.4, 0.8), rng.uniform(6, 22), 1.0, rough=0.4)
    _add_layer(eye, "SHRM", np.clip(shrm, 0, None))
    # Sub-retinal fluid: a dark pocket lifting the neurosensory retina, beside or over the lesion.
    fluid_c = c + rng.choice((-1, 1)) * rng.uniform(0.3, 0.9) * w
    srf = eye.bump(rng, fluid_c, w * rng.uniform(0.5, 1.0), rng.uniform(8, 30), 0.7)
    _add_layer(eye, "SRF", srf)
    # Thickened, oedematous retina over the lesion; the pit flattens.
    swell = eye.bump(rng, c, w * 1.3, rng.uniform(5, 18), 1.0)
    _add_layer(eye, "ONL", swell)
    _add_layer(eye, "INL", 0.4 * swell)

    b = eye.boundaries()
    spots: list[_Spot] = []
    for _ in range(int(rng.integers(0, 4))):  # sometimes intraretinal fluid too
        spots.append(_cyst(rng, eye, b, c + rng.uniform(-w, w), small=True))
    for _ in range(int(rng.integers(3, 9))):  # hyper-reflective foci in the lesion
        xi = int(np.clip((c + rng.uniform(-w, w) * 0.6) * eye.scale, 0, shape[1] - 1))
        yi = b[_LAYER_INDEX["SHRM"], xi] + rng.uniform(-4, 10)
        spots.append(_Spot(xi / eye.scale, yi, rng.uniform(2, 5), rng.uniform(1.5, 3), rng.uniform(1.3, 1.7)))
    streaks = []
    for _ in range(int(rng.integers(2, 7))):  # shadowing under the lesion and hyper-transmission where RPE is lost
        x0 = int((c + rng.uniform(-w, w)) * eye.scale)
        x1 = x0 + max(1, int(rng.uniform(1, 8) * eye.scale))
        top = float(b[-1, int(np.clip(x0, 0, shape[1] - 1))])
        streaks.append(_Streak(x0, x1, top, rng.choice((rng.uniform(0.4, 0.75), rng.uniform(1.3, 1.8)))))
    return spots, streaks


def _cyst(rng: np.random.Generator, eye: _Eye, b: np.ndarray, cx: float, small: bool = False) -> _Spot:
    """A dark, thin-walled cystoid space between the inner nuclear layer and the ELM at column `cx`."""
    xi = int(np.clip(cx * eye.scale, 0, b.shape[1] - 1))
    top, bottom = b[_LAYER_INDEX["INL"], xi], b[_LAYER_INDEX["ELM"], xi]
    room = max(bottom - top, 4.0)
    ry = rng.uniform(0.15, 0.3 if small else 0.45) * room
    cy = rng.uniform(top + ry, max(bottom - ry, top + ry + 1))
    rx = ry * rng.uniform(0.4, 1.2)
    return _Spot(cx, cy, rx, ry, rng.uniform(0.05, 0.2), rim=rng.uniform(0.1, 0.3))


def _dme(rng: np.random.Generator, eye: _Eye, shape: tuple[int, int]) -> list[_Spot]:
    """Diabetic macular oedema: a thickened retina holding dark cystoid spaces, sometimes hard exudates."""
    c = eye.fovea + rng.uniform(-40, 40)
    w = rng.uniform(60, 140)
    # Macular oedema: inner nuclear and outer layers swell, often filling or inverting the pit.
    swell = eye.bump(rng, c, w, rng.uniform(20, 55), 1.0, rough=0.2)
    _add_layer(eye, "INL", 0.45 * swell)
    _add_layer(eye, "OPL", 0.15 * swell)
    _add_layer(eye, "ONL", 0.4 * swell)
    if rng.random() < 0.3:  # some sub-retinal fluid
        _add_layer(eye, "SRF", eye.bump(rng, c + rng.uniform(-20, 20), w * 0.4, rng.uniform(5, 15), 0.7))
    b = eye.boundaries()
    spots: list[_Spot] = []
    for _ in range(int(rng.integers(4, 14))):  # petaloid cystoid spaces with thin septa between them
        cyst = _cyst(rng, eye, b, c + rng.uniform(-0.7, 0.7) * w)
        if all(abs(cyst.cx - o.cx) > 0.8 * (cyst.rx + o.rx) or abs(cyst.cy - o.cy) > 0.8 * (cyst.ry + o.ry)
               for o in spots):
            spots.append(cyst)
    for _ in range(int(rng.integers(0, 6))):  # hard exudates: bright dots at the outer plexiform layer
        xi = int(np.clip((c + rng.uniform(-w, w)) * eye.scale, 0, shape[1] - 1))
        yi = b[_LAYER_INDEX["ONL"], xi] + rng.uniform(-2, 4)
        spots.append(_Spot(xi / eye.scale, yi, rng.uniform(1.5, 4), rng.uniform(1.5, 3), rng.uniform(1.6, 2.2)))
    return spots


def _flat_layers(b: np.ndarray, rows: np.ndarray, intens: np.ndarray) -> np.ndarray:
    """Piecewise-constant reflectivity between boundaries `b` (rows), antialiased over one row; 0 outside them.

    `rows` are the canvas rows (ascending); `b` is in the same coordinates.
    """
    h, w = rows.size, b.shape[1]
    out = np.zeros((h, w), dtype=np.float32)
    below = np.zeros(h, dtype=np.float32)  # steps every column has already passed: added per row at the end
    steps = np.diff(np.concatenate([[0.0], intens, [0.0]])).astype(np.float32)
    r0 = rows[0]
    col_rows = rows[:, None].astype(np.float32)
    for k in range(b.shape[0]):
        if steps[k] == 0.0:
            continue
        bk = b[k] - 0.5
        lo = int(np.clip(np.floor(bk.min()) - r0, 0, h))
        hi = int(np.clip(np.ceil(bk.max()) + 1 - r0, 0, h))
        if hi > lo:
            ramp = col_rows[lo:hi] - bk[None, :]
            np.maximum(ramp, 0.0, out=ramp)
            np.minimum(ramp, 1.0, out=ramp)
            ramp *= steps[k]
            out[lo:hi] += ramp
        below[hi:] += steps[k]
    out += below[:, None]
    return out


def _unflatten(flat: np.ndarray, first_row: int, shift: np.ndarray, height: int) -> np.ndarray:
    """Place canvas row r of column x at image row r + first_row + shift[x] (zeros elsewhere).

    Columns sharing a shift are copied as one block; `shift` varies smoothly, so there are few blocks.
    """
    w = flat.shape[1]
    out = np.zeros((height, w), dtype=np.float32)
    starts = np.concatenate([[0], np.flatnonzero(np.diff(shift)) + 1])
    ends = np.concatenate([starts[1:], [w]])
    for x0, x1 in zip(starts.tolist(), ends.tolist(), strict=True):
        y0 = first_row + int(shift[x0])
        lo, hi = max(0, -y0), min(flat.shape[0], height - y0)
        if hi > lo:
            out[y0 + lo:y0 + hi, x0:x1] = flat[lo:hi, x0:x1]
    return out


def _apply_spots(img: np.ndarray, spots: Iterable[_Spot], scale: float) -> None:
    """Multiply soft-edged ellipses (cysts, foci, vessel walls) into `img`, touching only their bounding boxes."""
    h, w = img.shape
    for s in spots:
        rx = s.rx * scale
        x0, x1 = int(max(0, s.cx * scale - rx - 2)), int(min(w, s.cx * scale + rx + 3))
        y0, y1 = int(max(0, s.cy - s.ry - 2)), int(min(h, s.cy + s.ry + 3))
        if x1 <= x0 or y1 <= y0:
            continue
        yy = (np.arange(y0, y1, dtype=np.float32)[:, None] - s.cy) / s.ry
        xx = (np.arange(x0, x1, dtype=np.float32)[None, :] - s.cx * scale) / rx
        r = np.sqrt(xx * xx + yy * yy)
        inside = np.clip((1.0 - r) * 3.0, 0.0, 1.0)
        gain = 1.0 + (s.gain - 1.0) * inside
        if s.rim:
            gain += s.rim * np.exp(-(((r - 1.05) / 0.12) ** 2))
        img[y0:y1, x0:x1] *= gain


def _choroid(rng: np.random.Generator, frac: np.ndarray, rows: int) -> np.ndarray:
    """Choroid below Bruch's membrane, `rows` deep, in BM-flattened rows (depth = row - frac[x]).

    Bright stroma around dark vessel lumens, fading into the dark sclera. Smooth everywhere but its top edge
    (which the BM layer covers), so it is computed at half resolution.
    """
    w = frac.size
    hh, hw = (rows + 1) // 2, (w + 1) // 2
    depth = np.arange(hh, dtype=np.float32)[:, None] * 2.0 - frac[::2][None, :hw].astype(np.float32)
    # Choriocapillaris/Sattler's layer is fine-grained; Haller's vessels below are large dark lumens.
    fine = _NORMAL_Q.take(np.frombuffer(rng.bytes(hh * hw), dtype=np.uint8).reshape(hh, hw))
    _blur121(fine)
    _blur121(fine)
    fine *= 1.0 / max(float(fine.std()), 1e-6)
    coarse = _smooth_field(rng, (hh, hw), (max(2, rows // 10), max(2, w // 14)))
    deep = np.clip(depth / 45.0, 0.0, 1.0)
    vessels = fine + (coarse - fine) * deep
    tex = 0.7 + 0.3 * np.tanh(1.2 * (vessels + rng.uniform(0.0, 0.6)))
    thickness = rng.uniform(70, 125) + 10 * _smooth_noise(rng, hw, 40)
    top = rng.uniform(115, 150)
    level = top * np.exp(-np.maximum(depth, 0.0) / rng.uniform(90, 160))
    # Soft edges: nothing above the membrane, a gradual fade into the sclera.
    level *= np.clip(depth + 1.0, 0.0, 1.0)
    level /= 1.0 + np.exp(np.minimum((depth - thickness[None, :]) / rng.uniform(8, 14), 30.0))
    return _double(level * tex, (rows, w))


def _vessels(rng: np.random.Generator, img: np.ndarray, b: np.ndarray, scale: float) -> None:
    """Retinal vessels in the inner retina: a bright cross-section and a dark shadow straight down."""
    h, w = img.shape
    for _ in range(int(rng.integers(0, 5))):
        xc = rng.uniform(0.03, 0.97) * w
        half = rng.uniform(1.5, 4.0) * scale
        x0, x1 = int(max(0, xc - half)), int(min(w, xc + half + 1))
        if x1 <= x0:
            continue
        yv = float(b[_LAYER_INDEX["GCL"], int(xc)]) + rng.uniform(0, 5)
        top = int(np.clip(yv + half / scale + 1, 0, h))
        img[top:, x0:x1] *= rng.uniform(0.7, 0.9)
        _apply_spots(img, [_Spot(xc / scale, yv, half / scale, half / scale * 0.8, rng.uniform(1.2, 1.5))], scale)


def _hyaloid(rng: np.random.Generator, img: np.ndarray, b_ilm: np.ndarray) -> None:
    """A thin posterior hyaloid line floating in the vitreous over part of the scan, as in some real scans."""
    h, w = img.shape
    x = np.arange(w)
    lift = rng.uniform(5, 60) + rng.uniform(-30, 30) * (x / w - rng.uniform()) ** 2 + 4 * _smooth_noise(rng, w, 60)
    x0, x1 = sorted(int(v) for v in rng.uniform(0, w, 2))
    y = (b_ilm - lift)[x0:x1]
    y0 = np.floor(y).astype(np.int64)
    ok = (y0 >= 0) & (y0 < h - 1)
    frac = (y - y0)[ok].astype(np.float32)
    cols, y0 = x[x0:x1][ok], y0[ok]
    value = rng.uniform(40, 110)
    img[y0, cols] += value * (1 - frac)  # spread over two rows: a smooth line, not a staircase
    img[y0 + 1, cols] += value * frac


def _mottle(rng: np.random.Generator, img: np.ndarray, top: np.ndarray, bottom: np.ndarray, where: np.ndarray,
            amount: float) -> None:
    """Make the tissue between rows `top` and `bottom` heterogeneous in the columns `where` is true, in place."""
    cols = np.flatnonzero(where)
    if cols.size == 0:
        return
    x0, x1 = int(cols[0]), int(cols[-1]) + 1
    y0 = int(max(0, np.floor(top[x0:x1].min())))
    y1 = int(min(img.shape[0], np.ceil(bottom[x0:x1].max()) + 1))
    if y1 - y0 < 2:
        return
    rows = np.arange(y0, y1, dtype=np.float32)[:, None]
    inside = (rows >= top[None, x0:x1]) & (rows <= bottom[None, x0:x1]) & where[None, x0:x1]
    field = _smooth_field(rng, (y1 - y0, x1 - x0), (max(2, (y1 - y0) // 4), max(2, (x1 - x0) // 6)))
    img[y0:y1, x0:x1] *= np.where(inside, np.clip(1.0 + amount * field, 0.2, 2.0), 1.0)


def _white_margins(rng: np.random.Generator, img: np.ndarray) -> None:
    """Pure-white (255) padding as left by Spectralis registration: slanted top/bottom wedges, side strips."""
    h, w = img.shape
    x = np.arange(w, dtype=np.float32)
    if rng.random() < 0.45:
        a, c = rng.uniform(-25, 30, 2)
        edge = np.clip(a + (c - a) * x / w, 0, None)
        rows = np.arange(h, dtype=np.float32)[:, None]
        if rng.random() < 0.5:
            img[rows < edge[None, :]] = 255.0
        else:
            img[rows >= h - edge[None, :]] = 255.0
    if rng.random() < 0.12:
        strip = int(rng.uniform(4, 40) * w / WIDTH)
        if rng.random() < 0.5:
            img[:, :strip] = 255.0
        else:
            img[:, w - strip:] = 255.0


def _blur121(img: np.ndarray) -> None:
    """In-place separable [1, 2, 1] / 4 blur (edges left unfiltered)."""
    img[1:-1] = 0.25 * (img[:-2] + img[2:]) + 0.5 * img[1:-1]
    img[:, 1:-1] = 0.25 * (img[:, :-2] + img[:, 2:]) + 0.5 * img[:, 1:-1]


def render_bscan(rng: np.random.Generator, cls: str, height: int = HEIGHT, width: int = WIDTH, *,
                 lesion: bool = True) -> np.ndarray:
    """One synthetic B-scan of class `cls` (NORMAL, CNV, DME, DRUSEN) as uint8 (height, width).

    Everything random comes from `rng`: the same generator state gives the same image. The eye, the lesion and
    the scan (choroid texture, speckle, margins) draw from separate streams, so `lesion=False` renders the very
    same scan without its lesion: the healthy twin, identical wherever the lesion has no effect.
    """
    return render_bscan_and_mask(rng, cls, height, width, lesion=lesion)[0]


def render_bscan_and_mask(rng: np.random.Generator, cls: str, height: int = HEIGHT, width: int = WIDTH, *,
                          lesion: bool = True, eye_seeds: tuple[int, int] | None = None,
                          pit_scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """`render_bscan` plus its lesion mask: bool (height, width), true where the generator drew the lesion (see
    `_lesion_mask`); all false for NORMAL. Computing the mask draws nothing from `rng`, so the scan is the same.

    `eye_seeds` (eye, lesion) fix the anatomy and the lesion, so B-scans of one volume share them while `rng` still
    draws each one's speckle; `pit_scale` places the B-scan nearer to or farther from the fovea."""
    if cls not in CLASSES:
        raise ValueError(f"unknown class {cls!r}; expected one of {', '.join(CLASSES)}")
    if height < 64 or width < 64:
        raise ValueError(f"image must be at least 64×64, got {width}×{height}")
    eye_rng, lesion_rng, rng = (np.random.default_rng(int(s)) for s in rng.integers(0, 2**63, size=3))
    if eye_seeds is not None:
        eye_rng, lesion_rng = (np.random.default_rng(int(s)) for s in eye_seeds)
    shape = (height, width)
    eye = _healthy_eye(eye_rng, height, width, pit_scale)
    healthy_thick = eye.thick.copy()
    intens = np.array([v for _, v in _LAYERS], dtype=np.float32) * eye_rng.uniform(0.85, 1.1, len(_LAYERS))
    cls = cls if lesion else "NORMAL"
    spots: list[_Spot] = []
    streaks: list[_Streak] = []
    if cls == "DRUSEN":
        _drusen(lesion_rng, eye)
    elif cls == "CNV":
        spots, streaks = _cnv(lesion_rng, eye, shape)
        intens[_LAYER_INDEX["SUBRPE"]] *= 1.15  # fibrovascular tissue reflects more than drusen material
    elif cls == "DME":
        spots = _dme(lesion_rng, eye, shape)

    b = eye.boundaries()
    mask = _lesion_mask(cls, eye, healthy_thick, b, spots, height)
    # Retina and choroid are drawn on a canvas flattened to Bruch's membrane (row 0 = the BM row of each column),
    # then shifted into place column block by column block: cheap, and the choroid follows the RPE's curve.
    shift = np.floor(b[-1]).astype(np.int64)
    rel = b - shift[None, :]
    first = int(np.floor(rel.min())) - 1
    canvas = _flat_layers(rel, np.arange(first, 2), intens.astype(np.float32))
    depth_rows = _CHOROID_ROWS
    canvas = np.concatenate([canvas, np.zeros((depth_rows - 2, width), np.float32)])
    canvas[-first:] += _choroid(rng, rel[-1], depth_rows)
    img = _unflatten(canvas, first, shift, height)
    if cls == "CNV":  # fibrovascular tissue is patchy, unlike the homogeneous drusen material
        lesion_cols = eye.thick[_LAYER_INDEX["SHRM"]] + eye.thick[_LAYER_INDEX["SUBRPE"]] > 0.5
        _mottle(lesion_rng, img, b[_LAYER_INDEX["SHRM"]], b[_LAYER_INDEX["BM"]], lesion_cols, 0.35)
    _apply_spots(img, spots, eye.scale)
    _vessels(rng, img, b, eye.scale)
    for s in streaks:
        img[int(max(0, s.top)):, max(0, s.x0):max(0, s.x1)] *= s.gain
    if rng.random() < 0.25:
        _hyaloid(rng, img, b[0])

    # Signal falls off with depth and towards the scan edges, and drifts slowly along and across the layers.
    # Kept to a sum of two outer products (rows × columns), which is all these smooth trends need and far
    # cheaper than a full-size 2-D field.
    y = np.arange(height, dtype=np.float32)
    x = np.arange(width, dtype=np.float32) / width - 0.5
    falloff = np.exp(-y / (height * rng.uniform(2.0, 4.0)))
    edge = (1.0 - rng.uniform(0.0, 0.35) * (2 * x) ** 2) * rng.uniform(0.85, 1.15)
    lateral = 1.0 + 0.1 * _smooth_noise(rng, width, width / 5)
    axial = 0.1 * _smooth_noise(rng, height, height / 4)
    patchy = _smooth_noise(rng, width, width / 6)
    gain = np.multiply.outer(falloff, (edge * lateral).astype(np.float32))
    gain += np.multiply.outer((falloff * axial).astype(np.float32), (edge * patchy).astype(np.float32))
    img *= gain

    # Tissue: multiplicative (log-normal) speckle. Where tissue is weaker than the detection noise floor (vitreous,
    # deep sclera) the floor shows: grainy, ~30 ± 19 at the top, fading with depth. Both are drawn per pixel and
    # then blurred together with the signal, which gives real scans' 2–3 pixel grains and soft layer edges.
    noise = np.frombuffer(rng.bytes(2 * height * width), dtype=np.uint8).reshape(2, height, width)
    sigma = rng.uniform(0.35, 0.5)
    img *= np.exp(sigma * _NORMAL_Q - 0.5 * sigma * sigma).take(noise[0])
    rows = y[:, None]
    floor = _NORMAL_Q.take(noise[1])
    floor *= rng.uniform(55, 70) * np.exp(-rows / rng.uniform(250, 400))
    floor += rng.uniform(16, 28) * np.exp(-rows / rng.uniform(500, 800))
    np.maximum(img, floor, out=img)
    _blur121(img)
    np.clip(img, 0.0, 250.0, out=img)
    _white_margins(rng, img)
    mask &= img < 255.0  # what the registration margin painted over is no longer drawn (tissue is clipped at 250)
    return img.astype(np.uint8), mask


# Thinner than this many rows, a lesion layer is antialiasing only, not drawn tissue.
_MASK_MIN_ROWS = 1.0
# DME: retina counts as thickened where the oedema added at least this many rows (~1 pixel of a 128-px input).
_MASK_MIN_SWELL_ROWS = 4.0


def _lesion_mask(cls: str, eye: _Eye, healthy_thick: np.ndarray, b: np.ndarray, spots: list[_Spot],
                 height: int) -> np.ndarray:
    """Where the generator drew the lesion, bool (height, width): sub-retinal fluid and hyper-reflective material
    wherever they are at least a row thick; sub-RPE deposits (drusen, PED material) with the RPE they lift — the
    elevated RPE band is how drusen show; the lesion's spots (cysts, foci, exudates); for DME, the neurosensory
    retina (ILM to ELM) wherever the oedema thickened it. CNV's shadows and the retina merely pushed up over a
    lesion are consequences of the lesion, not the lesion, and stay unmarked."""
    mask = np.zeros((height, eye.x.size), dtype=bool)
    if cls == "NORMAL":
        return mask
    rows = np.arange(height, dtype=np.float32)[:, None]

    def band(top: str, bottom: str, cols: np.ndarray) -> None:
        """Rows from layer `top`'s upper boundary to layer `bottom`'s lower one, in columns `cols`."""
        if cols.any():
            upper, lower = b[_LAYER_INDEX[top]], b[_LAYER_INDEX[bottom] + 1]
            mask[:] |= (rows >= upper[None, :]) & (rows < lower[None, :]) & cols[None, :]

    for name in ("SRF", "SHRM"):
        band(name, name, eye.thick[_LAYER_INDEX[name]] >= _MASK_MIN_ROWS)
    band("RPE", "SUBRPE", eye.thick[_LAYER_INDEX["SUBRPE"]] >= _MASK_MIN_ROWS)
    if cls == "DME":
        grown = sum(eye.thick[_LAYER_INDEX[n]] - healthy_thick[_LAYER_INDEX[n]] for n in ("INL", "OPL", "ONL"))
        band("NFL", "ONL", grown >= _MASK_MIN_SWELL_ROWS)
    h, w = mask.shape
    for s in spots:  # the same ellipses `_apply_spots` multiplies in, their inside only
        cx, rx = s.cx * eye.scale, s.rx * eye.scale
        x0, x1 = int(max(0, cx - rx - 1)), int(min(w, cx + rx + 2))
        y0, y1 = int(max(0, s.cy - s.ry - 1)), int(min(h, s.cy + s.ry + 2))
        if x1 <= x0 or y1 <= y0:
            continue
        yy = (np.arange(y0, y1, dtype=np.float32)[:, None] - s.cy) / s.ry
        xx = (np.arange(x0, x1, dtype=np.float32)[None, :] - cx) / rx
        mask[y0:y1, x0:x1] |= xx * xx + yy * yy < 1.0
    return mask


# ----------------------------------------------------------------------------------------------- generation


@dataclass(frozen=True)
class _Item:
    split: str
    cls: str
    index: int
    name: str


def image_rng(seed: int, split: str, cls: str, index: int) -> np.random.Generator:
    """The generator of `generate`'s image `index` of (split, class) for `seed` (which first draws the scan's width,
    then renders it): one seeded stream per image, so a scan can be redrawn alone, with or without its lesion."""
    return np.random.default_rng([seed, _IMAGE_TAG, SPLITS.index(split), CLASSES.index(cls), index])


def _names(seed: int, split: str, cls: str, count: int) -> list[str]:
    """File names `<CLASS>-<patient>-<n>.jpeg`: 1–5 images per fake patient, patients unique per split.

    Patient ids are even in train and odd in test, so no patient appears in both splits (as in the real set).
    Each patient's id and image count come from its own RNG, so the first names do not change with `count`.
    """
    names: list[str] = []
    seen: set[int] = set()
    p = 0
    while len(names) < count:
        prng = np.random.default_rng([seed, _PATIENT_TAG, SPLITS.index(split), CLASSES.index(cls), p])
        p += 1
        pid = 2 * int(prng.integers(500, 5_000_000)) + SPLITS.index(split)
        if pid in seen:
            continue
        seen.add(pid)
        first = int(prng.integers(1, 4))
        for n in range(first, first + int(prng.integers(1, 6))):
            if len(names) < count:
                names.append(f"{cls}-{pid}-{n}.jpeg")
    return names


def _plan(counts: dict[str, dict[str, int]], seed: int) -> list[_Item]:
    return [_Item(split, cls, i, name)
            for split in SPLITS for cls in CLASSES
            for i, name in enumerate(_names(seed, split, cls, counts[split][cls]))]


def mask_path(oct_root: Path, split: str, cls: str, scan_name: str) -> Path:
    """Where the lesion mask of `<oct_root>/<split>/<cls>/<scan_name>` lives: `masks/<split>/<cls>/<stem>.png`."""
    return oct_root / MASKS / split / cls / (Path(scan_name).stem + ".png")


def _render_item(item: _Item, seed: int, out: Path) -> None:
    rng = image_rng(seed, item.split, item.cls, item.index)
    width = WIDE_WIDTH if rng.random() < WIDE_FRACTION else WIDTH
    img, mask = render_bscan_and_mask(rng, item.cls, HEIGHT, width)
    Image.fromarray(img, mode="L").save(out / item.split / item.cls / item.name, quality=JPEG_QUALITY)
    if item.cls != "NORMAL":  # lossless, so the ground truth is exactly what was drawn
        Image.fromarray(mask.astype(np.uint8) * 255, mode="L").save(mask_path(out, item.split, item.cls, item.name))


# A volume's B-scans are this many frames apart in units of the foveal pit's half-width: Spectralis's 49-scan macular
# cube spaces B-scans ~120 µm apart, and the pit's half-width is ~300 µm.
_PIT_HALF_WIDTH_FRAMES = 2.5


def render_volume(rng: np.random.Generator, cls: str, frames: int, lesion_frames: int = 5, height: int = HEIGHT,
                  width: int = WIDTH) -> tuple[np.ndarray, np.ndarray]:
    """One eye scanned as `frames` parallel B-scans across the macula, the fovea in the middle one: uint8
    (frames, height, width) and, per frame, whether it shows the lesion. For an abnormal `cls` the lesion lies in
    `lesion_frames` consecutive B-scans around a frame drawn from the central half; the rest are its healthy
    twins (the same eye without the lesion), as in a real eye with one focal lesion."""
    if frames < 1 or lesion_frames < 1:
        raise ValueError("a volume needs at least one frame and a lesion at least one")
    eye_seeds = (int(rng.integers(0, 2**63)), int(rng.integers(0, 2**63)))
    centre = (frames - 1) / 2
    lesion_at = int(rng.integers(frames // 4, max(frames // 4 + 1, 3 * frames // 4)))
    lesioned = np.zeros(frames, dtype=bool)
    if cls != "NORMAL":
        lesioned[max(0, lesion_at - lesion_frames // 2):lesion_at - lesion_frames // 2 + lesion_frames] = True
    scans = np.stack([
        render_bscan_and_mask(rng, cls, height, width, lesion=bool(lesioned[k]), eye_seeds=eye_seeds,
                              pit_scale=float(np.exp(-abs((k - centre) / _PIT_HALF_WIDTH_FRAMES) ** 1.8)))[0]
        for k in range(frames)])
    return scans, lesioned


def write_volumes(root: str | os.PathLike, per_class: int, frames: int = 49, seed: int = 0,
                  lesion_frames: int = 5) -> Path:
    """`root/volumes/<CLASS>/<CLASS>-<volume>/<CLASS>-<volume>-<frame>.jpeg` (frames numbered from 1) and
    `root/volumes/volumes.json` (which frames show a lesion): `per_class` volumes of each class."""
    out = Path(root) / "volumes"
    index: dict[str, dict[str, list[int]]] = {}
    for cls in CLASSES:
        index[cls] = {}
        for v in range(per_class):
            rng = np.random.default_rng([seed, _VOLUME_TAG, CLASSES.index(cls), v])
            scans, lesioned = render_volume(rng, cls, frames, lesion_frames)
            name = f"{cls}-{v + 1}"
            d = out / cls / name
            d.mkdir(parents=True, exist_ok=True)
            for k, scan in enumerate(scans):
                Image.fromarray(scan, mode="L").save(d / f"{name}-{k + 1}.jpeg", quality=JPEG_QUALITY)
            index[cls][name] = [int(k) + 1 for k in np.nonzero(lesioned)[0]]
    (out / "volumes.json").write_text(json.dumps({"frames": frames, "seed": seed, "lesion_frames": index},
                                                 indent=1) + "\n")
    return out


def _render_chunk(items: Sequence[_Item], seed: int, out: Path) -> int:
    for item in items:
        _render_item(item, seed, out)
    return len(items)


def _prepare(out: Path, plan: list[_Item], overwrite: bool) -> None:
    """Make the class folders; refuse to mix with files this run would not write unless they are ours to replace."""
    ours = (out / MARKER).is_file()
    wanted = {(i.split, i.cls, i.name) for i in plan}
    stale: list[Path] = []
    for split in SPLITS:
        for cls in CLASSES:
            d = out / split / cls
            d.mkdir(parents=True, exist_ok=True)
            stale += [p for p in d.iterdir()
                      if p.is_file() and not p.name.startswith(".") and (split, cls, p.name) not in wanted]
            if cls != "NORMAL":
                (out / MASKS / split / cls).mkdir(parents=True, exist_ok=True)
    # Masks of images this run does not write (an earlier, larger run) go: a mask must always match its scan.
    wanted_masks = {mask_path(out, i.split, i.cls, i.name) for i in plan}
    for p in (out / MASKS).glob("*/*/*.png"):
        if p not in wanted_masks:
            p.unlink()
    if not stale:
        return
    foreign = [p for p in stale if not _NAME.match(p.name)]
    if foreign or not (ours or overwrite):
        raise PhantomError(
            f"{out} already holds {len(stale)} files this run would not write (e.g. {stale[0]}); "
            + ("remove them yourself" if foreign else "pass --overwrite to replace them")
            + " or choose another ROOT")
    for p in stale:  # images of an earlier, larger phantom run
        p.unlink()


def generate(root: str | os.PathLike, train_normal: int = 1000, test_per_class: int = 100, seed: int = 0,
             train_abnormal: int = 10, *, workers: int = 1, overwrite: bool = False) -> dict[str, dict[str, int]]:
    """Write the phantom data set under `root/OCT2017`; return the image count per split and class.

    Re-running with the same arguments rewrites identical files; a smaller re-run removes the extra images of an
    earlier phantom run. Files not written by the phantom are never deleted unless `overwrite`.
    """
    for label, v in (("train_normal", train_normal), ("test_per_class", test_per_class),
                     ("train_abnormal", train_abnormal), ("seed", seed)):
        if not isinstance(v, (int, np.integer)) or v < 0:
            raise ValueError(f"{label} must be a non-negative integer, got {v!r}")
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    counts = {
        "train": {cls: (train_normal if cls == "NORMAL" else train_abnormal) for cls in CLASSES},
        "test": dict.fromkeys(CLASSES, test_per_class),
    }
    out = Path(root) / "OCT2017"
    if out.exists() and not out.is_dir():
        raise PhantomError(f"{out} exists and is not a folder")
    plan = _plan(counts, seed)
    _prepare(out, plan, overwrite)

    if workers == 1 or len(plan) < 2 * workers:
        _render_chunk(plan, seed, out)
    else:
        size = max(1, min(32, len(plan) // (4 * workers)))  # several chunks per worker keeps them all busy
        chunks = [plan[i:i + size] for i in range(0, len(plan), size)]
        with ProcessPoolExecutor(max_workers=workers) as pool:
            for _ in pool.map(_render_chunk, chunks, [seed] * len(chunks), [out] * len(chunks)):
                pass
    (out / MARKER).write_text(json.dumps({
        "generator": "training.phantom", "version": GENERATOR_VERSION, "seed": seed, "counts": counts,
        "masks": f"{MASKS}/<split>/<CLASS>/<stem>.png: 255 where the lesion was drawn, 0 elsewhere; none for NORMAL",
        "note": "synthetic phantom images, not patient data",
    }, indent=2) + "\n")
    return counts


# ------------------------------------------------------------------------------------------------------ CLI


def _count(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be zero or more, got {v}")
    return v


def _positive(text: str) -> int:
    v = _count(text)
    if v < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return v


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.phantom", description=__doc__.split("\n\n")[0])
    p.add_argument("root", type=Path, help="folder to write OCT2017/{train,test}/<CLASS>/ into")
    p.add_argument("--train-normal", type=_count, default=1000, help="NORMAL images in train (default 1000)")
    p.add_argument("--train-abnormal", type=_count, default=10,
                   help="images per disease class in train, as the real set has (default 10)")
    p.add_argument("--test-per-class", type=_count, default=100, help="images per class in test (default 100)")
    p.add_argument("--seed", type=_count, default=0, help="same seed → byte-identical files (default 0)")
    p.add_argument("--workers", type=_positive, default=min(4, os.cpu_count() or 1),
                   help="processes rendering in parallel (default: CPU count, at most 4)")
    p.add_argument("--overwrite", action="store_true", help="delete other images found in the class folders")
    p.add_argument("--volumes", type=_count, default=0,
                   help="also write this many volumes per class under ROOT/volumes/ (default 0)")
    p.add_argument("--volume-frames", type=_positive, default=49, help="B-scans per volume (default 49)")
    args = p.parse_args(argv)

    start = time.perf_counter()
    try:
        counts = generate(args.root, args.train_normal, args.test_per_class, args.seed, args.train_abnormal,
                          workers=args.workers, overwrite=args.overwrite)
    except (PhantomError, OSError) as e:
        print(f"phantom: error: {e}", file=sys.stderr)
        return 1
    if args.volumes:
        vdir = write_volumes(args.root, args.volumes, args.volume_frames, args.seed)
        print(f"phantom: wrote {args.volumes * len(CLASSES)} volumes of {args.volume_frames} B-scans to {vdir}")
    seconds = time.perf_counter() - start
    total = sum(n for split in counts.values() for n in split.values())
    per_split = ", ".join(f"{s} {sum(counts[s].values())}" for s in SPLITS)
    print(f"phantom: wrote {total} images ({per_split}) to {Path(args.root) / 'OCT2017'} in {seconds:.1f} s "
          f"({total / max(seconds, 1e-9):.0f} img/s, {args.workers} workers, seed {args.seed})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
