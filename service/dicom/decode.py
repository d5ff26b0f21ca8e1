"""DICOM Part 10 bytes → gray frames in [0, 1], the same units `octcore.preprocess.to_gray` gives a PNG/JPEG.

Intensity mapping (fixed per file, never per-image min/max, so a score does not depend on what else is in the frame):
stored values are mapped through Rescale Slope/Intercept (Modality LUT), then the *rescaled* range of every value
BitsStored can hold ([0, 2^BitsStored − 1], or the two's-complement range when signed) is mapped linearly onto
[0, 1]. An 8-bit OCT frame therefore gives exactly v / 255 — the same numbers as the JPEG it came from — and 16-bit
v / 65535. VOI windows (Window Center/Width) are display settings for people and are ignored. MONOCHROME1 is
inverted so that bright is always high. Colour (RGB, YBR, palette) becomes luma with ITU-R 601 weights, as in
`to_gray`.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.encaps import parse_basic_offsets, parse_fragments
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_color_lut, get_decoder
from pydicom.uid import UID

from service.dicom.errors import (
    DicomProblem,
    FrameCountMismatch,
    NoPixelData,
    NotAnImage,
    NotDicom,
    TruncatedDicom,
    UnsupportedPixels,
    UnsupportedTransferSyntax,
)
from service.dicom.phi import library_error, text_values

OPHTHALMIC_TOMOGRAPHY = "1.2.840.10008.5.1.4.1.1.77.1.5.4"
PIXEL_DATA = 0x7FE00010
# Decoded voxels a single object may hold (all frames): 128 Mi float32 = 512 MiB; a 1024×1024×128 OCT volume fits.
MAX_TOTAL_PIXELS = 128 * 1024 * 1024
MAX_SIDE = 16384
_PHOTOMETRIC = {"MONOCHROME1", "MONOCHROME2", "RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT",
                "PALETTE COLOR"}
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


@dataclass
class DicomImage:
    """A decoded DICOM image. Pixels stay in their stored type (1 or 2 bytes a sample) and become float32 one frame
    at a time (`frame`), so a volume costs its stored size, not four times it. `dataset` (without Pixel Data) is
    kept so result objects can be derived from it; `phi` holds its text values (service.dicom.phi)."""

    stored: np.ndarray  # (N, H, W, samples) as decoded
    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    dataset: Dataset
    phi: frozenset[str] = frozenset()

    @property
    def number_of_frames(self) -> int:
        return int(self.stored.shape[0])

    def frame(self, index: int) -> np.ndarray:
        """(H, W) float32 in [0, 1]."""
        return _to_unit_gray(self.stored[index:index + 1], self.dataset)[0]

    @property
    def frames(self) -> np.ndarray:
        """(N, H, W) float32 in [0, 1]: the whole volume at once (tests, small objects)."""
        return _to_unit_gray(self.stored, self.dataset)


def decode_dicom(data: bytes, *, max_total_pixels: int = MAX_TOTAL_PIXELS, max_side: int = MAX_SIDE,
                 max_frame_pixels: int | None = None, reserve: Callable[[int], None] | None = None) -> DicomImage:
    """Parse and decode a DICOM Part 10 file. Raises a `DicomProblem` subclass naming what is wrong.
    The size limits are checked from the header, before any pixel is decoded; then `reserve(voxels)` may refuse
    (raise) when the service holds too many decoded voxels already. A raised DicomProblem carries the object's
    text values in `phi`, so the caller can keep them out of what it logs."""
    ds = read_dataset(data)
    try:
        return _decode(ds, max_total_pixels, max_side, max_frame_pixels, reserve)
    except DicomProblem as e:
        e.phi = frozenset(text_values(ds))
        raise


def _decode(ds: Dataset, max_total_pixels: int, max_side: int, max_frame_pixels: int | None,
            reserve: Callable[[int], None] | None) -> DicomImage:
    ts = _transfer_syntax(ds)
    _require_pixel_data(ds)
    rows, cols, n_frames = _geometry(ds, max_total_pixels, max_side)
    if max_frame_pixels is not None and rows * cols > max_frame_pixels:
        raise UnsupportedPixels(f"{rows}×{cols} frames are over the limit of {max_frame_pixels} pixels")
    _check_decodable(ts)
    if ts.is_encapsulated:
        _check_fragments(ds, n_frames)
    else:
        _check_native_length(ds, rows, cols, n_frames)
    if reserve is not None:
        reserve(rows * cols * n_frames)
    raw = _decode_pixels(ds, n_frames).reshape(n_frames, rows, cols, -1)
    # The pixels live on in `raw`; the encoded copy is not needed by the result builders.
    del ds.PixelData
    return DicomImage(stored=raw, study_instance_uid=str(ds.get("StudyInstanceUID", "")),
                      series_instance_uid=str(ds.get("SeriesInstanceUID", "")),
                      sop_instance_uid=str(ds.get("SOPInstanceUID", "")), sop_class_uid=str(ds.SOPClassUID),
                      transfer_syntax_uid=str(ts), dataset=ds, phi=frozenset(text_values(ds)))


def identify(data: bytes) -> tuple[str, str]:
    """(SOP Class UID, SOP Instance UID) of whatever can be parsed, for a STOW failure entry; '' when unknown."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
        meta = ds.get("file_meta") or Dataset()
        return (str(ds.get("SOPClassUID") or meta.get("MediaStorageSOPClassUID") or ""),
                str(ds.get("SOPInstanceUID") or meta.get("MediaStorageSOPInstanceUID") or ""))
    except Exception:  # the caller already knows the object is bad; any UID found is a bonus
        return "", ""


