"""The inference core without HTTP: maps reach the host only for the images that asked, as uint8 heatmaps equal to the
map resized and scaled on the host; every batch runs at the core's torch thread count."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from service_helpers import kermany_files, submit_batches

from octcore.manifest import load_scorer
from octcore.preprocess import Geometry, preprocess
from octcore.scanmap import scan_size
from service.metrics import Metrics
from service.pipeline.pipeline import Pipeline
from service.settings import Settings


def load(model, **settings) -> Pipeline:
    return Pipeline.load(Settings(model_store=model.store, model_name=model.name, device="cpu", warmup=False,
                                  **settings), Metrics())


def test_maps_only_for_the_images_that_asked(fixture_model) -> None:
    pipeline = load(fixture_model, max_batch_size=4, max_batch_delay_ms=50)
    core = pipeline.core
    files = kermany_files()[:3]
    x = np.stack([preprocess(Image.open(f), pipeline.cfg) for f in files])
    # Two images rendered together, one without maps.
    tags = [Geometry((0, 0, 300, 100)), None, Geometry((0, 0, 300, 100))]
    together, *singles = submit_batches(core, list(zip(x, tags, strict=True)), *([(xi, None)] for xi in x))
    assert [timing.batch_size for _, timing in together] == [3, 3, 3]  # one batch: the maps came from a shared call
    out = [o for o, _ in together]
    assert [o.maps is None for o in out] == [False, True, False]
    manifest, scorer = load_scorer(fixture_model.version_dir, device="cpu")
    with torch.inference_mode():
        raw = scorer(torch.from_numpy(x).unsqueeze(1))
    for i in (0, 2):
        assert set(out[i].maps) == set(pipeline.renderer.score_maps)
        for name, u8 in out[i].maps.items():
            assert u8.dtype == np.uint8 and u8.shape[::-1] == scan_size(tags[i], core.size)
            # The documented scale, computed on the host the way the service used to: PIL bilinear, then scale.
            m = raw[manifest.scores[name].map][i, 0].numpy()
            resized = np.asarray(Image.fromarray(m).resize(scan_size(tags[i], core.size), Image.BILINEAR))
            want = np.rint(np.clip(resized / pipeline.renderer.map_scales[name], 0, 1) * 255)
            assert np.abs(u8.astype(int) - want).max() <= 1
    for o, [(single, timing)] in zip(out, singles, strict=True):  # scores do not depend on maps or the batch
        assert set(o.scores) == set(manifest.scores)
        assert timing.batch_size == 1 and single.maps is None
        assert single.scores == pytest.approx(o.scores, rel=1e-5)


def test_the_inference_thread_keeps_the_core_thread_count(fixture_model, monkeypatch) -> None:
    """The forward pass of every batch runs at the core's torch thread count; on the CPU the heatmaps run on the
    inference thread alone (their many small ops split over threads cost CPU and saved no time), and the count is
    the core's again for the next batch."""
    import service.pipeline.render as render
    before = torch.get_num_threads()
    try:
        pipeline = load(fixture_model, torch_threads=2)
        core = pipeline.core
        seen: list[tuple[str, int]] = []  # (step, torch threads of the thread running it), in call order
        real_to_u8, real_scorer = render.to_u8, core.scorer

        def to_u8(*args, **kwargs):
            seen.append(("heatmaps", torch.get_num_threads()))
            return real_to_u8(*args, **kwargs)

        def scorer(batch):
            seen.append(("forward", torch.get_num_threads()))
            return real_scorer(batch)

        monkeypatch.setattr(render, "to_u8", to_u8)
        monkeypatch.setattr(core, "scorer", scorer)  # the loaded model, a public attribute: wrapped, not replaced
        x = np.zeros((core.size, core.size), np.float32)
        tag = Geometry((0, 0, core.size, core.size))
        batches = submit_batches(core, [(x, tag)] * 2, [(x, tag)])  # the next batch, on the same thread
        assert [[t.batch_size for _, t in b] for b in batches] == [[2, 2], [1]]
        assert all(o.maps for b in batches for o, _ in b)
        n_maps = len(pipeline.renderer.score_maps)
        # Per batch: the forward pass on the core's 2 threads, then each score's heatmap on one.
        assert seen == ([("forward", 2)] + [("heatmaps", 1)] * n_maps) * 2, seen
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
