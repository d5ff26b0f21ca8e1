"""Pixel-level localisation metrics of an anomaly map against lesion masks: pixel AUROC and AUPRO.

AUPRO is MVTec AD's (Bergmann et al., "The MVTec Anomaly Detection Dataset", IJCV 2021): at each threshold, the
per-region overlap (PRO) is the mean over all connected ground-truth regions of the fraction of that region above the
threshold, and the false positive rate is the fraction of lesion-free pixels above it. The area under PRO(FPR) up to
FPR 0.3, divided by 0.3, is the AUPRO: 1 when every lesion is found before any healthy pixel lights up, and unlike
the pixel AUROC it weighs a small lesion as much as a large one (small drusen count as much as a big CNV).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from octcore.preprocess import Preprocessing, preprocess_gray, to_gray, to_input

FPR_LIMIT = 0.3


def load_mask(scan: Path, mask: Path | None, prep: Preprocessing) -> np.ndarray:
    """The lesion mask of `scan` in model-input pixels, bool (S, S): cropped with the scan's own margin box and
    resized exactly as `octcore.preprocess` treats the scan, so mask and map line up. No mask file: all false."""
    if mask is None or not mask.is_file():
        return np.zeros((prep.size, prep.size), dtype=bool)
    with Image.open(scan) as im:
        _, geometry = preprocess_gray(to_gray(im), prep)
    with Image.open(mask) as m:
        gt = np.asarray(m.convert("L"), dtype=np.float32) / 255.0
    return to_input(gt, geometry, prep) >= 0.5


def pixel_auroc(maps: np.ndarray, masks: np.ndarray) -> float:
    """maps, masks (N, H, W): AUROC of "lesion pixels score higher" over every pixel of every image."""
    y = masks.ravel()
    if y.all() or not y.any():
        return float("nan")
    return float(roc_auc_score(y, maps.ravel()))


def aupro(maps: np.ndarray, masks: np.ndarray, fpr_limit: float = FPR_LIMIT) -> float:
    """maps, masks (N, H, W) → normalised area under the PRO curve for FPR in [0, fpr_limit] (see module doc).

    One sort instead of a threshold sweep: walking the pixels from the highest value down, each lesion pixel adds
    1 / (n_regions · its region's size) to PRO and each healthy pixel 1 / n_healthy to FPR; tied values form one
    step of the curve."""
    masks = masks.astype(bool)
    regions = np.zeros(masks.shape, dtype=np.int64)
    n_regions = 0
    for i, m in enumerate(masks):  # regions are connected within an image, never across images
        labels, n = ndimage.label(m)
        regions[i] = np.where(labels > 0, labels + n_regions, 0)
        n_regions += n
    n_healthy = int((~masks).sum())
    if n_regions == 0 or n_healthy == 0:
        return float("nan")
    region_size = np.bincount(regions.ravel(), minlength=n_regions + 1).astype(np.float64)
    labels = regions.ravel()
    values = maps.ravel().astype(np.float64)
    order = np.argsort(-values, kind="stable")
    labels, values = labels[order], values[order]
    pro_step = np.where(labels > 0, 1.0 / (n_regions * region_size[labels]), 0.0)
    fpr_step = np.where(labels == 0, 1.0 / n_healthy, 0.0)
    last_of_tie = np.r_[values[1:] != values[:-1], True]  # the curve only has a point after a whole tie group
    fpr = np.r_[0.0, np.cumsum(fpr_step)[last_of_tie]]
    pro = np.r_[0.0, np.cumsum(pro_step)[last_of_tie]]
    fpr[-1], pro[-1] = 1.0, 1.0  # exact end point despite float sums
    # Cut the curve at fpr_limit, interpolating the point where it crosses.
    k = int(np.searchsorted(fpr, fpr_limit, side="right"))
    if k < fpr.size:
        x0, x1, y0, y1 = fpr[k - 1], fpr[k], pro[k - 1], pro[k]
        end = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
        fpr, pro = np.r_[fpr[:k], fpr_limit], np.r_[pro[:k], end]
    return float(np.trapezoid(pro, fpr) / fpr_limit)


def pixel_metrics(maps: dict[str, np.ndarray], masks: np.ndarray) -> dict[str, dict[str, float]]:
    """{map name: {"auroc", "aupro"}} for maps (N, H, W) against masks (N, H, W)."""
    return {k: {"auroc": pixel_auroc(m, masks), "aupro": aupro(m, masks)} for k, m in maps.items()}
