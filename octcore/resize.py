"""PIL's antialiased resampling weights (Resample.c, `precompute_coeffs`), for resizing on another device.

Preprocessing resizes with PIL itself (`octcore.preprocess`). The service resizes the model's anomaly maps back to
the scan's shape where they are computed (the GPU, when there is one): with these weights that resize is PIL's
filter, so a heatmap lines up with the pixels the model saw. Every output sample is a weighted sum of the few input
samples under its filter.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def _bilinear(x: np.ndarray) -> np.ndarray:
    x = np.abs(x)
    return np.where(x < 1.0, 1.0 - x, 0.0)


def _bicubic(x: np.ndarray) -> np.ndarray:
    a = -0.5  # PIL's choice (Keys' kernel); torch's and OpenCV's plain bicubic use -0.75
    x = np.abs(x)
    return np.where(x < 1.0, ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0,
                    np.where(x < 2.0, (((x - 5.0) * x + 8.0) * x - 4.0) * a, 0.0))


def _lanczos(x: np.ndarray) -> np.ndarray:
    return np.where((x >= -3.0) & (x < 3.0), np.sinc(x) * np.sinc(x / 3.0), 0.0)


# name → (filter, support in input samples at scale 1). PIL's nearest is a lookup, not a filter: not here.
FILTERS: dict[str, tuple[Callable[[np.ndarray], np.ndarray], float]] = {
    "bilinear": (_bilinear, 1.0), "bicubic": (_bicubic, 2.0), "lanczos": (_lanczos, 3.0)}


def taps(n_in: int, n_out: int, resample: str = "bilinear") -> tuple[np.ndarray, np.ndarray]:
    """PIL's weights for resampling n_in samples to n_out: source indices and float64 weights, both (n_out, k).

    Output i is sum_t weight[i, t] * input[index[i, t]]; taps past an output's window weigh 0 (and index its last
    source sample). Downscaling widens the filter to the source spacing, which is what makes the resize antialiased.
    """
    kernel, support = FILTERS[resample]
    scale = n_in / n_out
    filter_scale = max(scale, 1.0)
    support *= filter_scale
    center = (np.arange(n_out) + 0.5) * scale
    lo = np.maximum(np.trunc(center - support + 0.5), 0).astype(np.int64)  # C's (int) cast: toward zero
    hi = np.minimum(np.trunc(center + support + 0.5), n_in).astype(np.int64)
    src = lo[:, None] + np.arange(int((hi - lo).max()))[None, :]
    inside = src < hi[:, None]
    w = np.where(inside, kernel((src - center[:, None] + 0.5) * (1.0 / filter_scale)), 0.0)
    total = w.sum(axis=1, keepdims=True)
    w = np.divide(w, total, out=np.zeros_like(w), where=total != 0.0)
    return np.minimum(src, hi[:, None] - 1), w
