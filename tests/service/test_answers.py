"""Pipeline results → REST answers (service/answers.py): heatmaps in the asked format, the preview, the decision."""

from __future__ import annotations

import base64
import io
import time

import numpy as np
import pytest
from PIL import Image
from service_helpers import kermany_files, serve

from service.answers import image_answer
from service.pipeline.decode import Limits, decode_image
from service.pipeline.pipeline import Pipeline


@pytest.mark.parametrize("fmt", ["png", "webp", "jpeg"])
def test_heatmaps_in_the_asked_format(fixture_model, fmt: str) -> None:
    data = kermany_files()[0].read_bytes()

    async def run(p: Pipeline) -> tuple:
        result = await p.score_upload(data, decode_image, Limits(), maps=True, preview=True)
        return result, await image_answer(p, result, started=time.perf_counter(), heatmap_format=fmt)

    result, answer = serve(fixture_model, run)
    assert set(answer.heatmaps) == set(result.maps)
    for name, b64 in answer.heatmaps.items():
        im = Image.open(io.BytesIO(base64.b64decode(b64)))
        assert im.format == fmt.upper() and im.size == result.maps[name].shape[::-1]
        assert im.mode == ("RGB" if fmt == "webp" else "L")  # WebP has no gray mode; its three channels are equal
        if fmt == "png":  # lossless: the pipeline's pixels
            assert np.array_equal(np.asarray(im), result.maps[name])
    preview = Image.open(io.BytesIO(base64.b64decode(answer.preview)))
    assert np.array_equal(np.asarray(preview), result.gray)
    d = result.decision
    assert (answer.score, answer.threshold, answer.is_anomalous, answer.percentile) == (
        d.score, d.threshold, d.is_anomalous, d.percentile)
    box = answer.heatmap_box
    assert (box.x0, box.y0, box.x1, box.y1) == result.box
