"""PIL's antialiased resize of a float image (`Image.resize` on mode "F"), as two sparse matrix products in torch.

Every output line is a weighted sum of the few input lines under its filter, with PIL's own weights (Resample.c,
`precompute_coeffs`). So the whole resize is W_rows · X · W_colsᵀ with two banded matrices, built once per
(input length, output length). torch's sparse × dense product (MKL where torch has it) runs those sums vectorised
along each line, where PIL's float path loops pixel by pixel: 0.18 against 0.36 ms for a 512 × 496 scan to 256²,
one thread, conversion from uint8 included (`bench/bench_decode_preprocess.py`). The sums are float32 where PIL's
are double, so the two agree to float rounding: a few ulp, at most 1e-6 of the 0..255 range in the tests. On one
machine the result is deterministic; another CPU's MKL may round differently within that.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Callable, Iterator

import numpy as np
import torch

# torch says once per process that sparse CSR tensors are "in beta"; the CSR × dense product used here is long-standing.
# Filtered for that message only, at import (a `catch_warnings` block is not thread-safe).
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta", category=UserWarning)


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


@functools.lru_cache(maxsize=256)  # crops vary by a few pixels per scan: a few dozen shapes in practice
def _matrix(n_in: int, n_out: int, resample: str, gain: float, n_cols: int) -> torch.Tensor:
    """(n_out, n_cols) sparse CSR float32 matrix of `taps`, times `gain`; columns from n_in on (padding) weigh 0."""
    index, w = taps(n_in, n_out, resample)
    keep = w != 0.0
    crow = np.concatenate([[0], np.cumsum(keep.sum(axis=1))])
    return torch.sparse_csr_tensor(torch.from_numpy(crow), torch.from_numpy(index[keep]),
                                   torch.from_numpy((w[keep] * gain).astype(np.float32)), size=(n_out, n_cols),
                                   check_invariants=True)  # once per shape: cheap, and it checks the layout


def _padded(n: int) -> int:
    """Row length for an n-wide float32 image that is transposed later: a row of 512 or 256 floats is a power-of-two
    stride, so a column walk maps every element to the same few cache sets (0.16 against 0.03 ms for the transposing
    copy of a 256 × 512 image). Eight floats more break that."""
    return n + 8


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """torch's ops in this block run on the calling thread alone. The work here is a few passes over memory that
    cost more CPU split over torch's pool than on one thread. The count is per calling thread, so a forward pass
    running meanwhile in another thread keeps its own; but a thread whose first torch op falls inside the block
    starts with one too (torch gives a new thread the count last set), so long-lived threads set theirs.
    A serving process sets 1 once on the threads that preprocess (the event loop, the engine's CPU threads), so there
    this block finds 1 and changes nothing; it still matters in training's and export's processes."""
    n = torch.get_num_threads()
    if n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def resize(x: np.ndarray, size: int, resample: str = "bilinear", gain: float = 1.0,
           offset: float = 0.0) -> np.ndarray:
    """uint8 or float32 (H, W) → float32 (size, size), C-contiguous: PIL's `resize((size, size), resample)` of the
    image as mode "F", times `gain`, plus `offset` (the gain rides in the weights, the offset in the last copy)."""
    h, w = x.shape
    first = _matrix(h, size, resample, float(gain), h)
    second = _matrix(w, size, resample, 1.0, _padded(w))
    image = np.empty((h, _padded(w)), np.float32)  # the conversion to float is this copy
    image[:, :w] = x
    image[:, w:] = 0.0
    with one_torch_thread():
        rows = torch.sparse.mm(first, torch.from_numpy(image)).numpy()  # (size, W): resized down the columns
        # The second product combines rows too, so it takes the transpose.
        rows_t = np.empty((_padded(w), _padded(size)), np.float32)
        rows_t[:, :size] = rows.T
        rows_t[:, size:] = 0.0
        cols = torch.sparse.mm(second, torch.from_numpy(rows_t)).numpy()  # (size, size + pad), transposed
    return np.add(cols[:, :size].T, np.float32(offset), order="C")
