"""Identity of the result objects: who made them and their UIDs.

UIDs are derived (pydicom `generate_uid(entropy_srcs=…)`, a 2.25 UUID-style UID) from the source instance and the
model version, so scoring the same instance with the same model again yields the same SR/SC UIDs: a PACS that
receives them twice stores them once instead of piling up duplicates. All instances of one source series scored by
one model share one SR series and one SC series in the source study.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pydicom.uid import generate_uid

from service.pipeline.results import ModelId

MANUFACTURER = "oct-anomaly"
SR_SERIES_NUMBER = 9101
SC_SERIES_NUMBER = 9102
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def is_uid(value: str) -> bool:
    """A syntactically valid UID (also what makes it safe as a file name and URL segment)."""
    return 0 < len(value) <= 64 and bool(_UID.match(value))


def model_label(model: ModelId) -> str:
    return f"{model.name} v{model.version}"


@dataclass(frozen=True)
class ResultIds:
    source_series_uid: str
    source_sop_uid: str
    model: ModelId

    def _uid(self, *parts: str) -> str:
        return generate_uid(entropy_srcs=[MANUFACTURER, self.model.name, str(self.model.version), *parts])

    @property
    def sr_series_uid(self) -> str:
        return self._uid("sr-series", self.source_series_uid)

    @property
    def sc_series_uid(self) -> str:
        return self._uid("sc-series", self.source_series_uid)

    @property
    def sr_sop_uid(self) -> str:
        return self._uid("sr", self.source_sop_uid)

    @property
    def sc_sop_uid(self) -> str:
        return self._uid("sc", self.source_sop_uid)

    @property
    def device_uid(self) -> str:
        return self._uid("device")

    @property
    def sr_series_number(self) -> int:
        return SR_SERIES_NUMBER

    @property
    def sc_series_number(self) -> int:
        return SC_SERIES_NUMBER

    def tracking_uid(self, what: str) -> str:
        return self._uid("tracking", self.source_sop_uid, what)
