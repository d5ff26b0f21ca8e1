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
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from pydicom import filereader
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.pixels import apply_color_lut, get_decoder
from pydicom.tag import BaseTag
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian, JPEGExtended12Bit

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
from service.dicom.phi import text_values
from service.redaction import library_error

OPHTHALMIC_TOMOGRAPHY = "1.2.840.10008.5.1.4.1.1.77.1.5.4"
PIXEL_DATA = 0x7FE00010
# Decoded voxels a single object may hold (all frames): 128 Mi float32 = 512 MiB; a 1024×1024×128 OCT volume fits.
MAX_TOTAL_PIXELS = 128 * 1024 * 1024
MAX_SIDE = 16384
_PHOTOMETRIC = {"MONOCHROME1", "MONOCHROME2", "RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT",
                "PALETTE COLOR"}
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
UNDEFINED_LENGTH = 0xFFFFFFFF
_INFLATE_HEADROOM = 64 * 1024 * 1024  # attributes besides Pixel Data a deflated object may carry
_IDENTIFY_INFLATE_BYTES = 1024 * 1024  # the SOP UIDs sit near the start of the data set
_ITEM, _SEQUENCE_DELIMITER = 0xFFFEE000, 0xFFFEE0DD


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
    ds = read_dataset(data, max_inflated_bytes=_max_inflated_bytes(max_total_pixels))
    try:
        return _decode(ds, max_total_pixels, max_side, max_frame_pixels, reserve)
    except DicomProblem as e:
        e.phi = frozenset(text_values(ds))
        raise


def _decode(ds: Dataset, max_total_pixels: int, max_side: int, max_frame_pixels: int | None,
            reserve: Callable[[int], None] | None) -> DicomImage:
    ts = _transfer_syntax(ds.file_meta)
    _require_pixel_data(ds)
    rows, cols, n_frames = _geometry(ds, max_total_pixels, max_side)
    if max_frame_pixels is not None and rows * cols > max_frame_pixels:
        raise UnsupportedPixels(f"{rows}×{cols} frames are over the limit of {max_frame_pixels} pixels")
    _check_decodable(ts, int(ds.get("BitsStored", ds.BitsAllocated)))
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
    """(SOP Class UID, SOP Instance UID) of whatever can be parsed, for a STOW failure entry; '' when unknown.
    Reads the file meta and the data set only up to group 0008 (where both UIDs live): cheap on any object, and
    a broken file further on does not hide them."""
    try:
        meta, start = _read_file_meta(data)
        from_meta = (str(meta.get("MediaStorageSOPClassUID") or ""), str(meta.get("MediaStorageSOPInstanceUID") or ""))
    except Exception:  # the caller already knows the object is bad; any UID found is a bonus
        return "", ""
    try:
        ts = _transfer_syntax(meta)
        buffer = data
        if ts == DeflatedExplicitVRLittleEndian:
            buffer = zlib.decompressobj(-zlib.MAX_WBITS).decompress(memoryview(data)[start:], _IDENTIFY_INFLATE_BYTES)
            start = 0
        fp = io.BytesIO(buffer)
        fp.seek(start)
        ds = filereader.read_dataset(fp, ts.is_implicit_VR, ts.is_little_endian, stop_when=_after_sop_uids)
        from_data = (str(ds.get("SOPClassUID") or ""), str(ds.get("SOPInstanceUID") or ""))
    except Exception:  # an unknown transfer syntax, a corrupt data set: the file meta's UIDs still name it
        return from_meta
    return from_data[0] or from_meta[0], from_data[1] or from_meta[1]


def is_dicom(head: bytes) -> bool:
    """A Part 10 file starts with a 128-byte preamble and the magic 'DICM'."""
    return len(head) >= 132 and head[128:132] == b"DICM"


