"""Finding the retina in a B-scan: the RPE (its brightest continuous layer), a smooth reference under it, the ILM.

The model's input is a band of rows around the retina (`octcore.preprocess`): the retina is a band of about a third
of a 496-row B-scan, and squeezing the whole scan into the model's input spends most of its pixels on vitreous and
choroid. The band follows a *smooth* reference drawn under the RPE (a high percentile of the RPE's row over a sixth of
the scan, smoothed), not the RPE itself: curvature and tilt are flattened away, while drusen and detachments, which
lift the RPE over a few dozen A-scans, stay visible as bumps above the flat line.

numpy only (no scipy): the service imports this. Works on column bins (`BINS` columns, rows in pairs): the layers are
smooth across A-scans, and a scan of 1,536 columns costs as little as one of 512.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BINS = 128  # column bins the layers are traced on
ROW_BIN = 2  # rows averaged in pairs before tracing (496 rows → 248)
# The RPE path may move this many (binned) rows from one column bin to the next: a steeply tilted scan climbs about
# one binned row per bin; a larger step lets the path jump between layers.
MAX_STEP = 2
STEP_PENALTY = 0.02  # per binned row of step, in units of the normalised intensity: straight paths win ties
# The reference: this percentile of the RPE row (deeper = larger) over a window of REF_WINDOW of the bins, then
# smoothed. Drusen lift the RPE over well under a quarter of such a window, so the reference stays under them.
REF_PERCENTILE = 75.0
REF_WINDOW = 1 / 6
REF_SMOOTH = 1 / 24  # Gaussian sigma, fraction of the bins
# The ILM path may move this many binned rows between column bins (`_ilm`): the fovea's walls are steep.
ILM_STEP = 3
# A retina is at least this many rows thick (ILM to RPE; the fovea's floor is about 50 rows of a 496-row scan): a
# brightest layer closer than this under the ILM is the nerve fibre layer.
INNER_ROWS = 24
DEEPER_LEVEL = 0.8
# The ridge: the choroid, from this many rows under the RPE to three times as many, is darker than the RPE.
UNDER_ROWS = 20
# What a retina is (`_check`). Changing any constant in this file changes the input of every model trained on the
# retina band: tests/octcore/test_retina.py pins the traced layers of real scans.
MIN_COHERENCE = 0.75
MIN_CONTRAST = 3.0
MIN_SIGNAL = 2.0
THICKNESS = (10, 480)


class NoRetinaError(ValueError):
    """No retina was found in the image. `str()` says why in one line, without any pixel value."""


@dataclass(frozen=True)
class Retina:
    """Layer rows per column of the image the retina was found in (float, image rows; row 0 is the top)."""

    rpe: np.ndarray  # (W,) the RPE path: the brightest continuous layer
    reference: np.ndarray  # (W,) the smooth line under the RPE that the band is flattened to
    ilm: np.ndarray  # (W,) the inner limiting membrane, the retina's top
    coherence: float  # how closely the RPE path follows its columns' brightest rows (median, 0-1)
    contrast: float  # how far the RPE stands out of the background and the choroid, in units of the background's noise
    signal: float  # how much brighter the tissue between the ILM and the RPE is than the background, in those units
    thickness: float  # median rows from the ILM to the reference


def find_retina(gray: np.ndarray) -> Retina:
    """Trace the retina of a B-scan `gray` (H, W), in any units where brighter is larger (uint8 or float; white
    margins already cropped and painted dark). Raises NoRetinaError when what it finds is not a retina (`_check`):
    a scan of something else, an empty frame, noise."""
    retina = trace(gray)
    _check(retina)
    return retina


def trace(gray: np.ndarray) -> Retina:
    """`find_retina` without the check: the layers as traced, whatever the image holds."""
    h, w = gray.shape
    if h < 8 * ROW_BIN or w < 8:
        raise NoRetinaError(f"image of {w}×{h} pixels is too small to hold a retina")
    s, centres = _binned(gray)
    n = s.shape[1]
    cols = np.arange(n)
    lo = np.percentile(s, 5, axis=0)
    norm = (s - lo) / np.maximum(s.max(axis=0) - lo, 1e-6)
    rpe = _brightest_path(norm).astype(np.float64)
    # The brightest layer may be the nerve fibre layer, brighter than the RPE in some scans: the RPE is then a
    # continuous layer almost as bright below it. Under the RPE, the choroid is no such layer.
    below = np.arange(s.shape[0])[:, None] > (rpe[None] + INNER_ROWS / ROW_BIN)
    deeper = _brightest_path(np.where(below, norm, 0.0)).astype(np.float64)
    if np.median(norm[deeper.astype(np.int64), cols]) >= DEEPER_LEVEL:
        rpe = deeper
    level, spread = _background(s)
    ilm = _ilm(s, rpe)
    reference = _smooth(_running_percentile(rpe, REF_PERCENTILE, max(3, round(n * REF_WINDOW)) | 1),
                        n * REF_SMOOTH)
    at = rpe.astype(np.int64)
    bright = s[at, cols]
    # A ridge, not an edge: the RPE is brighter than the choroid's rows from UNDER_ROWS to 3 × UNDER_ROWS under it
    # (a brightness that only grows downwards, a gradient or a saturated bottom, is no layer).
    depth = np.arange(UNDER_ROWS // ROW_BIN, 3 * UNDER_ROWS // ROW_BIN + 1)
    under = s[np.minimum(at[None] + depth[:, None], s.shape[0] - 1), cols[None]].mean(axis=0)
    inside = np.arange(s.shape[0])[:, None]
    inside = (inside >= ilm[None]) & (inside < rpe[None] - 2)
    tissue = np.where(inside.any(axis=0), np.where(inside, s, 0).sum(axis=0) / np.maximum(inside.sum(axis=0), 1),
                      level)
    img_rows = lambda rows: (np.interp(np.arange(w) + 0.5, centres, rows) + 0.5) * ROW_BIN - 0.5  # noqa: E731
    return Retina(rpe=img_rows(rpe), reference=img_rows(reference), ilm=img_rows(ilm),
                  coherence=float(np.median(norm[at, cols])),
                  contrast=float(np.median(np.minimum(bright - level, bright - under)) / spread),
                  signal=float(np.median(tissue - level) / spread),
                  thickness=float(np.median(reference - ilm)) * ROW_BIN)


def _check(r: Retina) -> None:
    """Refuse what is not a retina. Thresholds measured on 1,300 real Kermany scans of every class and protocol
    against noise, speckle, gradients, blocks, a line and text (tests/octcore/test_retina.py): a
    real RPE path runs along its columns' brightest rows, stands out of the background as a ridge, has tissue
    brighter than the background above it, and lies a retina's thickness under the ILM."""
    checks = ((r.coherence >= MIN_COHERENCE, f"no continuous bright layer (coherence {r.coherence:.2f})"),
              (r.contrast >= MIN_CONTRAST, f"no layer stands out of the background as the RPE does (contrast "
                                           f"{r.contrast:.1f})"),
              (r.signal >= MIN_SIGNAL, f"no tissue above the brightest layer (signal {r.signal:.1f})"),
              (THICKNESS[0] <= r.thickness <= THICKNESS[1],
               f"the layers found lie {r.thickness:.0f} rows apart, not {THICKNESS[0]}-{THICKNESS[1]} as a "
               "retina's do"))
    for ok, why in checks:
        if not ok:  # NaN fails every comparison
            raise NoRetinaError(why)


