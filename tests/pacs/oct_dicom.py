"""Builds OCT DICOM test objects with pydicom: a multi-frame Ophthalmic Tomography image from given frames, in any
transfer syntax, carrying PHI-like dummy patient attributes so tests can prove none of them leak."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import JPEGBaseline8Bit, generate_uid

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
