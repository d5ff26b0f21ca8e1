"""The engine without HTTP: maps reach the host only for the images that asked, as uint8 heatmaps equal to the map
resized and scaled on the host; an upload is decoded, preprocessed, batched and answered in one call."""

from __future__ import annotations

import asyncio
import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image
from service_helpers import kermany_files, submit_batches

from octcore.manifest import load_scorer
from octcore.preprocess import preprocess
from service.engine import Engine
from service.heatmaps import heatmap_size
from service.imaging import Limits, decode_image
from service.metrics import Metrics
from service.settings import Settings

pytestmark = pytest.mark.slow


@pytest.fixture
def engine(tiny_model) -> Engine:
    return Engine.load(Settings(model_store=tiny_model.store, model_name=tiny_model.name, device="cpu",
                                max_batch_size=4, max_batch_delay_ms=50, warmup=False), Metrics())


def test_maps_only_for_the_images_that_asked(engine: Engine, tiny_model) -> None:
    files = kermany_files()[:3]
    x = np.stack([preprocess(Image.open(f), engine.cfg) for f in files])
    boxes = [(0, 0, 300, 100), None, (0, 0, 300, 100)]  # two images resized together, one without maps
    together, *singles = submit_batches(engine, list(zip(x, boxes, strict=True)), *([(xi, None)] for xi in x))
    assert [timing.batch_size for _, timing in together] == [3, 3, 3]  # one batch: the maps came from a shared call
    out = [o for o, _ in together]
    assert [o.maps is None for o in out] == [False, True, False]
    manifest, scorer = load_scorer(tiny_model.version_dir, device="cpu")
    with torch.inference_mode():
        raw = scorer(torch.from_numpy(x).unsqueeze(1))
    for i in (0, 2):
        for name, u8 in out[i].maps.items():
            assert u8.dtype == np.uint8 and u8.shape[::-1] == heatmap_size(boxes[i], engine.size)
            # The documented scale, computed on the host the way the service used to: PIL bilinear, then scale.
            m = raw[manifest.scores[name].map][i, 0].numpy()
            resized = np.asarray(Image.fromarray(m).resize(heatmap_size(boxes[i], engine.size), Image.BILINEAR))
            want = np.rint(np.clip(resized / engine.map_scales[name], 0, 1) * 255)
            assert np.abs(u8.astype(int) - want).max() <= 1
    for o, [(single, timing)] in zip(out, singles, strict=True):  # scores do not depend on maps or the batch
        assert set(o.scores) == set(manifest.scores)
        assert timing.batch_size == 1 and single.maps is None
        assert single.scores == pytest.approx(o.scores, rel=1e-5)


@pytest.mark.parametrize("fmt", ["png", "webp", "jpeg"])
def test_score_upload_answers_with_heatmaps_in_the_asked_format(engine: Engine, fmt: str) -> None:
    data = kermany_files()[0].read_bytes()

    async def main():
        await engine.start()
        try:
            return await asyncio.gather(*(engine.score_upload(data, decode_image, Limits(), heatmaps=h,
                                                              heatmap_format=fmt) for h in (True, False, True)))
        finally:
            await engine.stop()

    with_maps, without, again = asyncio.run(main())
    assert without.heatmaps is None and with_maps.scores == again.scores
    for b64 in with_maps.heatmaps.values():
        im = Image.open(io.BytesIO(base64.b64decode(b64)))
        assert im.format == fmt.upper() and im.size[0] == engine.size
        assert im.mode == ("RGB" if fmt == "webp" else "L")  # WebP has no gray mode; its three channels are equal



def test_the_inference_thread_keeps_the_engine_thread_count(tiny_model, monkeypatch) -> None:
    """The forward pass and the heatmaps of every batch run at the engine's torch thread count (one count per
    thread, set once)."""
    import service.engine as engine_module
    before = torch.get_num_threads()
    try:
        engine = Engine.load(Settings(model_store=tiny_model.store, model_name=tiny_model.name, device="cpu",
                                      torch_threads=2, warmup=False), Metrics())
        seen: list[tuple[str, int]] = []  # (step, torch threads of the thread running it), in call order
        real_to_u8, real_scorer = engine_module.to_u8, engine.scorer

        def to_u8(*args, **kwargs):
            seen.append(("heatmaps", torch.get_num_threads()))
            return real_to_u8(*args, **kwargs)

        def scorer(batch):
            seen.append(("forward", torch.get_num_threads()))
            return real_scorer(batch)

        monkeypatch.setattr(engine_module, "to_u8", to_u8)
        monkeypatch.setattr(engine, "scorer", scorer)  # the loaded model, a public attribute: wrapped, not replaced
        x = np.zeros((engine.size, engine.size), np.float32)
        box = (0, 0, engine.size, engine.size)

        async def main() -> list:
            await engine.start()
            try:
                first = await asyncio.gather(*(engine.batcher.submit(x, box) for _ in range(2)))
                return [first, [await engine.batcher.submit(x, box)]]  # the next batch, on the same thread
            finally:
                await engine.stop()

        batches = asyncio.run(main())
        assert [[t.batch_size for _, t in b] for b in batches] == [[2, 2], [1]]
        assert all(o.maps for b in batches for o, _ in b)
        n_maps = len(engine.score_maps)
        # Per batch: the forward pass, then each score's heatmap, all on the engine's 2 threads.
        assert seen == ([("forward", 2)] + [("heatmaps", 2)] * n_maps) * 2, seen
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
