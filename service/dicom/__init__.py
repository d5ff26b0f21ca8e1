"""DICOM in and out: decoding OCT objects for scoring, result objects (SR, heatmap SC) and their delivery to a PACS."""

import logging

# highdicom logs every module it copies from the source at INFO: noise in the service's audit-grade log.
logging.getLogger("highdicom").setLevel(logging.WARNING)
