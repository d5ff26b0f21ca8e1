"""Each of the engine's threads gets its torch thread count once, when it starts: the inference threads the model's
count, the CPU threads (decoding, preprocessing) one; preprocessing then changes no count per request."""

from __future__ import annotations

import numpy as np
import torch
from service_helpers import submit_batches

from octcore.preprocess import Preprocessing, preprocess_gray
from service.engine import Engine
from service.metrics import Metrics
from service.settings import Settings


def test_thread_counts_are_fixed_per_thread(tiny_model, monkeypatch) -> None:
    before = torch.get_num_threads()
    try:
        engine = Engine.load(Settings(model_store=tiny_model.store, model_name=tiny_model.name, device="cpu",
                                      torch_threads=2, warmup=False, cpu_workers=1), Metrics())
        forward_threads: list[int] = []  # the count on the inference thread, seen by each forward pass
        real_scorer = engine.scorer

        def scorer(batch):
            forward_threads.append(torch.get_num_threads())
            return real_scorer(batch)

        monkeypatch.setattr(engine, "scorer", scorer)  # the loaded model, a public attribute: wrapped, not replaced
        assert engine.cpu_pool.submit(torch.get_num_threads).result() == 1
        calls: list[int] = []
        real = torch.set_num_threads
        monkeypatch.setattr(torch, "set_num_threads", lambda n: (calls.append(n), real(n)))
        image = np.random.default_rng(0).integers(0, 256, (496, 512), dtype=np.uint8)
        out, _ = engine.cpu_pool.submit(preprocess_gray, image, Preprocessing(size=engine.size)).result()
        assert out.shape == (engine.size, engine.size)
        assert calls == [], "preprocessing on a CPU thread changed torch's thread count"
        monkeypatch.setattr(torch, "set_num_threads", real)
        # Two batches through the engine's own queue (it stops, and shuts its pools, after them).
        submit_batches(engine, [(out, None)], [(out, None)])
        assert forward_threads == [2, 2]
    finally:
        torch.set_num_threads(before)