def _background(s: np.ndarray) -> tuple[float, float]:
    """The level and spread (robust) of the image's darkest 30 %: vitreous and deep choroid, wherever they are (a
    scan cropped close to its retina has little vitreous). Spread floored at 1 % of the image's brightest: a
    synthetic or heavily averaged scan has an almost noise-free background."""
    dark = s[s <= np.percentile(s, 30)]
    level = float(np.median(dark))
    spread = float(np.median(np.abs(dark - level))) * 1.4826
    return level, max(spread, 0.01 * float(s.max()), 1e-6)


def _binned(gray: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(H, W) → (H / ROW_BIN, n) float32 column-bin means, smoothed across rows (speckle), and the bins' centres in
    image columns."""
    h, w = gray.shape
    n = min(BINS, w)
    edges = np.linspace(0, w, n + 1).round().astype(np.int64)
    rows = h // ROW_BIN * ROW_BIN
    x = gray[:rows].astype(np.float32, copy=False)
    cols = np.add.reduceat(x, edges[:-1], axis=1) / np.diff(edges).astype(np.float32)
    binned = cols.reshape(rows // ROW_BIN, ROW_BIN, n).mean(axis=1)
    # Three box passes of 3 rows: close to a Gaussian of sigma 1.4 binned rows (about 3 image rows), which merges the
    # RPE with the ellipsoid zone just above it into one ridge, so the path does not hop between the two.
    for _ in range(3):
        binned = _box_rows(binned, 1)
    return binned, (edges[:-1] + edges[1:]) / 2.0


def _box_rows(a: np.ndarray, r: int) -> np.ndarray:
    """Mean over 2r + 1 rows, edges replicated."""
    p = np.concatenate([np.repeat(a[:1], r, 0), a, np.repeat(a[-1:], r, 0)])
    c = np.cumsum(p, axis=0, dtype=np.float64)
    c = np.concatenate([np.zeros((1, a.shape[1])), c])
    return ((c[2 * r + 1:] - c[:-2 * r - 1]) / (2 * r + 1)).astype(np.float32)


def _brightest_path(score: np.ndarray, max_step: int = MAX_STEP) -> np.ndarray:
    """The row per column of the path through `score` (rows, n) with the highest sum, moving at most MAX_STEP rows
    between neighbouring columns (dynamic programming, as layer segmentations in OCT do): one bright column (a
    vessel wall, a floater) cannot pull it off the layer, as a per-column maximum would."""
    rows, n = score.shape
    penalty = STEP_PENALTY * np.abs(np.arange(-max_step, max_step + 1), dtype=np.float64)
    acc = score[:, 0].astype(np.float64)
    back = np.zeros((rows, n), np.int8)
    padded = np.full(rows + 2 * max_step, -np.inf)
    # cand[r, k]: arriving at row r from row r + k - max_step; a view of `padded`, so each column costs a few whole-
    # array operations (the per-column loop is most of finding a retina, and it runs on every scan served).
    window = np.lib.stride_tricks.sliding_window_view(padded, 2 * max_step + 1)
    cand = np.empty(window.shape)
    at = np.arange(rows)
    for j in range(1, n):
        padded[max_step:max_step + rows] = acc
        np.subtract(window, penalty, out=cand)
        k = cand.argmax(axis=1)
        acc = cand[at, k] + score[:, j]
        back[:, j] = k - max_step
    path = np.empty(n, np.int64)
    path[-1] = int(acc.argmax())
    for j in range(n - 1, 0, -1):
        path[j - 1] = path[j] + back[path[j], j]
    return path


def _running_percentile(x: np.ndarray, q: float, window: int) -> np.ndarray:
    r = window // 2
    p = np.concatenate([np.full(r, x[0]), x, np.full(r, x[-1])])
    return np.percentile(np.lib.stride_tricks.sliding_window_view(p, window), q, axis=1)


def _smooth(x: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian smoothing of a 1-D series, edges replicated."""
    r = max(1, int(3 * sigma + 0.5))
    t = np.arange(-r, r + 1)
    k = np.exp(-0.5 * (t / max(sigma, 1e-6)) ** 2)
    return np.convolve(np.concatenate([np.full(r, x[0]), x, np.full(r, x[-1])]), k / k.sum(), mode="valid")


def _ilm(s: np.ndarray, rpe: np.ndarray) -> np.ndarray:
    """The ILM: the path of the strongest dark-to-bright edge (brightness growing downwards) above the RPE, by the
    same dynamic programming as the RPE (`ILM_STEP` rows a column: the fovea's walls are steep). The vitreous-retina
    edge runs across the whole scan; a floater's or the hyaloid's is short, and speckle's is weak once smoothed."""
    rows = s.shape[0]
    edge = np.zeros_like(s)
    edge[1:-1] = s[2:] - s[:-2]
    r = np.arange(rows)[:, None]
    edge = np.where(r < rpe[None] - INNER_ROWS / (2 * ROW_BIN), np.maximum(edge, 0.0), 0.0)
    edge /= np.maximum(edge.max(axis=0, keepdims=True), 1e-6)
    return _brightest_path(edge, max_step=ILM_STEP).astype(np.float64)
