"""Score maps → 8-bit heatmaps laid on the scanned region, on the device where the maps are.

Value scale: a pixel value v (0..255) stands for map value v / 255 * map_scale, where map_scale is the manifest's
`calibration[<score>].map_scale` (a high percentile of that map on normal validation images). So 255 means "at or
above what normal retinas reach", and the same gray level means the same evidence across images and requests.

Where a map lands (`octcore.scanmap`): region `scan`, the input was the crop box resized, so the map is resized to the
box's aspect ratio (the longer side stays S); region `retina`, the input was a band of rows flattened under the RPE,
so each column goes back to the rows of the box it came from (`unflatten`, 0 outside the band) at S columns. Either
way the heatmap covers `Geometry.box`, and its size is `scan_size(geometry, S)`.

`HeatmapRenderer` is the inference core's device stage: it runs in the inference thread on the batch's maps (on the
GPU when serving there), images of one heatmap size together, so only uint8 pixels of the maps a request asked for
cross to the host. Encoding them as image files is the REST layer's (`service.encode`).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence

import numpy as np
import torch

from octcore.manifest import Manifest
from octcore.preprocess import Geometry
from octcore.resize import taps
from octcore.scanmap import scan_size, unflatten
from service.inference.core import MapGroup

log = logging.getLogger("oct.render")
Box = tuple[int, int, int, int]


def to_u8(maps: torch.Tensor, map_scale: float, box: Box) -> torch.Tensor:
    """Maps (..., S, S) of region-`scan` inputs sharing one crop box and one scale → uint8 (..., h, w) on their
    device: value = rint(clip(map / map_scale, 0, 1) * 255). Resized with antialiased bilinear filtering, PIL's
    BILINEAR on a float image (to float rounding)."""
    side = maps.shape[-1]
    gain = _gain(map_scale)
    m = maps.float()
    w, h = scan_size(Geometry(box), side)  # the longer side stays S, so at most one axis is resized
    if h != side:
        q = _resize_axis(m, h, -2, gain)
    elif w != side:
        q = _resize_axis(m, w, -1, gain)
    else:
        q = m * gain
    return _quantize(q)


def band_to_u8(maps: torch.Tensor, map_scale: float, band_top: torch.Tensor, band_rows: int,
               height: int) -> torch.Tensor:
    """Maps (N, S, S) of region-`retina` inputs, their band tops (N, S) in box rows → uint8 (N, height, S): each
    column back on the box's rows (`octcore.scanmap.unflatten`, 0 outside the band), then the same scale."""
    return _quantize(unflatten(maps, band_top, band_rows, height).mul_(_gain(map_scale)))


def _gain(map_scale: float) -> float:
    return 255.0 / (map_scale if map_scale > 0 else 1.0)


def _quantize(q: torch.Tensor) -> torch.Tensor:
    """Values in 0..255 units → uint8, NaN as 0. Through int32: torch's direct float → uint8 cast on the CPU takes
    twice as long (values are 0..255 here)."""
    return q.nan_to_num_(0.0).clamp_(0.0, 255.0).round_().to(torch.int32).to(torch.uint8)


def _resize_axis(m: torch.Tensor, n_out: int, axis: int, gain: float) -> torch.Tensor:
    """Antialiased bilinear resize of one axis (-2 or -1) to `n_out`, times `gain`: each output line is a weighted sum
    of the few input lines under its filter, so the work is a handful of whole-tensor gathers and multiply-adds
    (F.interpolate's antialiased kernel took ~1.5× as long on a batch of heatmaps, one thread). The scale rides in
    the weights."""
    index, weight = _taps(m.shape[axis], n_out, m.device)
    along = (n_out, 1) if axis == -2 else (n_out,)
    out: torch.Tensor | None = None
    for t in range(index.shape[0]):
        w_t = weight[t].view(along) * gain
        lines = m.index_select(axis, index[t])
        out = lines.mul_(w_t) if out is None else out.addcmul_(lines, w_t)
    assert out is not None
    return out


@functools.lru_cache(maxsize=64)
def _taps(n_in: int, n_out: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """PIL's antialiased bilinear weights (`octcore.resize.taps`, what preprocessing resizes with) as (k, n_out)
    source indices and float32 weights on `device`: tap t of output i reads input index[t, i]."""
    index, weight = taps(n_in, n_out, "bilinear")
    return (torch.from_numpy(np.ascontiguousarray(index.T)).to(device),
            torch.from_numpy(weight.T.astype(np.float32)).to(device))


class HeatmapRenderer:
    """The device stage for a model's maps: {score name: uint8 heatmap} for every image whose tag (its `Geometry`)
    asks for them, one score's maps at a time per group of images of one heatmap size. Stacking the scores first cost
    ~40 % more CPU (a copy of every map, and every pass over a tensor K times larger)."""

    def __init__(self, manifest: Manifest, device: str) -> None:
        self.size = manifest.input.size
        self.device = device
        # score name → the output holding its map; driven by the manifest so new scores need no service change.
        self.score_maps = {k: s.map for k, s in manifest.scores.items() if s.map}
        self.map_scales = {k: float(manifest.calibration[k].map_scale or 1.0) for k in self.score_maps}
        for k in self.score_maps:
            if not manifest.calibration[k].map_scale:
                log.warning("calibration[%r] has no map_scale: its heatmap uses map_scale 1.0", k)
        cfg = manifest.preprocessing_config()
        self._band_rows = cfg.band_above + cfg.band_below if cfg.region == "retina" else 0

    def warm_tag(self) -> Geometry:
        """A tag of the kind real inputs bring, so warm-up runs the same kernels."""
        box = (0, 0, self.size, self.size)
        if not self._band_rows:
            return Geometry(box)
        return Geometry(box, np.zeros(self.size, np.float32), self._band_rows)

    def __call__(self, out: dict[str, torch.Tensor], tags: Sequence[Geometry | None]) -> list[MapGroup]:
        groups: dict[tuple[int, int], list[int]] = {}
        for i, g in enumerate(tags):
            if g is not None:
                groups.setdefault(scan_size(g, self.size), []).append(i)
        result: list[MapGroup] = []
        for (_, h), idx in groups.items():
            rows = None if len(idx) == len(tags) else torch.tensor(idx, device=self.device)  # usually all
            first = tags[idx[0]]
            assert first is not None
            band_top = None
            if first.band_top is not None:
                band_top = torch.from_numpy(np.stack([tags[i].band_top for i in idx])).to(self.device)  # type: ignore[union-attr]
            heat = {}
            for k, name in self.score_maps.items():
                m = out[name][:, 0]
                m = m if rows is None else m.index_select(0, rows)
                heat[k] = (to_u8(m, self.map_scales[k], first.box) if band_top is None
                           else band_to_u8(m, self.map_scales[k], band_top, first.band_rows, h))
            result.append((idx, heat))
        return result