def is_dicom(head: bytes) -> bool:
    """A Part 10 file starts with a 128-byte preamble and the magic 'DICM'."""
    return len(head) >= 132 and head[128:132] == b"DICM"


def read_dataset(data: bytes) -> Dataset:
    """Parse (without decoding pixels) and check the parts every later step relies on."""
    if not is_dicom(data):
        raise NotDicom("expected a DICOM Part 10 file: 128-byte preamble, then 'DICM', then the file meta group")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ds = pydicom.dcmread(io.BytesIO(data))
    except InvalidDicomError as e:
        raise NotDicom(f"not a DICOM Part 10 file ({library_error(e)})") from e
    except ValueError as e:
        if "transfer syntax" in str(e).lower():  # a private/unknown transfer syntax: the data set's encoding is unknown
            raise UnsupportedTransferSyntax("unknown or private transfer syntax") from e
        raise TruncatedDicom(f"the file cannot be parsed (truncated or corrupt; {library_error(e)})") from e
    except Exception as e:  # pydicom raises struct/EOF/value errors when the byte stream stops mid-element
        raise TruncatedDicom(f"the file cannot be parsed (truncated or corrupt; {library_error(e)})") from e
    if any("end of file" in str(w.message).lower() for w in caught):
        raise TruncatedDicom("the file ends inside a sequence or encapsulated pixel data")
    _check_last_element_complete(ds, len(data))
    if "SOPClassUID" not in ds:
        sop = ds.file_meta.get("MediaStorageSOPClassUID")
        if not sop:
            raise TruncatedDicom("no SOP Class UID in the data set or file meta (truncated or corrupt)")
        ds.SOPClassUID = sop
    return ds


def _transfer_syntax(ds: Dataset) -> UID:
    ts = ds.file_meta.get("TransferSyntaxUID")
    if not ts:
        raise TruncatedDicom("the file meta has no Transfer Syntax UID (truncated or corrupt)")
    return UID(ts)


def _check_last_element_complete(ds: Dataset, size: int) -> None:
    # pydicom stops without complaint when the bytes run out: a value cut short is kept short, and an element
    # header or encapsulated item cut short is dropped. Elements are read in order, so a complete file ends
    # exactly where its last top-level element ends.
    if not ds.keys():  # what pydicom returns when the first undefined-length element runs off the end
        raise TruncatedDicom("no data elements after the file meta (truncated or corrupt)")
    elem = ds.get_item(max(ds.keys()))
    length, value_tell = getattr(elem, "length", None), getattr(elem, "value_tell", None)
    if length is None or value_tell is None or length == 0xFFFFFFFF:
        return  # already converted, or undefined length (ends at a delimiter): nothing to compare against
    if value_tell + length != size:
        raise TruncatedDicom(f"element {elem.tag} ends at byte {value_tell + length} but the file has {size} "
                             "(truncated or corrupt)")


