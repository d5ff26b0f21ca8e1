"""Every standard transfer syntax pydicom can decode with the installed plugins, 8-bit and 12-bit (BitsAllocated 16,
BitsStored 12): each decodes to the source's pixels (within the codec's error for lossy ones), scores through the
real service like the uncompressed object, and is refused as truncated when cut short — found by lengths (element
lengths, the deflate stream's end, encapsulated items), whatever pydicom would say."""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Iterator

import httpx
import numpy as np
import pydicom
import pytest
from live import Service, post_dicom, running
from oct_dicom import (
    EXPLICIT_LE,
    compress,
    conformant_oct,
    encode,
    oct_dataset,
    phantom_frames,
    to_bytes,
    twelve_bit,
)
from PIL import Image
from pydicom.encaps import encapsulate, encapsulate_extended
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

from service.dicom import errors
from service.dicom.decode import decode_dicom
from service.multipart import build_related

FRAMES = phantom_frames(3, 64, 96, seed=3)
# (transfer syntax, bits stored, largest error allowed in [0, 1] units: 0 = bit-exact)
CASES = [
    (EXPLICIT_LE, 8, 0), (ImplicitVRLittleEndian, 8, 0), (ExplicitVRBigEndian, 8, 0),
    (DeflatedExplicitVRLittleEndian, 8, 0), (RLELossless, 8, 0), (JPEGLSLossless, 8, 0), (JPEG2000Lossless, 8, 0),
    (JPEGBaseline8Bit, 8, 0.2), (JPEGLSNearLossless, 8, 2 / 255), (JPEG2000, 8, 0.2),
    (EXPLICIT_LE, 12, 0), (ImplicitVRLittleEndian, 12, 0), (ExplicitVRBigEndian, 12, 0),
    (DeflatedExplicitVRLittleEndian, 12, 0), (RLELossless, 12, 0), (JPEGLSLossless, 12, 0),
    (JPEG2000Lossless, 12, 0), (JPEGLSNearLossless, 12, 2 / 4095), (JPEG2000, 12, 0.2),
]
IDS = [f"{pydicom.uid.UID(ts).name}-{bits}bit" for ts, bits, _ in CASES]


def source(bits: int, frames: np.ndarray = FRAMES) -> tuple[np.ndarray, float]:
    """The stored values and the value that maps to 1.0 (2^BitsStored − 1)."""
    return (frames, 255.0) if bits == 8 else (twelve_bit(frames), 4095.0)


def dicom_bytes(ts: str, bits: int, frames: np.ndarray = FRAMES) -> bytes:
    stored, _ = source(bits, frames)
    return to_bytes(encode(oct_dataset(stored, bits_stored=bits), ts))


@pytest.mark.parametrize(("ts", "bits", "tolerance"), CASES, ids=IDS)
def test_decodes_to_the_source_pixels(ts: str, bits: int, tolerance: float) -> None:
    img = decode_dicom(dicom_bytes(ts, bits))
    stored, peak = source(bits)
    assert img.transfer_syntax_uid == ts and img.frames.shape == (3, 64, 96)
    error = np.abs(img.frames - stored.astype(np.float32) / peak)
    if tolerance == 0:
        np.testing.assert_array_equal(img.frames, stored.astype(np.float32) / peak)
    else:
        assert error.max() <= tolerance + 1e-6 and error.mean() < 0.03


@pytest.mark.parametrize(("ts", "bits"), [(ts, bits) for ts, bits, _ in CASES],
                         ids=IDS)
