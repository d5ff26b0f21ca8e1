"""The pipeline every upload takes, REST or DICOM: decode → preprocess → infer → decide → render (pipeline.py), with
typed results that carry arrays (results.py). Below it, the inference core (service.inference); above it, the REST
answers (service.answers) and the DICOM results (service.dicom)."""
