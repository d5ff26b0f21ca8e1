"""The pipeline without HTTP, on the fixture scorers (maps = half the input, so what a heatmap shows is known): an
upload's heatmaps come only when asked; a model of the retina band answers real scans with heatmaps on the retina,
refuses an image without one, and decides a volume on the frames that hold one."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from service_helpers import KERMANY, ROOT, serve

from octcore.manifest import read_manifest
from octcore.preprocess import Preprocessing, preprocess_gray
from octcore.scanmap import scan_size
from service.errors import NoRetina
from service.pipeline.decode import Limits, decode_image
from service.pipeline.pipeline import Pipeline

REAL = sorted(KERMANY.glob("*.jpeg")) + sorted((ROOT / "tests" / "data" / "kermany-c8").glob("*.jpg"))
SAME_SIZE = [KERMANY / f for f in ("NORMAL-1017237-1.jpeg", "CNV-103044-2.jpeg", "DME-30521-11.jpeg")]  # 512 × 496


def gray(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("L"))


class Stack:
    """A volume's frames, as service.dicom.decode.DicomImage gives them: float [0, 1]."""

    def __init__(self, frames: list[np.ndarray]) -> None:
        self.frames = [f.astype(np.float32) / 255.0 for f in frames]

    @property
    def number_of_frames(self) -> int:
        return len(self.frames)

    def frame(self, index: int) -> np.ndarray:
        return self.frames[index]


def _cfg(model) -> Preprocessing:
    return read_manifest(model.version_dir).preprocessing_config()


def noise(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (496, 512), dtype=np.uint8)


def test_an_upload_has_heatmaps_only_when_asked_and_its_decision_is_the_b_scan_rule(fixture_model) -> None:
    data = SAME_SIZE[1].read_bytes()

    async def run(p: Pipeline) -> list:
        return list(await asyncio.gather(*(p.score_upload(data, decode_image, Limits(), maps=m, preview=m)
                                           for m in (True, False))))

    with_maps, without = serve(fixture_model, run)
    assert without.maps is None and without.gray is None and with_maps.scores == without.scores
    geometry = preprocess_gray(gray(SAME_SIZE[1]), _cfg(fixture_model))[1]
    assert with_maps.box == geometry.box
    for u8 in with_maps.maps.values():
        assert u8.dtype == np.uint8 and u8.shape[::-1] == scan_size(geometry, 64)
    assert np.array_equal(with_maps.gray, gray(SAME_SIZE[1]))  # the decoded scan, for the preview
    d = with_maps.decision
    assert (d.max_frame, d.window) == (0, 1) and d.is_anomalous == (d.score > d.threshold)


@pytest.mark.parametrize("path", REAL, ids=lambda p: p.name)
def test_retina_band_heatmaps_lie_on_the_retina(retina_model, path: Path) -> None:
    """Each real scan (Kermany test scans and numbered C8 copies, 512 to 1,536 A-scans wide): its heatmaps cover the
    box at the band's resolution, and what they show is the retina, not the vitreous above it nor the rows under the
    band (the fixture's maps are its input: bright tissue, dark background)."""
    image = gray(path)
    result = serve(retina_model, lambda p: p.score_image(image, maps=True))
    cfg = _cfg(retina_model)
    geometry = preprocess_gray(image, cfg)[1]
    assert geometry.retina is not None and result.box == geometry.box
    x0, y0, x1, y1 = geometry.box
    for name, u8 in result.maps.items():
        assert u8.shape[::-1] == scan_size(geometry, cfg.size), name
        heat = np.asarray(Image.fromarray(u8).resize((x1 - x0, y1 - y0), Image.Resampling.BILINEAR), np.float64)
        rows = np.arange(y1 - y0)[:, None]
        vitreous = rows < geometry.retina.ilm[None, :] - 12  # well above the inner limiting membrane
        under = rows > geometry.retina.reference[None, :] + cfg.band_below + 4  # under the band
        assert heat.sum() > 0, name
        assert heat[vitreous].sum() < 0.05 * heat.sum(), (name, heat[vitreous].sum() / heat.sum())
        assert heat[under].max(initial=0) == 0, name


@pytest.mark.parametrize("image", [noise(), np.zeros((496, 512), np.uint8)], ids=["noise", "blank"])
def test_an_image_without_a_retina_is_refused_with_the_reason(retina_model, image: np.ndarray) -> None:
    with pytest.raises(NoRetina) as refused:
        serve(retina_model, lambda p: p.score_image(image, maps=True))
    assert refused.value.status == 422 and refused.value.slug == "no-retina"
    assert refused.value.detail and "\n" not in refused.value.detail


def test_a_volume_is_decided_on_the_frames_that_hold_a_retina(retina_model) -> None:
    frames = [gray(SAME_SIZE[0]), noise(1), gray(SAME_SIZE[1]), gray(SAME_SIZE[2])]

    async def one_by_one(p: Pipeline) -> tuple:
        volume = await p.score_volume(Stack(frames), maps=True)
        alone = [await p.score_image(Stack([f]).frame(0), maps=False) for i, f in enumerate(frames) if i != 1]
        return volume, alone, p.decider

    volume, alone, decider = serve(retina_model, one_by_one)
    assert [f.index for f in volume.frames] == [0, 1, 2, 3]
    refused = volume.frames[1]
    assert refused.image is None and refused.refused.startswith("no retina: ")
    assert [f.index for f in volume.scored] == [0, 2, 3] and all(f.image.maps for f in volume.scored)
    primary = [a.decision.score for a in alone]
    assert [f.image.decision.score for f in volume.scored] == pytest.approx(primary)
    want = decider.decide(primary)  # the volume rule on the three scored frames, as if the noise were not there
    d = volume.decision
    assert (d.score, d.threshold, d.window) == pytest.approx((want.score, want.threshold, want.window))
    assert d.max_frame == [0, 2, 3][want.max_frame]  # an index into the volume's frames
    assert volume.top.decision == volume.frames[d.max_frame].image.decision  # the most anomalous frame's result


def test_a_volume_without_any_retina_is_refused(retina_model) -> None:
    with pytest.raises(NoRetina, match="none of the 2 frames"):
        serve(retina_model, lambda p: p.score_volume(Stack([noise(2), noise(3)]), maps=False))
