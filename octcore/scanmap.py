"""A map of the model's input (S × S) back onto the scan it was made from: what a heatmap is drawn with.

Region `scan`: the input is the crop box resized, so the map is resized back. Region `retina`: input column j is a
column of the box, and its rows are a band that starts `band_top[j]` rows into the box (`octcore.preprocess.
Geometry`); each column of the map is shifted back down by that much, and rows of the box outside the band get 0
(the model saw nothing there). Both run in torch where the maps are (the GPU, when serving there).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from octcore.preprocess import Geometry


def scan_size(geometry: Geometry, size: int) -> tuple[int, int]:
    """(width, height) of a map of `geometry`'s box at the model's resolution. Region `scan`: the longer side
    `size`, the box's aspect. Region `retina`: `size` columns (the input's), and rows as fine as the band's."""
    x0, y0, x1, y1 = geometry.box
    w, h = max(1, x1 - x0), max(1, y1 - y0)
    if geometry.band_top is not None:
        return size, max(1, round(h * size / geometry.band_rows))
    if w >= h:
        return size, max(1, round(size * h / w))
    return max(1, round(size * w / h)), size


def unflatten(maps: torch.Tensor, band_top: torch.Tensor, band_rows: int, height: int) -> torch.Tensor:
    """Maps (N, S, S) of retina-region inputs, their band tops (N, S) in box rows, → (N, height, S): each input
    column j moved back to the box rows it came from, at `height` rows for the box's. Bilinear; 0 outside the band."""
    s = maps.shape[-1]
    # Output row v is box row (v + 0.5) * box_rows / height, and height = box_rows * S / band_rows, so the band row
    # it reads is (v + 0.5) * band_rows / S - band_top[j], in grid_sample's [-1, 1] units over the band's rows.
    v = (torch.arange(height, device=maps.device, dtype=torch.float32) + 0.5) / s
    gy = 2.0 * (v[None, :, None] - band_top.to(torch.float32)[:, None, :] / band_rows) - 1.0  # (N, height, S)
    gx = (2.0 * torch.arange(s, device=maps.device, dtype=torch.float32) + 1.0) / s - 1.0
    grid = torch.stack([gx.expand_as(gy), gy], dim=-1)
    return F.grid_sample(maps[:, None].float(), grid, mode="bilinear", padding_mode="zeros",
                         align_corners=False)[:, 0]
