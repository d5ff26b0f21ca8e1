"""Script → save → load, in memory: what an export does to a module, for the tests that compare before and after."""

from __future__ import annotations

import io

import torch


def script_roundtrip(module: torch.nn.Module) -> torch.jit.ScriptModule:
    buf = io.BytesIO()
    torch.jit.save(torch.jit.script(module), buf)
    buf.seek(0)
    return torch.jit.load(buf)
