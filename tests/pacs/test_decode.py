"""service/dicom/decode.py on real DICOM bytes: every supported transfer syntax, intensity mapping, and each kind of
bad DICOM mapped to its own error type."""

from __future__ import annotations

import io

import numpy as np
import pytest
from oct_dicom import OPT, compress, oct_dataset, phantom_frames, to_bytes
from PIL import Image
from pydicom.uid import (
    JPEG2000,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
    generate_uid,
)

from octcore.preprocess import to_gray
from service.dicom import errors
from service.dicom.decode import decode_dicom

FRAMES = phantom_frames(3, 64, 96)


def test_uncompressed_multiframe_matches_png_units() -> None:
    ds = oct_dataset(FRAMES)
    img = decode_dicom(to_bytes(ds))
    assert img.frames.shape == (3, 64, 96) and img.frames.dtype == np.float32
    assert (img.sop_instance_uid, img.study_instance_uid) == (ds.SOPInstanceUID, ds.StudyInstanceUID)
    assert img.sop_class_uid == OPT and img.number_of_frames == 3
    # The same pixels as a PNG through the service's image path give identical [0, 1] values.
    for i in range(3):
        np.testing.assert_array_equal(img.frames[i], to_gray(Image.fromarray(FRAMES[i])))


@pytest.mark.parametrize("ts", [RLELossless, JPEGLSLossless, JPEG2000Lossless])
def test_lossless_transfer_syntaxes_decode_exactly(ts: str) -> None:
    img = decode_dicom(to_bytes(compress(oct_dataset(FRAMES), ts)))
    assert img.transfer_syntax_uid == ts
    np.testing.assert_array_equal(img.frames, FRAMES.astype(np.float32) / 255)


@pytest.mark.parametrize("ts", [JPEGBaseline8Bit, JPEGLSNearLossless, JPEG2000])
def test_lossy_transfer_syntaxes_decode_close(ts: str) -> None:
    img = decode_dicom(to_bytes(compress(oct_dataset(FRAMES), ts)))
    assert img.frames.shape == (3, 64, 96)
    assert np.abs(img.frames - FRAMES / 255).mean() < 0.03


def test_single_frame_secondary_capture() -> None:
    ds = oct_dataset(FRAMES[:1], sop_class="1.2.840.10008.5.1.4.1.1.7")
    del ds.NumberOfFrames
    img = decode_dicom(to_bytes(ds))
    assert img.frames.shape == (1, 64, 96)


def test_monochrome1_is_inverted() -> None:
    img = decode_dicom(to_bytes(oct_dataset(FRAMES, photometric="MONOCHROME1")))
    np.testing.assert_allclose(img.frames, 1 - FRAMES / 255, atol=1e-6)


def test_sixteen_bit_uses_bits_stored_window() -> None:
    twelve = (FRAMES.astype(np.uint16) * 16)  # 12-bit values in 16-bit words
    img = decode_dicom(to_bytes(oct_dataset(twelve, bits_stored=12)))
    np.testing.assert_allclose(img.frames, twelve / 4095, atol=1e-6)
    full = FRAMES.astype(np.uint16) * 257
    np.testing.assert_allclose(decode_dicom(to_bytes(oct_dataset(full))).frames, full / 65535, atol=1e-6)


def test_sixteen_bit_jpeg2000_and_signed() -> None:
    full = FRAMES.astype(np.uint16) * 257
    img = decode_dicom(to_bytes(compress(oct_dataset(full), JPEG2000Lossless)))
    np.testing.assert_allclose(img.frames, full / 65535, atol=1e-6)
    signed = (FRAMES.astype(np.int16) - 128)
    img = decode_dicom(to_bytes(oct_dataset(signed, signed=True, bits_stored=8)))
    np.testing.assert_allclose(img.frames, FRAMES / 255, atol=1e-6)