def _require_pixel_data(ds: Dataset) -> None:
    if "PixelData" in ds:
        return
    if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
        raise UnsupportedPixels("float pixel data is not supported; integer Pixel Data (7FE0,0010) is required")
    sop = UID(ds.SOPClassUID)
    if _is_image_class(sop):
        raise NoPixelData(f"{sop.name or sop} object without Pixel Data (7FE0,0010)")
    raise NotAnImage(f"SOP class {sop.name or sop} ({sop}) is not an image; nothing to score")


def _is_image_class(sop: UID) -> bool:
    name = sop.name if sop.name != str(sop) else ""
    return "Image" in name or sop == OPHTHALMIC_TOMOGRAPHY


def _geometry(ds: Dataset, max_total_pixels: int, max_side: int) -> tuple[int, int, int]:
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        n_frames = int(ds.get("NumberOfFrames") or 1)
        bits_allocated, spp = int(ds.BitsAllocated), int(ds.get("SamplesPerPixel", 1))
        bits_stored = int(ds.get("BitsStored", bits_allocated))
        photometric = str(ds.PhotometricInterpretation).strip().upper()
    except (AttributeError, TypeError, ValueError) as e:
        raise UnsupportedPixels(f"missing or invalid image pixel attribute (Rows, Columns, NumberOfFrames, "
                                f"BitsAllocated, BitsStored, SamplesPerPixel, PhotometricInterpretation; "
                                f"{library_error(e)})") from e
    if rows < 1 or cols < 1 or n_frames < 1:
        raise UnsupportedPixels(f"Rows={rows}, Columns={cols}, NumberOfFrames={n_frames}: all must be ≥ 1")
    if rows > max_side or cols > max_side or rows * cols * n_frames > max_total_pixels:
        raise UnsupportedPixels(f"{n_frames}×{rows}×{cols} is over the limit of {max_side} per side and "
                                f"{max_total_pixels} pixels per object")
    if bits_allocated not in (8, 16) or not 1 <= bits_stored <= bits_allocated:
        raise UnsupportedPixels(f"BitsAllocated={bits_allocated}, BitsStored={bits_stored}: 8 or 16 allocated only")
    if spp not in (1, 3) or photometric not in _PHOTOMETRIC:
        raise UnsupportedPixels(f"SamplesPerPixel={spp}, PhotometricInterpretation={photometric} not supported")
    return rows, cols, n_frames


def _check_decodable(ts: UID) -> None:
    try:
        decoder = get_decoder(ts)
    except NotImplementedError as e:
        raise UnsupportedTransferSyntax(f"transfer syntax {ts.name or ts} ({ts}) has no pixel decoder") from e
    if not decoder.is_available:
        raise UnsupportedTransferSyntax(f"transfer syntax {ts.name} ({ts}) needs a decoder plugin that is not "
                                        "installed (JPEG baseline, JPEG-LS, JPEG 2000 and RLE are)")


def _check_native_length(ds: Dataset, rows: int, cols: int, n_frames: int) -> None:
    frame_bytes = rows * cols * int(ds.get("SamplesPerPixel", 1)) * int(ds.BitsAllocated) // 8
    have, want = len(ds.PixelData), frame_bytes * n_frames
    if have == want or have == want + 1:  # one trailing pad byte keeps the value length even
        return
    if have % frame_bytes == 0:
        raise FrameCountMismatch(f"NumberOfFrames is {n_frames} but the pixel data holds {have // frame_bytes} "
                                 f"frames of {rows}×{cols}")
    raise FrameCountMismatch(f"pixel data is {have} bytes; Rows×Columns×samples×bytes×NumberOfFrames = {want}")


