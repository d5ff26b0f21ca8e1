"""DICOM in and out: decoding OCT objects for scoring, result objects (SR, heatmap SC) and their delivery to a PACS."""
