"""What the process may hold at once across all requests: bytes of request bodies and voxels of decoded DICOM.

A request that would pass a budget is answered 503 + Retry-After at once (never queued, never grown into): memory
stays bounded whatever clients send. One request larger than the whole budget still runs when nothing else is in
flight, so a budget set below the per-request limits cannot lock a legal request out for ever.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from starlette.types import ASGIApp

from service.errors import Busy
from service.settings import Settings


class Budget:
    """A thread-safe counter with a ceiling (decoding runs in worker threads)."""

    def __init__(self, limit: int, unit: str, setting: str, retry_after_s: int = 1) -> None:
        self.limit, self.unit, self.setting, self.retry_after_s = limit, unit, setting, retry_after_s
        self.in_use = 0
        self.peak = 0
        self._lock = threading.Lock()

    def take(self, n: int) -> None:
        """Reserve `n` or raise `Busy` (503)."""
        with self._lock:
            if self.in_use and self.in_use + n > self.limit:
                raise Busy(f"{self.in_use + n} {self.unit} would be in flight; the limit is {self.limit} "
                           f"({self.setting})", headers={"Retry-After": str(self.retry_after_s)})
            self.in_use += n
            self.peak = max(self.peak, self.in_use)

    def give(self, n: int) -> None:
        with self._lock:
            self.in_use = max(0, self.in_use - n)


@dataclass
class InFlight:
    bytes: Budget
    voxels: Budget

    @classmethod
    def from_settings(cls, s: Settings) -> InFlight:
        return cls(bytes=Budget(s.max_inflight_bytes, "bytes of request bodies", "OCT_MAX_INFLIGHT_BYTES",
                                s.retry_after_s),
                   voxels=Budget(s.max_inflight_voxels, "decoded voxels", "OCT_MAX_INFLIGHT_VOXELS",
                                 s.retry_after_s))


def inflight(app: ASGIApp) -> InFlight:
    """The app's budgets (made by the app factory)."""
    return app.state.inflight  # type: ignore[attr-defined]
