"""Synthetic lesions drawn into preprocessed normal B-scans: evidence for choosing the served score when a data set
has no abnormal scans to choose on (a normal-only training set, as every real deployment starts with).

Each lesion is placed relative to the scan's own RPE (the brightest band of each column) and mimics one of the three
diseases' signs on Spectralis OCT, at the size they take at the model's input resolution:
- `fluid`: a dark, smooth-edged pocket inside the retina above the RPE (intraretinal cysts of DME, the fluid of CNV);
- `elevation`: a dome that lifts the RPE and everything above it, with moderately bright material beneath
  (drusen, a pigment-epithelial detachment);
- `hyper`: a small bright focus inside the retina (hard exudates, hyper-reflective foci).
They are deliberately plain: the choice they feed only needs scores ranked as real lesions rank them, and
`training.export` prefers the score that did best on real and phantom folds unless these lesions show it clearly
worse (docs/quality.md).
"""

from __future__ import annotations

import numpy as np

KINDS = ("fluid", "elevation", "hyper")


def rpe_rows(x: np.ndarray) -> np.ndarray:
    """Per column, the row of the brightest band (vertically smoothed), then smoothed across columns: (W,) int."""
    s = x.shape[0]
    k = max(1, s // 32)
    kernel = np.ones(k) / k
    smooth = np.apply_along_axis(lambda c: np.convolve(c, kernel, mode="same"), 0, x)
    lo = s // 8  # the top rows hold the vitreous (and any cropped margin), never the RPE
    rows = lo + np.argmax(smooth[lo:], axis=0)
    w = max(3, s // 8) | 1
    pad = np.pad(rows, w // 2, mode="edge")
    return np.array([int(np.median(pad[i:i + w])) for i in range(x.shape[1])])


def add_lesion(x: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    """A copy of preprocessed B-scan `x` (S, S) with one lesion of `kind` drawn in."""
    s = x.shape[0]
    out = x.copy()
    rpe = rpe_rows(x)
    c = int(rng.integers(int(0.2 * s), int(0.8 * s)))
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
    dark, bright = float(np.percentile(x, 5)), float(np.percentile(x, 99.5))
    if kind == "fluid":
        a, b = rng.uniform(s / 24, s / 10), rng.uniform(s / 50, s / 22)  # half-width, half-height
        cy = rpe[c] - rng.uniform(1.5, 3.0) * b
        w = _soft_ellipse(yy, xx, cy, c, b, a)
        out = out * (1 - w) + (dark + rng.normal(0, 0.02, x.shape)) * w
    elif kind == "elevation":
        a, h = rng.uniform(s / 20, s / 8), rng.uniform(s / 60, s / 24)
        cols = np.arange(s)
        lift = np.where(np.abs(cols - c) < a, h * np.cos(np.pi / 2 * (cols - c) / a) ** 2, 0.0)
        level = float(np.median(x[rpe, cols])) * 0.5 + dark * 0.5
        for j in np.nonzero(lift >= 1)[0]:
            d, r = int(lift[j] + 0.5), min(int(rpe[j]) + 2, s)  # all down to just below the RPE moves up d rows
            out[:r - d, j] = x[d:r, j]
            out[r - d:r, j] = level + rng.normal(0, 0.03, d)
    elif kind == "hyper":
        a = rng.uniform(s / 90, s / 45)
        cy = rpe[c] - rng.uniform(s / 30, s / 12)
        w = _soft_ellipse(yy, xx, cy, c, a, a)
        out = out * (1 - w) + bright * w
    else:
        raise ValueError(f"unknown lesion kind {kind!r}; one of {KINDS}")
    return np.clip(out, float(x.min()), float(x.max())).astype(x.dtype)


def _soft_ellipse(yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
    """1 inside the ellipse, 0 outside, a one-pixel ramp at its edge (a hard edge is itself a residual)."""
    r = np.sqrt(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2)
    return np.clip((1.0 - r) * min(ry, rx) + 0.5, 0.0, 1.0).astype(np.float32)


def synthetic_set(images: np.ndarray, per_image: int, seed: int = 0) -> np.ndarray:
    """`per_image` lesioned copies of every image in `images` (N, S, S), kinds in turn: (N * per_image, S, S)."""
    rng = np.random.default_rng(seed)
    return np.stack([add_lesion(x, KINDS[(i * per_image + j) % len(KINDS)], rng)
                     for i, x in enumerate(images) for j in range(per_image)])