def read_dataset(data: bytes, *, max_inflated_bytes: int = 1 << 32) -> Dataset:
    """Parse (without decoding pixels) and check the parts every later step relies on.

    The file meta says how the data set is encoded; an unknown transfer syntax is refused from that UID alone. A
    deflated data set is inflated here, its deflate stream required to end (a cut-off stream is a truncated file),
    and at most `max_inflated_bytes` of it are kept. Truncation is then found by lengths, not by pydicom's
    messages: the last element read must end exactly where the (inflated) data set ends."""
    if not is_dicom(data):
        raise NotDicom("expected a DICOM Part 10 file: 128-byte preamble, then 'DICM', then the file meta group")
    try:
        meta, start = _read_file_meta(data)
    except Exception as e:  # the meta group is Explicit VR Little Endian whatever follows; pydicom could not read it
        raise NotDicom(f"the file meta group cannot be read ({library_error(e)})") from e
    ts = _transfer_syntax(meta)
    if not ts.is_transfer_syntax:  # a private/unknown transfer syntax: the data set's encoding itself is unknown
        raise UnsupportedTransferSyntax(f"unknown or private transfer syntax {ts}")
    buffer = data
    if ts == DeflatedExplicitVRLittleEndian:
        buffer, start = _inflate(memoryview(data)[start:], max_inflated_bytes), 0
    fp = io.BytesIO(buffer)  # shares `buffer`'s memory: nothing is copied until written to
    fp.seek(start)
    try:
        found = filereader.read_dataset(fp, ts.is_implicit_VR, ts.is_little_endian)
    except Exception as e:  # struct/OS/value errors when the byte stream stops mid-element or is not DICOM
        raise TruncatedDicom(f"the data set cannot be parsed (truncated or corrupt; {library_error(e)})") from e
    ds = FileDataset("", found, preamble=data[:128], file_meta=meta, is_implicit_VR=ts.is_implicit_VR,
                     is_little_endian=ts.is_little_endian)
    _check_complete(ds, buffer, ts.is_little_endian)
    if "SOPClassUID" not in ds:
        sop = ds.file_meta.get("MediaStorageSOPClassUID")
        if not sop:
            raise TruncatedDicom("no SOP Class UID in the data set or file meta (truncated or corrupt)")
        ds.SOPClassUID = sop
    return ds


def _read_file_meta(data: bytes) -> tuple[FileMetaDataset, int]:
    """The file meta group (always Explicit VR Little Endian, right after 'DICM') and where the data set starts."""
    fp = io.BytesIO(data)
    fp.seek(132)
    group = filereader.read_dataset(fp, is_implicit_VR=False, is_little_endian=True, stop_when=_not_meta)
    return FileMetaDataset(group), fp.tell()


def _not_meta(tag: BaseTag, vr: str | None, length: int) -> bool:
    return tag >> 16 != 0x0002


def _after_sop_uids(tag: BaseTag, vr: str | None, length: int) -> bool:
    return tag > 0x00080018  # SOP Instance UID; the SOP Class UID (0008,0016) comes before it


def _transfer_syntax(meta: Dataset) -> UID:
    ts = meta.get("TransferSyntaxUID")
    if not ts:
        raise TruncatedDicom("the file meta has no Transfer Syntax UID (truncated or corrupt)")
    return UID(str(ts).strip())


def _max_inflated_bytes(max_total_pixels: int) -> int:
    # The largest object the size limits let through: every voxel as 3 samples of 2 bytes, plus room for the
    # other attributes. A deflate stream that inflates beyond it (a "zip bomb") is refused while inflating.
    return 6 * max_total_pixels + _INFLATE_HEADROOM


