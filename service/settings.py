"""The service's one settings class: every knob comes from an `OCT_*` environment variable (or `.env`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

# The default model: the shipped real-scan model in the repository's own store (beside this package), so that
# `python -m service` with no settings serves it from any working directory. OCT_MODEL_* override both.
SHIPPED_STORE = Path(__file__).resolve().parents[1] / "model_store"
SHIPPED_MODEL = "kermany-oct"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="OCT_", extra="ignore", protected_namespaces=())

    # The model: <model_store>/<model_name>/<model_version>/{model.pt, manifest.json}.
    model_store: Path = SHIPPED_STORE
    model_name: str = SHIPPED_MODEL
    model_version: int | None = Field(default=None, description="None (unset) serves the highest version")
    device: Literal["auto", "cuda", "cpu"] = "auto"
    # 0 keeps torch's default; on a shared CPU host a small number stops inference starving the event loop.
    torch_threads: int = Field(default=0, ge=0)
    warmup: bool = True

    # Dynamic batching.
    max_batch_size: int = Field(default=16, ge=1, le=1024)
    max_batch_delay_ms: float = Field(default=5.0, ge=0)
    max_queue: int = Field(default=256, ge=1, description="Requests waiting for inference before 503")
    retry_after_s: int = Field(default=1, ge=1)
    # 0: a B-scan's decoding, preprocessing and heatmap encoding run on the event loop — least CPU per request (no
    # thread hand-offs, no GIL contention); use OCT_WORKERS processes for parallelism. DICOM and big uploads always
    # go to a thread, so the loop (and /healthz) never waits long.
    cpu_workers: int = Field(default=0, ge=0, description="Threads that decode uploads and encode heatmaps")

    # Input limits: bytes on the wire, then pixels after the header is read (before decoding).
    # Large enough for a whole OCT volume (128 B-scans of 512×496 at 16 bits is 65 MB) in one DICOM upload.
    max_upload_bytes: int = Field(default=128 * 1024 * 1024, ge=1024)
    max_image_side: int = Field(default=8192, ge=16)
    max_image_pixels: int = Field(default=40_000_000, ge=256)

    # Comma-separated keys, all valid at once (rotation: add the new key, move clients, drop the old one). Health,
    # readiness and metrics are always open. See docs/security.md and service/security.py.
    api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list, repr=False)

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    log_format: Literal["json", "text"] = "json"
    log_level: str = "INFO"

    # PACS (DICOMweb) forwarding of results; used by service/dicom and routes/dicomweb.
    pacs_stow_url: str = Field(default="", description="STOW-RS URL results are sent to; empty = not forwarded")
    pacs_username: str = ""
    pacs_password: str = Field(default="", repr=False)
    # Bearer token for the PACS, instead of username/password.
    pacs_token: str = Field(default="", repr=False)
    pacs_timeout_s: float = Field(default=30.0, gt=0)
    pacs_retry_max: int = Field(default=8, ge=0)
    pacs_retry_backoff_s: float = Field(default=2.0, ge=0)
    results_dir: Path = Path("results")
    # The base of every URL the service hands out (STOW-RS RetrieveURLs, result links), e.g.
    # https://gateway.example:8443/oct when clients reach it through a proxy: the request's own Host is then the
    # proxy's view, not theirs. Empty: the request's scheme, host and port (service/routes/dicomweb.py).
    public_url: str = Field(default="", description="Base URL clients reach the service at; empty = from the request")

    # --- Safety (service/security.py, service/upload.py, service/dicom/) ---
    # Listening beyond loopback with no API key is refused at start unless this is true (results stay keyed anyway).
    allow_anonymous: bool = False
    # Bytes of request bodies held at once, and voxels of decoded DICOM objects held at once; a request that would
    # pass either answers 503 + Retry-After instead of growing the process.
    max_inflight_bytes: int = Field(default=512 * 1024 * 1024, ge=1024)
    max_inflight_voxels: int = Field(default=256 * 1024 * 1024, ge=1)
    # A body up to this size stays in memory while it streams in; a larger one goes to a temporary file.
    upload_spool_bytes: int = Field(default=1024 * 1024, ge=0)
    # One DICOM object: all frames together, and each side (checked from the header, before decoding).
    dicom_max_voxels: int = Field(default=128 * 1024 * 1024, ge=1)
    dicom_max_side: int = Field(default=8192, ge=16)
    # Delivered (or, with no PACS, stored) results are deleted after this many days; 0 keeps them for ever.
    results_retention_days: float = Field(default=30.0, ge=0)

    # Serving processes, drain and precision
    workers: int = Field(default=1, ge=1, le=256, description="Front-end processes sharing the port, each with its "
                         "own batcher on the shared device (docs/service.md, 'Processes')")
    drain_delay_s: float = Field(default=5.0, ge=0, description="After SIGTERM: /readyz answers 503 at once, "
                                 "requests are still accepted and answered this long, then the listener closes")
    drain_timeout_s: float = Field(default=60.0, gt=0, description="Longest wait for held requests to finish")
    precision: Literal["fp32", "bf16", "fp16"] = Field(default="fp32", description="Autocast dtype of the scorer")
    inflight_batches: int = Field(default=0, ge=0, le=8, description="Batches in flight at once; 0 = 2 on CUDA "
                                  "(copies overlap compute), 1 on CPU")

    @field_validator("model_version", mode="before")
    @classmethod
    def _latest(cls, v: object) -> object:
        return None if isinstance(v, str) and v.strip().lower() in ("", "latest") else v

    @field_validator("public_url")
    @classmethod
    def _public_url(cls, v: str) -> str:
        v = v.strip()
        if not v:
            return ""
        parts = urlsplit(v)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
            raise ValueError("must be an http(s) URL with a host and no query or fragment, e.g. "
                             "https://gateway.example:8443/oct")
        parts.port  # noqa: B018 -- raises ValueError for a port that is not a number in 0-65535
        return v.rstrip("/")

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, v: object) -> object:
        if isinstance(v, str):
            return [k.strip() for k in v.split(",") if k.strip()]
        return v