def _check_fragments(ds: Dataset, n_frames: int) -> None:
    try:
        buf = io.BytesIO(ds.PixelData)
        offsets = parse_basic_offsets(buf)
        n_fragments, _ = parse_fragments(buf)
    except Exception as e:
        raise TruncatedDicom(f"encapsulated pixel data is malformed ({library_error(e)})") from e
    # Each frame is one or more fragments; a Basic Offset Table, when present, has exactly one entry per frame.
    if n_fragments < n_frames or (offsets and len(offsets) != n_frames):
        held = len(offsets) if offsets else n_fragments
        raise FrameCountMismatch(f"NumberOfFrames is {n_frames} but the encapsulated pixel data holds {held} "
                                 f"{'frames' if offsets else 'fragments'}")


def _decode_pixels(ds: Dataset, n_frames: int) -> np.ndarray:
    try:
        arr = ds.pixel_array
    except ValueError as e:
        msg = str(e)
        if "frame" in msg.lower() or "less than expected" in msg:
            raise FrameCountMismatch(f"pixel data does not match NumberOfFrames={n_frames}") from e
        raise DicomProblem(f"pixel data cannot be decoded ({library_error(e)})") from e
    except StopIteration as e:  # pydicom's frame generator ran out: fewer frames than NumberOfFrames
        raise FrameCountMismatch(f"the pixel data holds fewer than NumberOfFrames={n_frames} frames") from e
    except Exception as e:  # a codec plugin raising on corrupt compressed data is a bad upload, not a crash
        raise DicomProblem(f"pixel data cannot be decoded ({library_error(e)})") from e
    if str(ds.PhotometricInterpretation).strip().upper() == "PALETTE COLOR":
        try:
            arr = apply_color_lut(arr, ds)
        except Exception as e:
            raise UnsupportedPixels(f"palette colour lookup failed ({library_error(e)})") from e
    expected = n_frames * int(ds.Rows) * int(ds.Columns)
    if arr.size not in (expected, expected * 3):
        raise FrameCountMismatch(f"decoded {arr.size} samples, expected {expected} for NumberOfFrames={n_frames}")
    return arr


def _to_unit_gray(arr: np.ndarray, ds: Dataset) -> np.ndarray:
    """(N, H, W, samples) stored values → (N, H, W) float32 in [0, 1] (see the module docstring)."""
    photometric = str(ds.PhotometricInterpretation).strip().upper()
    if arr.shape[-1] == 3:  # colour: pydicom already converted YBR to RGB; palette LUTs may be 8 or 16 bit
        peak = 65535.0 if arr.dtype.itemsize > 1 else 255.0
        return np.clip(arr.astype(np.float32) @ _LUMA / peak, 0.0, 1.0)
    x = arr[..., 0].astype(np.float32)
    bits = int(ds.get("BitsStored", ds.BitsAllocated))
    signed = int(ds.get("PixelRepresentation", 0)) == 1
    lo, hi = (-(2.0 ** (bits - 1)), 2.0 ** (bits - 1) - 1) if signed else (0.0, 2.0 ** bits - 1)
    slope, intercept = _rescale(ds)
    # The window is the rescaled range, low to high: a positive slope cancels out, a negative one inverts.
    y_lo, y_hi = sorted((slope * lo + intercept, slope * hi + intercept))
    out = ((slope * x + intercept) - y_lo) / (y_hi - y_lo)
    if photometric == "MONOCHROME1":
        out = 1.0 - out
    return np.clip(out, 0.0, 1.0).astype(np.float32, copy=False)


def _rescale(ds: Dataset) -> tuple[float, float]:
    """Rescale Slope/Intercept from the top level or, for enhanced multi-frame objects, the shared functional groups."""
    source: Dataset | None = ds if "RescaleSlope" in ds else None
    if source is None and "SharedFunctionalGroupsSequence" in ds:
        shared = ds.SharedFunctionalGroupsSequence[0]
        if "PixelValueTransformationSequence" in shared:
            source = shared.PixelValueTransformationSequence[0]
    if source is None:
        return 1.0, 0.0
    slope, intercept = float(source.get("RescaleSlope", 1.0) or 1.0), float(source.get("RescaleIntercept", 0.0) or 0)
    return (slope if slope != 0 else 1.0), intercept

