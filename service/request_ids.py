"""Request ids: 32 hex digits, like `uuid4().hex`, unique rather than secret."""

from __future__ import annotations

import itertools
import os
import secrets
from collections.abc import Iterator


class _RequestIds:
    """A random prefix per process and a counter. A uuid4 reads the kernel's random pool on every request: ~1.5 % of
    the service's CPU per request, for an id that needs no secrecy."""

    def __init__(self) -> None:
        self.reset()
        os.register_at_fork(after_in_child=self.reset)  # forked workers must not share a prefix

    def reset(self) -> None:
        self.prefix: str = secrets.token_hex(8)
        self.counter: Iterator[int] = itertools.count()

    def next(self) -> str:
        return f"{self.prefix}{next(self.counter):016x}"


new_request_id = _RequestIds().next