def test_rescale_negative_slope_inverts_and_positive_is_neutral() -> None:
    ds = oct_dataset(FRAMES)
    ds.RescaleSlope, ds.RescaleIntercept = 2.0, -100.0
    np.testing.assert_allclose(decode_dicom(to_bytes(ds)).frames, FRAMES / 255, atol=1e-6)
    ds.RescaleSlope, ds.RescaleIntercept = -1.0, 255.0
    np.testing.assert_allclose(decode_dicom(to_bytes(ds)).frames, 1 - FRAMES / 255, atol=1e-6)


# --- bad DICOM -----------------------------------------------------------------------------------------------------

def _png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(FRAMES[0]).save(buf, format="PNG")
    return buf.getvalue()


def test_not_dicom() -> None:
    for data in (_png(), b"", b"\0" * 128 + b"DICM" + b"\xff" * 20):
        with pytest.raises((errors.NotDicom, errors.TruncatedDicom)):
            decode_dicom(data)
    with pytest.raises(errors.NotDicom):
        decode_dicom(_png())


@pytest.mark.parametrize("ts", [None, JPEG2000Lossless])
@pytest.mark.parametrize("keep", [0.9, 0.5, 0.995])
def test_truncated(ts: str | None, keep: float) -> None:
    ds = oct_dataset(FRAMES)
    data = to_bytes(compress(ds, ts) if ts else ds)
    with pytest.raises(errors.TruncatedDicom):
        decode_dicom(data[: int(len(data) * keep)])


def test_truncated_in_header() -> None:
    data = to_bytes(oct_dataset(FRAMES))
    with pytest.raises(errors.TruncatedDicom):
        decode_dicom(data[:300])


def test_no_pixel_data() -> None:
    ds = oct_dataset(FRAMES)
    del ds.PixelData
    with pytest.raises(errors.NoPixelData) as e:
        decode_dicom(to_bytes(ds))
    assert e.value.status == 422 and e.value.failure_reason == 0xA900


def test_unsupported_transfer_syntax() -> None:
    ds = compress(oct_dataset(FRAMES), JPEGBaseline8Bit)
    ds.file_meta.TransferSyntaxUID = JPEGLosslessSV1  # no decoder plugin installed for JPEG lossless
    with pytest.raises(errors.UnsupportedTransferSyntax) as e:
        decode_dicom(to_bytes(ds))
    assert e.value.status == 415 and e.value.failure_reason == 0xC122
    # A transfer syntax pydicom does not know at all (pydicom refuses to write one, so patch the bytes).
    data = to_bytes(ds).replace(JPEGLosslessSV1.encode(), b"1.2.3.4.5.6.7.8.9.10.1")
    with pytest.raises(errors.UnsupportedTransferSyntax):
        decode_dicom(data)


def test_non_image_sop_class() -> None:
    ds = oct_dataset(FRAMES, sop_class="1.2.840.10008.5.1.4.1.1.88.33")  # Comprehensive SR
    for k in ("PixelData", "Rows", "Columns", "NumberOfFrames", "BitsAllocated"):
        delattr(ds, k)
    ds.Modality = "SR"
    with pytest.raises(errors.NotAnImage) as e:
        decode_dicom(to_bytes(ds))
    assert e.value.failure_reason == 0x0122


@pytest.mark.parametrize("claimed", [2, 5])
def test_frame_count_mismatch(claimed: int) -> None:
    ds = oct_dataset(FRAMES)
    ds.NumberOfFrames = claimed
    with pytest.raises(errors.FrameCountMismatch):
        decode_dicom(to_bytes(ds))


def test_frame_count_mismatch_encapsulated() -> None:
    ds = compress(oct_dataset(FRAMES), RLELossless)
    ds.NumberOfFrames = 5
    with pytest.raises(errors.FrameCountMismatch):
        decode_dicom(to_bytes(ds))


def test_absurd_dimensions_refused_before_decoding() -> None:
    ds = oct_dataset(FRAMES)
    ds.Rows, ds.Columns, ds.NumberOfFrames = 60000, 60000, 1
    with pytest.raises(errors.UnsupportedPixels):
        decode_dicom(to_bytes(ds))


def test_ids_from_dataset() -> None:
    study = generate_uid()
    img = decode_dicom(to_bytes(oct_dataset(FRAMES, study_uid=study)))
    assert img.study_instance_uid == study
