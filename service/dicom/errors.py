"""Why a DICOM upload was refused: each kind is a `Problem` (HTTP 4xx problem+json on `/score`) that also carries
the DICOM status code a STOW-RS response puts in FailureReason (0008,1197) (PS3.4 Annex GG, PS3.18 §10.5)."""

from __future__ import annotations

from service.errors import Problem

PROCESSING_FAILURE = 0x0110


class DicomProblem(Problem):
    status, slug, title = 422, "dicom-invalid", "The DICOM object cannot be scored"
    # 0xC000: "Error: Cannot understand" — the generic STOW failure when nothing more specific applies.
    failure_reason = 0xC000


class NotDicom(DicomProblem):
    slug, title = "dicom-not-dicom", "Not a DICOM Part 10 file (no 128-byte preamble + 'DICM' and file meta)"


class TruncatedDicom(DicomProblem):
    slug, title = "dicom-truncated", "The DICOM file ends before its declared content"


class NoPixelData(DicomProblem):
    slug, title = "dicom-no-pixel-data", "The DICOM image has no (integer) Pixel Data"
    failure_reason = 0xA900  # Data Set does not match SOP Class


class NotAnImage(DicomProblem):
    slug, title = "dicom-not-an-image", "The SOP class is not an image (e.g. SR, presentation state, document)"
    failure_reason = 0x0122  # Referenced SOP Class not supported


class UnsupportedTransferSyntax(DicomProblem):
    status, slug, title = 415, "dicom-unsupported-transfer-syntax", "No pixel decoder for this transfer syntax"
    failure_reason = 0xC122  # Referenced Transfer Syntax not supported


class FrameCountMismatch(DicomProblem):
    slug, title = "dicom-frame-count-mismatch", "NumberOfFrames does not match the pixel data"
    failure_reason = 0xA900


class UnsupportedPixels(DicomProblem):
    slug, title = "dicom-unsupported-pixels", "Pixel layout not supported (photometric interpretation, bits, size)"
    failure_reason = 0xA900


class StudyMismatch(DicomProblem):
    slug, title = "dicom-study-mismatch", "The instance belongs to another study than the one in the URL"
    failure_reason = 0xA900


class OwnResult(DicomProblem):
    slug, title = "dicom-own-result", "A result object made by this service; it is not scored again"
    failure_reason = 0x0122


class ResultsNotBuildable(DicomProblem):
    slug, title = "dicom-results-not-buildable", "Result objects cannot be derived from this instance"
    failure_reason = 0xA900


class NoRetinaInObject(DicomProblem):
    """A model of the retina band, and no frame of the object holds a retina: nothing to score, nothing stored."""

    slug, title = "no-retina", "No retina found"
    failure_reason = PROCESSING_FAILURE


class ResultNotFound(Problem):
    status, slug, title = 404, "result-not-found", "No result for this SOP Instance UID"
