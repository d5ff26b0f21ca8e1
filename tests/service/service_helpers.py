"""Helpers for the service tests: the service subprocess and image builders."""

from __future__ import annotations

import asyncio
import io
import struct
import zlib
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import pytest
from PIL import Image

from service import launch
from service.metrics import Metrics
from service.pipeline.pipeline import Pipeline
from service.settings import Settings

if TYPE_CHECKING:
    from service.inference.core import InferenceCore

T = TypeVar("T")
ROOT = Path(__file__).resolve().parents[2]
KERMANY = ROOT / "tests" / "data" / "kermany"


class ServiceProcess(launch.ServiceProcess):
    """One `python -m service` process on `store`/`name`, started at once; `stop()` sends SIGTERM and returns the
    exit code. A start that fails fails the test, with the log."""

    def __init__(self, store: Path, name: str, log_path: Path, **env: str) -> None:
        super().__init__({"OCT_MODEL_STORE": str(store), "OCT_MODEL_NAME": name, "OCT_DEVICE": "cpu",
                          "OCT_TORCH_THREADS": "1", "OCT_CPU_WORKERS": "2", "OCT_MAX_BATCH_SIZE": "8",
                          "OCT_MAX_BATCH_DELAY_MS": "20", "OCT_DRAIN_DELAY_S": "0", **env}, log_path=log_path)
        self.start(wait=False)

    def wait_ready(self, timeout: float = 90.0) -> None:
        try:
            super().wait_ready(timeout)
        except launch.StartFailed as e:
            pytest.fail(f"service {e}")

    def stop(self, timeout: float = 30.0) -> int:
        code = super().stop(timeout)
        assert code is not None
        return code


def encode(image: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def png_with_header(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims `width` x `height` 8-bit gray but whose data is tiny."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 10)) + chunk(b"IEND", b"")


def gray16(h: int = 120, w: int = 200, seed: int = 0) -> Image.Image:
    """A 16-bit gray image whose low byte matters (a test that truncates to 8 bits would see the difference)."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 65535, size=(h, w), dtype=np.uint16))


def kermany_files() -> list[Path]:
    return sorted(KERMANY.rglob("*.jpeg"))


def serve(model: Any, run: Callable[[Pipeline], Awaitable[T]], **settings: Any) -> T:
    """`run(pipeline)` on a started pipeline of `model` (no warm-up, batches of up to 4), stopped after."""
    pipeline = Pipeline.load(Settings(model_store=model.store, model_name=model.name, device="cpu", warmup=False,
                                      max_batch_size=4, **settings), Metrics())

    async def main() -> T:
        await pipeline.start()
        try:
            return await run(pipeline)
        finally:
            await pipeline.stop()

    return asyncio.run(main())


def submit_batches(core: InferenceCore, *batches: list[tuple[np.ndarray, Any]]) -> list[list[tuple[Any, Any]]]:
    """Start `core`, send each batch's items (preprocessed (S, S) image, and a Geometry when it wants heatmaps, else
    None) together through `InferenceCore.infer`, the one way in, one batch after the other, then stop it.
    → per batch, its items' (Inferred, BatchTiming)."""
    async def main() -> list[list[tuple[Any, Any]]]:
        await core.start()
        try:
            return [list(await asyncio.gather(*(core.infer(x, tag) for x, tag in batch))) for batch in batches]
        finally:
            await core.stop()

    return asyncio.run(main())
