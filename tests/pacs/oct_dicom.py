"""Builds OCT DICOM test objects with pydicom: a multi-frame Ophthalmic Tomography image from given frames, in any
transfer syntax, carrying PHI-like dummy patient attributes so tests can prove none of them leak."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    generate_uid,
)

from service.pipeline.results import Decision, FrameResult, ImageResult, ModelId, Timing, VolumeResult

OPT = "1.2.840.10008.5.1.4.1.1.77.1.5.4"
PHI = {"PatientName": "Secretname^Jane", "PatientID": "PHI-98765", "PatientBirthDate": "19500101"}
EXPLICIT_LE = "1.2.840.10008.1.2.1"


def phantom_frames(n: int = 3, rows: int = 96, cols: int = 128, seed: int = 0) -> np.ndarray:
    """Layered, speckled B-scan-like uint8 frames (N, rows, cols): bright bands on a dark background."""
    rng = np.random.default_rng(seed)
    y = np.arange(rows, dtype=np.float32)[:, None]
    x = np.arange(cols, dtype=np.float32)[None, :]
    out = []
    for i in range(n):
        surface = rows * 0.35 + 6 * np.sin(x / cols * np.pi * 2 + i)
        bands = sum(np.exp(-((y - surface - d) ** 2) / (2 * w ** 2)) * a
                    for d, w, a in ((0, 2.0, 0.9), (12, 4.0, 0.6), (30, 3.0, 0.8)))
        img = 0.08 + 0.8 * bands * (0.7 + 0.3 * rng.random((rows, cols)))
        out.append(np.clip(img * 255, 0, 255).astype(np.uint8))
    return np.stack(out)


def oct_dataset(frames: np.ndarray, *, bits_stored: int | None = None, photometric: str = "MONOCHROME2",
                sop_class: str = OPT, study_uid: str | None = None, series_uid: str | None = None,
                signed: bool = False) -> Dataset:
    """Uncompressed multi-frame dataset from (N, H, W) uint8/uint16 (or int16 when `signed`) frames."""
    frames = np.asarray(frames)
    bits_allocated = frames.dtype.itemsize * 8
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = EXPLICIT_LE
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    for k, v in PHI.items():
        setattr(ds, k, v)
    ds.PatientSex = "F"
    ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.StudyID = "20261125", "101500", "ACC-1", "S1"
    ds.ReferringPhysicianName = ""
    ds.Modality = "OPT"
    ds.Manufacturer = "Phantom OCT"
    ds.SeriesNumber, ds.InstanceNumber = 1, 1
    ds.Laterality = ds.ImageLaterality = "R"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.NumberOfFrames = frames.shape[0]
    ds.Rows, ds.Columns = frames.shape[1:3]
    ds.BitsAllocated = bits_allocated
    ds.BitsStored = bits_stored or bits_allocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = int(signed)
    ds.PixelData = frames.tobytes()
    return ds


def to_bytes(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


NATIVE = (EXPLICIT_LE, ImplicitVRLittleEndian, ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian)


def twelve_bit(frames: np.ndarray) -> np.ndarray:
    """8-bit frames spread over 12 bits (0…4080) in 16-bit words, for BitsAllocated 16, BitsStored 12."""
    return frames.astype(np.uint16) * 16


def encode(ds: Dataset, transfer_syntax: str) -> Dataset:
    """`ds` (uncompressed, Explicit VR Little Endian) in any transfer syntax: the native ones by pydicom's writer
    (which encodes the data set as the file meta's Transfer Syntax UID says), the others by `compress`."""
    if transfer_syntax not in NATIVE:
        return compress(ds, transfer_syntax)
    if transfer_syntax == ExplicitVRBigEndian and int(ds.BitsAllocated) > 8:
        # pydicom writes an OW value's bytes as they are: a big-endian file needs them swapped first.
        ds.PixelData = np.frombuffer(ds.PixelData, dtype="<u2").byteswap().tobytes()
    ds.file_meta.TransferSyntaxUID = transfer_syntax
    return ds


def compress(ds: Dataset, transfer_syntax: str) -> Dataset:
    """Re-encode with pydicom's encoders; JPEG baseline (which pydicom cannot encode) is encoded by Pillow."""
    frames = ds.pixel_array.reshape(int(ds.NumberOfFrames), ds.Rows, ds.Columns)
    if transfer_syntax == JPEGBaseline8Bit:
        encoded = []
        for f in frames:
            buf = io.BytesIO()
            Image.fromarray(f).save(buf, format="JPEG", quality=95)
            encoded.append(buf.getvalue())
        ds.PixelData = encapsulate(encoded)
        ds["PixelData"].VR = "OB"
        ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
        return ds
    lossy = {"1.2.840.10008.1.2.4.91": {"j2k_cr": [10]}, "1.2.840.10008.1.2.4.81": {"jls_error": 2}}
    ds.compress(transfer_syntax, frames if frames.shape[0] > 1 else frames[0], **lossy.get(transfer_syntax, {}))
    return ds


def conformant_oct(frames: np.ndarray) -> Dataset:
    """An Ophthalmic Tomography Image that dciodvfy (dicom3tools) passes without error: `oct_dataset` plus every
    module the IOD requires (enhanced equipment, acquisition context, OCT parameters, functional groups,
    dimensions), with the laterality where the IOD wants it (Image Laterality, not the series' Laterality)."""
    ds = oct_dataset(frames)
    del ds.Laterality
    n = int(ds.NumberOfFrames)
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.AcquisitionDateTime = "20261125101500"
    ds.ContentDate, ds.ContentTime = "20261125", "101500"
    ds.AcquisitionNumber = 1
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    ds.PresentationLUTShape = "IDENTITY"
    ds.AcquisitionDuration = 1.0
    # The OPT Image module fixes these (Type 1, enumerated 0 / 1 / 1: an OCT image is never split up); dicom3tools'
    # Multi-frame Functional Groups module flags them outside a concatenation (tests/pacs/test_conformance.py).
    ds.ConcatenationFrameOffsetNumber = 0
    ds.InConcatenationNumber = 1
    ds.InConcatenationTotalNumber = 1
    ds.ManufacturerModelName = "Phantom"
    ds.DeviceSerialNumber = "0001"
    ds.SoftwareVersions = "1"
    ds.AcquisitionContextSequence = []
    ds.AnatomicRegionSequence = [_code("81745001", "SCT", "Eye")]
    ds.AcquisitionDeviceTypeCodeSequence = [_code("392012008", "SCT", "Optical Coherence Tomography Scanner")]
    ds.LightPathFilterTypeStackCodeSequence = []
    ds.DetectorType = "CCD"
    ds.AxialLengthOfTheEye = None
    ds.HorizontalFieldOfView = None
    ds.EmmetropicMagnification = None
    ds.IntraOcularPressure = None
    ds.PupilDilated = None
    ds.RefractiveStateSequence = []
    ds.FrameOfReferenceUID = generate_uid()
    ds.PositionReferenceIndicator = ""
    dim_uid = generate_uid()
    ds.DimensionOrganizationSequence = [_item(DimensionOrganizationUID=dim_uid)]
    ds.DimensionIndexSequence = [_item(DimensionOrganizationUID=dim_uid, DimensionIndexPointer=0x00209057,
                                       FunctionalGroupPointer=0x00209111)]
    pixel_measures = _item(PixelSpacing=[0.01, 0.01], SliceThickness=0.05)
    orientation = _item(ImageOrientationPatient=[1, 0, 0, 0, 0, 1])
    anatomy = _item(FrameLaterality="R", AnatomicRegionSequence=[_code("81745001", "SCT", "Eye")])
    ds.SharedFunctionalGroupsSequence = [_item(PixelMeasuresSequence=[pixel_measures],
                                               PlaneOrientationSequence=[orientation],
                                               FrameAnatomySequence=[anatomy])]
    ds.PerFrameFunctionalGroupsSequence = [
        _item(FrameContentSequence=[_item(FrameAcquisitionDateTime="20261125101500", FrameReferenceDateTime=
                                          "20261125101500", FrameAcquisitionDuration=10.0, StackID="1",
                                          InStackPositionNumber=i + 1, DimensionIndexValues=[i + 1])],
              PlanePositionSequence=[_item(ImagePositionPatient=[0, 0.05 * i, 0])])
        for i in range(n)]
    return ds


def _item(**attributes: object) -> Dataset:
    item = Dataset()
    for k, v in attributes.items():
        setattr(item, k, v)
    return item


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    return _item(CodeValue=value, CodingSchemeDesignator=scheme, CodeMeaning=meaning)


MODEL = ModelId(name="tiny", version=3)


def volume_result(scores=(0.1, 0.9, 0.3)) -> VolumeResult:
    """A volume's result as the pipeline answers it; a score of None is a refused frame."""
    def image(s: float) -> ImageResult:
        return ImageResult(scores={"residual": s, "alm": s / 2},
                           decision=Decision(s, 0.5, s > 0.5, min(100.0, s * 100), 0, 1), box=(0, 0, 96, 64),
                           maps=None, gray=None, timing=Timing(0.0, 0.0))

    frames = [FrameResult(i, image(s)) if s is not None else FrameResult(i, None, refused="no retina: blank")
              for i, s in enumerate(scores)]
    top = max((i for i, s in enumerate(scores) if s is not None), key=lambda i: scores[i])
    return VolumeResult(frames=frames, decision=Decision(scores[top], 0.5, True, min(100.0, scores[top] * 100), top,
                                                         1), model=MODEL)
