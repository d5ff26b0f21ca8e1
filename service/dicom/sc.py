"""The heatmap overlay of one scored image: an RGB Secondary Capture of the most anomalous B-scan with the overlay
score's heatmap (the manifest's overlay score) blended on top, built by highdicom from the source dataset
(patient/study copied by the library).

Overlay: the heatmap (uint8 from the pipeline, service.pipeline.render's scale: 0..255 for 0..map_scale) is stretched
over the region it covers (`box`: the B-scan minus its white margins) and coloured with a black→red→yellow ramp; its
opacity grows with the value (0 → transparent, ≥ map_scale → 60 % opaque), so normal tissue stays readable gray.
"""

from __future__ import annotations

import highdicom as hd
import numpy as np
from PIL import Image
from pydicom.dataset import Dataset

from service.dicom.results import MANUFACTURER, ResultIds, model_label
from service.pipeline.results import Box, VolumeResult

MAX_OPACITY = 0.6


def heat_colours(h: np.ndarray) -> np.ndarray:
    """(H, W) in [0, 1] → (H, W, 3) float RGB: black → red → yellow (no white, which would vanish on bright tissue)."""
    return np.stack([np.clip(2 * h, 0, 1), np.clip(2 * h - 1, 0, 1), np.zeros_like(h)], axis=-1)


def overlay(gray: np.ndarray, heatmap: np.ndarray, box: Box) -> np.ndarray:
    """B-scan (H, W) in [0, 1] + uint8 heatmap covering `box` → (H, W, 3) uint8 RGB."""
    x0, y0, x1, y1 = box
    heat = np.zeros_like(gray, dtype=np.float32)
    heat[y0:y1, x0:x1] = np.asarray(Image.fromarray(heatmap).resize((x1 - x0, y1 - y0), Image.Resampling.BILINEAR),
                                    dtype=np.float32) / 255.0
    alpha = (MAX_OPACITY * heat)[..., None]
    rgb = (1 - alpha) * gray[..., None] + alpha * heat_colours(heat)
    return np.rint(np.clip(rgb, 0, 1) * 255).astype(np.uint8)


def build_sc(source: Dataset, gray: np.ndarray, heatmap_name: str, heatmap: np.ndarray, box: Box,
             result: VolumeResult, ids: ResultIds) -> hd.sc.SCImage:
    """SC of frame `result.decision.max_frame` (`gray`) with its `heatmap_name` heatmap over `box`; UIDs from
    `ids`."""
    rgb = overlay(gray, heatmap, box)
    d = result.decision
    frame_number = d.max_frame + 1
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source, pixel_array=rgb, photometric_interpretation="RGB", bits_allocated=8,
        coordinate_system="PATIENT", patient_orientation=_orientation(source),
        series_instance_uid=ids.sc_series_uid, series_number=ids.sc_series_number,
        sop_instance_uid=ids.sc_sop_uid, instance_number=1, manufacturer=MANUFACTURER,
        series_description=f"OCT anomaly heatmap ({model_label(result.model)})",
        manufacturer_model_name=result.model.name, software_versions=model_label(result.model),
        transfer_syntax_uid="1.2.840.10008.1.2.1")
    if len(source.get("PatientOrientation") or ()) != 2:
        # Type 2: a B-scan's lateral direction depends on the scan pattern, which the source did not state, so
        # leave it empty rather than assert one (highdicom only takes a value, hence the placeholder above).
        sc.PatientOrientation = ""
    # General Series Laterality, Type 2C: the eye is a paired structure. R or L from the source (an OCT states it
    # as Image Laterality, or per frame); empty when unknown or both, which Type 2 allows.
    sc.Laterality = _laterality(source)
    sc.BurnedInAnnotation = "NO"
    n, scored = len(result.frames), len(result.scored)
    sc.ImageComments = (f"{heatmap_name} heatmap over frame {frame_number} of {n}; "
                        + (f"{scored} of {n} frames scored (the others hold no retina); " if scored < n else "")
                        + f"score {d.score:.6g}, threshold {d.threshold:.6g}, "
                        f"{'ABNORMAL' if d.is_anomalous else 'normal'}")
    sc.DerivationDescription = f"Anomaly heatmap from {model_label(result.model)}"
    sc.SourceImageSequence = [_frame_ref(source, frame_number)]
    return sc


def _laterality(source: Dataset) -> str:
    candidates = [source.get("ImageLaterality"), source.get("Laterality")]
    for group in source.get("SharedFunctionalGroupsSequence") or ():
        for anatomy in group.get("FrameAnatomySequence") or ():
            candidates.append(anatomy.get("FrameLaterality"))
    return next((str(c) for c in candidates if str(c or "") in ("R", "L")), "")


def _orientation(source: Dataset) -> tuple[str, str]:
    given = list(source.get("PatientOrientation") or ())
    return (str(given[0]), str(given[1])) if len(given) == 2 else ("L", "P")


def _frame_ref(source: Dataset, frame_number: int) -> Dataset:
    ref = Dataset()
    ref.ReferencedSOPClassUID = source.SOPClassUID
    ref.ReferencedSOPInstanceUID = source.SOPInstanceUID
    ref.ReferencedFrameNumber = frame_number
    return ref
