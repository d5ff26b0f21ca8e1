"""Which real scans choose and which report: fixed by rule, before any experiment, whatever folders are given.

Two kinds of real scans (bench/bench_real.py pools them):
- Kermany-named copies, `<CLASS>-<patient>-<n>.jpeg`: split by patient, through a hash of the patient id, so the
  same patient always lands on the same side, whichever other scans are present.
- Numbered copies of Kermany's NORMAL class, `normal_train_NNNN.jpg` (patient ids lost; contiguous numbers keep a
  patient's B-scans together): split by blocks of BLOCK numbers. The GUARD numbers on either side of a report block
  are used for nothing, so that a patient straddling the block's edge is not trained on.

`report`: used for no choice at all; the model card's numbers come from it. `select`: everything chosen (recipe,
epochs, served score, fusion, operating point) is chosen on folds of these. `guard`: neither.
Every abnormal scan stays out of training; half of the abnormal patients report, half select.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

from training.data import NUMBERED, patient_of

Role = Literal["report", "select", "guard"]
BLOCK = 100
REPORT_BLOCK_EVERY = 5  # block b reports when b % 5 == 1: 1100-1199, 1600-1699, 2100-2199, 2600-2699, 3100-3199
GUARD = 10
NORMAL_REPORT_SHARE = 5  # one Kermany-named NORMAL patient in 5 reports
ABNORMAL_REPORT_SHARE = 2  # one abnormal patient in 2


def _hash(text: str) -> int:
    return int(hashlib.md5(text.encode()).hexdigest()[:8], 16)


def role(name: str, normal: bool) -> Role:
    """The role of the scan file `name` (its class: NORMAL or not)."""
    numbered = NUMBERED.match(Path(name).stem)
    if numbered:
        n = int(numbered.group(1))
        block, offset = divmod(n, BLOCK)
        if block % REPORT_BLOCK_EVERY == 1:
            return "report"
        if (block - 1) % REPORT_BLOCK_EVERY == 1 and offset < GUARD:  # just after a report block
            return "guard"
        if (block + 1) % REPORT_BLOCK_EVERY == 1 and offset >= BLOCK - GUARD:  # just before one
            return "guard"
        return "select"
    share = NORMAL_REPORT_SHARE if normal else ABNORMAL_REPORT_SHARE
    return "report" if _hash(patient_of(Path(name))) % share == 0 else "select"


def fold(name: str, k: int) -> int:
    """The selection fold (0..k-1) of a NORMAL scan: numbered copies by block of BLOCK numbers, in turn, so a fold
    holds blocks from the whole range of the data set's patients; named copies by patient hash."""
    numbered = NUMBERED.match(Path(name).stem)
    if numbered:
        return (int(numbered.group(1)) // BLOCK) % k
    return _hash("fold:" + patient_of(Path(name))) % k


def pool_names(entries: Iterable[tuple[str, str, str]]) -> list[tuple[str, str, str]]:
    """(class, file name, md5) of scans in pooling order → (class, name in the pool, md5) of each content once: a
    name already taken by other content gets a `b` before its extension (the data set reuses names), so a pooled
    tree keeps both. `bench_real.py` pools folders so; a shipped manifest's data list uses these names."""
    seen: set[str] = set()
    taken: set[str] = set()
    out = []
    for cls, name, digest in entries:
        if digest in seen:
            continue
        seen.add(digest)
        while name in taken:
            name = f"{Path(name).stem}b{Path(name).suffix}"
        taken.add(name)
        out.append((cls, name, digest))
    return out