def _inflate(body: bytes | memoryview, limit: int) -> bytes:
    """Deflated Explicit VR Little Endian (PS3.5 A.5): the data set after the file meta is one raw deflate stream."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error as e:
        raise TruncatedDicom(f"the deflated data set cannot be inflated (corrupt; {library_error(e)})") from e
    if len(out) > limit:
        raise UnsupportedPixels(f"the deflated data set inflates to more than {limit} bytes, the most an object "
                                "within the service's size limits can need")
    if not inflater.eof:
        raise TruncatedDicom(f"the deflate stream stops after {len(body)} bytes without its end block (truncated)")
    return out


def _check_complete(ds: Dataset, buffer: bytes, little_endian: bool) -> None:
    # pydicom stops without complaint when the bytes run out: a value cut short is kept short, and an element
    # header or encapsulated item cut short is dropped. Elements are read in order, so a complete data set ends
    # exactly where its last top-level element ends: at its value's declared length, or, for an undefined-length
    # element (a sequence, encapsulated Pixel Data), with the Sequence Delimitation Item (FFFE,E0DD), length 0.
    if not ds.keys():  # what pydicom returns when an undefined-length top-level element runs off the end
        raise TruncatedDicom("no data elements after the file meta (truncated or corrupt)")
    elem = ds.get_item(max(ds.keys()))
    length, value_tell = getattr(elem, "length", None), getattr(elem, "value_tell", None)
    if length is None or value_tell is None:
        return  # already converted by pydicom: nothing to compare against
    if length == UNDEFINED_LENGTH:
        delimiter = struct.pack("<HHL" if little_endian else ">HHL", 0xFFFE, 0xE0DD, 0)
        if buffer[-8:] != delimiter:
            raise TruncatedDicom(f"element {elem.tag} has an undefined length but the file does not end with its "
                                 "Sequence Delimitation Item (truncated or corrupt)")
        return
    if value_tell + length != len(buffer):
        raise TruncatedDicom(f"element {elem.tag} ends at byte {value_tell + length} but the data end at byte "
                             f"{len(buffer)} "
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


def _check_decodable(ts: UID, bits_stored: int) -> None:
    try:
        decoder = get_decoder(ts)
    except NotImplementedError as e:
        raise UnsupportedTransferSyntax(f"transfer syntax {ts.name or ts} ({ts}) has no pixel decoder") from e
    if not decoder.is_available:
        raise UnsupportedTransferSyntax(f"transfer syntax {ts.name} ({ts}) needs a decoder plugin that is not "
                                        "installed (JPEG baseline, JPEG-LS, JPEG 2000 and RLE are)")
    if ts == JPEGExtended12Bit and bits_stored > 8 and set(decoder.available_plugins) <= {"pillow"}:
        # Pillow decodes JPEG Extended at 8-bit precision only; 12-bit needs pylibjpeg-libjpeg or GDCM.
        raise UnsupportedTransferSyntax(f"12-bit {ts.name} ({ts}) needs a decoder plugin that is not installed "
                                        "(pylibjpeg-libjpeg or GDCM; Pillow decodes 8-bit only)")


def _check_native_length(ds: Dataset, rows: int, cols: int, n_frames: int) -> None:
    """Native (uncompressed, also inflated) Pixel Data holds exactly Rows×Columns×samples×BitsAllocated/8 bytes a
    frame (YBR_FULL_422 stores two samples a pixel), NumberOfFrames times, plus at most one pad byte."""
    spp = int(ds.get("SamplesPerPixel", 1))
    if spp == 3 and str(ds.PhotometricInterpretation).strip().upper() == "YBR_FULL_422":
        spp = 2
    frame_bytes = rows * cols * spp * int(ds.BitsAllocated) // 8
    have, want = len(ds.PixelData), frame_bytes * n_frames
    if have == want or have == want + 1:  # one trailing pad byte keeps the value length even
        return
    if have % frame_bytes == 0:
        raise FrameCountMismatch(f"NumberOfFrames is {n_frames} but the pixel data holds {have // frame_bytes} "
                                 f"frames of {rows}×{cols}")
    raise FrameCountMismatch(f"pixel data is {have} bytes; Rows×Columns×samples×bytes×NumberOfFrames = {want}")


def _check_fragments(ds: Dataset, n_frames: int) -> None:
    """Encapsulated Pixel Data (PS3.5 A.4): a Basic Offset Table item, then one or more fragment items a frame.
    Every item must lie inside the value (one that runs past its end is a truncated file), and the frames the
    offset tables list (or, without them, the fragments there are) must match NumberOfFrames."""
    value = ds.PixelData
    little = ds.original_encoding[1] is not False
    starts: list[int] = []  # of each item, relative to the first fragment's item tag
    pos = 0
    while pos + 8 <= len(value):
        tag_group, tag_element, length = struct.unpack_from("<HHL" if little else ">HHL", value, pos)
        tag = tag_group << 16 | tag_element
        if tag == _SEQUENCE_DELIMITER:
            break
        if tag != _ITEM or length == UNDEFINED_LENGTH:
            raise TruncatedDicom(f"encapsulated pixel data: item {len(starts)} is not a defined-length item "
                                 "(truncated or corrupt)")
        if pos + 8 + length > len(value):
            raise TruncatedDicom(f"encapsulated pixel data: item {len(starts)} declares {length} bytes, "
                                 f"{len(value) - pos - 8} follow (truncated)")
        starts.append(pos)
        pos += 8 + length
    else:
        if pos != len(value):
            raise TruncatedDicom("encapsulated pixel data ends inside an item header (truncated)")
    if not starts:
        raise TruncatedDicom("encapsulated pixel data has no Basic Offset Table item (truncated or corrupt)")
    table_length = struct.unpack_from("<L" if little else ">L", value, starts[0] + 4)[0]
    if table_length % 4:
        raise TruncatedDicom(f"the Basic Offset Table is {table_length} bytes, not a multiple of 4 (corrupt)")
    offsets = struct.unpack_from(f"{'<' if little else '>'}{table_length // 4}L", value, starts[0] + 8)
    first = starts[1] if len(starts) > 1 else pos
    fragment_starts = {p - first for p in starts[1:]}
    n_fragments = len(starts) - 1
    if "ExtendedOffsetTable" in ds:
        held, what = len(ds.ExtendedOffsetTable) // 8, "frames (Extended Offset Table)"
    elif offsets:
        if list(offsets) != sorted(set(offsets)) or not set(offsets) <= fragment_starts:
            raise TruncatedDicom("the Basic Offset Table does not point at fragment starts (corrupt)")
        held, what = len(offsets), "frames (Basic Offset Table)"
    else:  # each frame is one or more fragments
        held, what = n_fragments, "fragments"
        if n_fragments >= n_frames:
            return
    if held != n_frames:
        raise FrameCountMismatch(f"NumberOfFrames is {n_frames} but the encapsulated pixel data holds {held} {what}")


def _decode_pixels(ds: Dataset, n_frames: int) -> np.ndarray:
    # Lengths, fragments and frame counts were checked before this; what a codec still refuses is corrupt data.
    try:
        arr = ds.pixel_array
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

