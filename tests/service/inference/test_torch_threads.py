"""Each of the inference core's threads gets its torch thread count once, when it starts: the inference threads the
model's count, the CPU threads (decoding, preprocessing) one; preprocessing then changes no count per request."""

from __future__ import annotations

import numpy as np
import torch
from service_helpers import submit_batches

from octcore.preprocess import Preprocessing, preprocess_gray
from service.metrics import Metrics
from service.pipeline.pipeline import Pipeline
from service.settings import Settings


def test_thread_counts_are_fixed_per_thread(fixture_model, monkeypatch) -> None:
    before = torch.get_num_threads()
    try:
        core = Pipeline.load(Settings(model_store=fixture_model.store, model_name=fixture_model.name, device="cpu",
                                      torch_threads=2, warmup=False, cpu_workers=1), Metrics()).core
        forward_threads: list[int] = []  # the count on the inference thread, seen by each forward pass
        real_scorer = core.scorer

        def scorer(batch):
            forward_threads.append(torch.get_num_threads())
            return real_scorer(batch)

        monkeypatch.setattr(core, "scorer", scorer)  # the loaded model, a public attribute: wrapped, not replaced
        assert core.cpu_pool.submit(torch.get_num_threads).result() == 1
        calls: list[int] = []
        real = torch.set_num_threads
        monkeypatch.setattr(torch, "set_num_threads", lambda n: (calls.append(n), real(n)))
        image = np.random.default_rng(0).integers(0, 256, (496, 512), dtype=np.uint8)
        out, _ = core.cpu_pool.submit(preprocess_gray, image, Preprocessing(size=core.size)).result()
        assert out.shape == (core.size, core.size)
        assert calls == [], "preprocessing on a CPU thread changed torch's thread count"
        monkeypatch.setattr(torch, "set_num_threads", real)
        # Two batches through the core's own queue (it stops, and shuts its pools, after them).
        submit_batches(core, [(out, None)], [(out, None)])
        assert forward_threads == [2, 2]
    finally:
        torch.set_num_threads(before)