@pytest.mark.parametrize("keep", [0.3, 0.9, 0.999])
def test_cut_short_is_truncated(ts: str, bits: int, keep: float) -> None:
    data = dicom_bytes(ts, bits)
    cut = data[: int(len(data) * keep) // 2 * 2]  # an even length, as a file cut at a buffer boundary would be
    with pytest.raises(errors.TruncatedDicom):
        decode_dicom(cut)


@pytest.mark.parametrize("drop", [2, 8, 10])
@pytest.mark.parametrize("ts", [EXPLICIT_LE, ImplicitVRLittleEndian, JPEG2000Lossless, RLELossless])
def test_last_bytes_missing_is_truncated(ts: str, drop: int) -> None:
    # Encapsulated: 8 bytes is exactly the Sequence Delimitation Item, the end a reader may not notice missing.
    data = dicom_bytes(ts, 8)
    with pytest.raises(errors.TruncatedDicom):
        decode_dicom(data[:-drop])


PER_FRAME_GROUPS = b"\x00\x52\x30\x92"  # (5200,9230), little endian: before Pixel Data, a sequence of sequences


@pytest.mark.parametrize("ts", [EXPLICIT_LE, ImplicitVRLittleEndian])
@pytest.mark.parametrize("into", [40, 200, 1000])
def test_cut_inside_a_sequence_is_truncated(ts: str, into: int) -> None:
    full = to_bytes(encode(conformant_oct(FRAMES), ts))
    assert decode_dicom(full).number_of_frames == 3  # the complete object is fine
    with pytest.raises(errors.TruncatedDicom):
        decode_dicom(full[: full.index(PER_FRAME_GROUPS) + into])


def as_deflated(explicit: bytes, full: bytes) -> bytes:
    """`explicit`'s data set (however it ends) as a *complete* deflate stream behind `full`'s file meta with the
    Deflated transfer syntax: only the inflated data set's own lengths can tell it is cut."""
    meta = pydicom.dcmread(io.BytesIO(full), stop_before_pixels=True).file_meta
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_file_meta_info(fp, meta)
    meta_end = 132 + 12 + struct.unpack_from("<L", full, 140)[0]
    packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    return b"\0" * 128 + b"DICM" + fp.getvalue() + packer.compress(explicit[meta_end:]) + packer.flush()


@pytest.mark.parametrize("into", [40, 200, 1000])
def test_deflated_cut_inside_a_sequence_is_truncated(into: int) -> None:
    full = to_bytes(conformant_oct(FRAMES))
    assert decode_dicom(as_deflated(full, full)).transfer_syntax_uid == DeflatedExplicitVRLittleEndian
    with pytest.raises(errors.TruncatedDicom):
        decode_dicom(as_deflated(full[: full.index(PER_FRAME_GROUPS) + into], full))


def test_deflated_data_set_shorter_than_its_elements_is_truncated() -> None:
    plain = dicom_bytes(EXPLICIT_LE, 8)
    with pytest.raises(errors.TruncatedDicom):
        decode_dicom(as_deflated(plain[:-1000], plain))


def test_deflate_stream_that_is_not_deflate_is_refused() -> None:
    data = dicom_bytes(DeflatedExplicitVRLittleEndian, 8)
    meta_end = 132 + 12 + struct.unpack_from("<L", data, 140)[0]
    with pytest.raises(errors.DicomProblem) as e:
        decode_dicom(data[:meta_end] + b"\xff" * 64)
    assert 400 <= e.value.status < 500


def test_deflate_bomb_is_refused_while_inflating() -> None:
    ds = oct_dataset(FRAMES)
    ds.add_new(0x00091010, "LO", "oct-test")
    ds.add_new(0x00091011, "OB", bytes(80 * 1024 * 1024))  # inflates to 80 MiB, deflates to ~80 KiB
    data = to_bytes(encode(ds, DeflatedExplicitVRLittleEndian))
    assert len(data) < 1024 * 1024
    with pytest.raises(errors.UnsupportedPixels):
        decode_dicom(data, max_total_pixels=64 * 96 * 3)


# --- encapsulated Pixel Data: fragments and offset tables ------------------------------------------------------

def _jpeg_frames(frames: np.ndarray) -> list[bytes]:
    out = []
    for f in frames:
        buf = io.BytesIO()
        Image.fromarray(f).save(buf, format="JPEG", quality=95)
        out.append(buf.getvalue())
    return out


def _jpeg_dataset(pixel_data: bytes) -> pydicom.Dataset:
    ds = oct_dataset(FRAMES)
    ds.PixelData = pixel_data
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    return ds


def test_several_fragments_a_frame_with_basic_offset_table() -> None:
    ds = _jpeg_dataset(encapsulate(_jpeg_frames(FRAMES), fragments_per_frame=3, has_bot=True))
    img = decode_dicom(to_bytes(ds))
    assert np.abs(img.frames - FRAMES / 255).mean() < 0.03


def test_extended_offset_table() -> None:
    pixel_data, offsets, lengths = encapsulate_extended(_jpeg_frames(FRAMES))
    ds = _jpeg_dataset(pixel_data)
    ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths = offsets, lengths
    img = decode_dicom(to_bytes(ds))
    assert np.abs(img.frames - FRAMES / 255).mean() < 0.03
    ds.NumberOfFrames = 2
    with pytest.raises(errors.FrameCountMismatch):
        decode_dicom(to_bytes(ds))


def test_basic_offset_table_with_another_frame_count() -> None:
    ds = _jpeg_dataset(encapsulate(_jpeg_frames(FRAMES), fragments_per_frame=2, has_bot=True))
    ds.NumberOfFrames = 2  # six fragments are enough for two frames; the offset table says three
    with pytest.raises(errors.FrameCountMismatch):
        decode_dicom(to_bytes(ds))


def test_fragment_longer_than_the_pixel_data_is_truncated() -> None:
    # The file is complete, but the last fragment claims more bytes than follow it: a cut-off fragment whose
    # delimiter a writer appended anyway.
    pixel_data = bytearray(encapsulate(_jpeg_frames(FRAMES), has_bot=True))
    last = pixel_data.rindex(b"\xfe\xff\x00\xe0")
    length = struct.unpack_from("<L", pixel_data, last + 4)[0]
    pixel_data[last + 4: last + 8] = struct.pack("<L", length + 1000)
    with pytest.raises(errors.TruncatedDicom):
        decode_dicom(to_bytes(_jpeg_dataset(bytes(pixel_data))))


def test_jpeg_extended_eight_bit_decodes_and_twelve_bit_is_unsupported() -> None:
    ds = _jpeg_dataset(encapsulate(_jpeg_frames(FRAMES)))
    ds.file_meta.TransferSyntaxUID = JPEGExtended12Bit  # a baseline stream is valid JPEG Extended at 8 bits
    assert np.abs(decode_dicom(to_bytes(ds)).frames - FRAMES / 255).mean() < 0.03
    twelve = oct_dataset(twelve_bit(FRAMES), bits_stored=12)
    twelve.PixelData = ds.PixelData  # refused from the header, before any byte of it is decoded
    twelve["PixelData"].VR = "OB"
    twelve.file_meta.TransferSyntaxUID = JPEGExtended12Bit
    with pytest.raises(errors.UnsupportedTransferSyntax) as e:
        decode_dicom(to_bytes(twelve))
    assert e.value.status == 415


def test_jpeg_baseline_helper_still_matches_compress() -> None:
    # `compress` (one fragment a frame, no offset table) is what the other tests send as JPEG baseline.
    ds = compress(oct_dataset(FRAMES), JPEGBaseline8Bit)
    assert decode_dicom(to_bytes(ds)).number_of_frames == 3


# --- through the service ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def service(fixture_model, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    with running(fixture_model, tmp_path_factory.mktemp("transfer-syntaxes")) as svc:
        yield svc


def _score(service: Service, data: bytes) -> httpx.Response:
    return post_dicom(service, data, heatmaps="false")


@pytest.mark.slow
def test_every_syntax_scores_like_the_uncompressed_object(service: Service) -> None:
    reference = {}
    for ts, bits, tolerance in CASES:
        r = _score(service, dicom_bytes(ts, bits))
        assert r.status_code == 200, f"{pydicom.uid.UID(ts).name} {bits}-bit: {r.status_code} {r.text[:300]}"
        body = r.json()
        assert body["number_of_frames"] == 3
        scores = [f["score"] for f in body["frames"]]
        if ts == EXPLICIT_LE:  # listed first for each bit depth
            reference[bits] = scores
        if tolerance == 0:
            assert scores == pytest.approx(reference[bits], rel=1e-5), f"{pydicom.uid.UID(ts).name} {bits}-bit"
        else:
            assert all(np.isfinite(scores))


@pytest.mark.slow
def test_deflated_volume_through_stow(service: Service) -> None:
    ds = encode(oct_dataset(FRAMES), DeflatedExplicitVRLittleEndian)
    body, ctype = build_related([to_bytes(ds)])
    r = httpx.post(f"{service.url}/dicomweb/studies", content=body, headers={"Content-Type": ctype}, timeout=120)
    assert r.status_code == 200, r.text
    ref = pydicom.Dataset.from_json(r.json()).ReferencedSOPSequence[0]
    assert ref.ReferencedSOPInstanceUID == ds.SOPInstanceUID


@pytest.mark.slow
def test_truncated_deflated_is_a_4xx_problem(service: Service) -> None:
    data = dicom_bytes(DeflatedExplicitVRLittleEndian, 8)
    r = _score(service, data[: len(data) - 100])
    assert r.status_code == 422 and r.headers["content-type"].startswith("application/problem+json")
    assert r.json()["type"].endswith("dicom-truncated")
