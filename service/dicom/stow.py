"""The STOW-RS response (PS3.18 §10.5.3): an application/dicom+json data set listing stored instances in
ReferencedSOPSequence (0008,1199), each with a RetrieveURL (0008,1190), and refused ones in FailedSOPSequence
(0008,1198) with a FailureReason (0008,1197); HTTP 200 when all were stored, 202 when some were, 409 when none."""

from __future__ import annotations

from dataclasses import dataclass, field

from pydicom.dataset import Dataset

DICOM_JSON = "application/dicom+json"


@dataclass
class StowOutcome:
    stored: list[tuple[str, str, str]] = field(default_factory=list)  # (SOP class, SOP instance, retrieve URL)
    failed: list[tuple[str, str, int]] = field(default_factory=list)  # (SOP class, SOP instance, reason)

    @property
    def http_status(self) -> int:
        if not self.failed:
            return 200
        return 202 if self.stored else 409

    def to_json(self) -> dict:
        ds = Dataset()
        if self.stored:
            ds.ReferencedSOPSequence = [_ref(c, i, RetrieveURL=url) for c, i, url in self.stored]
        if self.failed:
            ds.FailedSOPSequence = [_ref(c, i, FailureReason=reason) for c, i, reason in self.failed]
        return ds.to_json_dict()


def _ref(sop_class: str, sop_instance: str, **extra: object) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = sop_class
    item.ReferencedSOPInstanceUID = sop_instance
    for k, v in extra.items():
        setattr(item, k, v)
    return item
