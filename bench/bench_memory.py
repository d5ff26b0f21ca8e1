"""Peak memory of a real service under the largest uploads its defaults allow; prints a table, asserts nothing.

    python bench/bench_memory.py --model_dir model_store/phantom/1 --volumes 8

Starts `python -m service` with the default limits (OCT_MAX_UPLOAD_BYTES, OCT_DICOM_MAX_VOXELS,
OCT_MAX_INFLIGHT_BYTES, OCT_MAX_INFLIGHT_VOXELS unset), then `--volumes` clients each POST one maximum-size
multi-frame OCT volume (default 127 frames of 1024×1024 at 8 bits: 127 Mi voxels, just under both the 128 MiB
upload limit and the 128 Mi voxel limit) to /score at the same time. A client answered 503 waits Retry-After and
sends again. The service's peak RSS (VmHWM from /proc) is printed next to its RSS before the load.
Without --model_dir a tiny phantom model is built through the project's CLIs first (about a minute).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_service import build_phantom_model  # noqa: E402

from service.launch import ServiceProcess, StartFailed  # noqa: E402

OPT = "1.2.840.10008.5.1.4.1.1.77.1.5.4"


def volume(frames: int, rows: int, cols: int) -> bytes:
    rng = np.random.default_rng(0)
    # Layered B-scans: a bright band over speckle, the same for every frame (content does not change the memory).
    y = np.arange(rows)[:, None]
    frame = (40 + 160 * np.exp(-((y - rows * 0.4) ** 2) / (2 * (rows / 20) ** 2))
             + rng.integers(0, 40, (rows, cols))).clip(0, 255).astype(np.uint8)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = OPT, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = OPT, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.PatientName, ds.PatientID = "OPT", "Bench^Volume", "BENCH"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.NumberOfFrames, ds.Rows, ds.Columns = frames, rows, cols
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = np.broadcast_to(frame, (frames, rows, cols)).tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def rss_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


async def client(url: str, body: bytes, stats: dict[str, int]) -> None:
    async with httpx.AsyncClient(timeout=600) as c:
        while True:
            try:
                r = await c.post(f"{url}/score", params={"heatmaps": "false"}, content=body,
                                 headers={"Content-Type": "application/dicom"})
            except httpx.TransportError:  # refused from its headers while the body was still being sent
                stats["dropped"] += 1
                await asyncio.sleep(1)
                continue
            if r.status_code == 503:
                stats["503"] += 1
                await asyncio.sleep(float(r.headers.get("Retry-After", "1")))
                continue
            stats[str(r.status_code)] = stats.get(str(r.status_code), 0) + 1
            return


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model_dir", type=Path, default=None, help="model_store/<name>/<version>")
    ap.add_argument("--volumes", type=int, default=8)
    ap.add_argument("--frames", type=int, default=127)
    ap.add_argument("--rows", type=int, default=1024)
    ap.add_argument("--cols", type=int, default=1024)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model_dir or build_phantom_model(Path(tmp), tiny=True, epochs=1)
        body = volume(args.frames, args.rows, args.cols)
        env = {"OCT_MODEL_STORE": str(model_dir.parents[1]), "OCT_MODEL_NAME": model_dir.parent.name,
               "OCT_MODEL_VERSION": model_dir.name, "OCT_DEVICE": "cpu", "OCT_RESULTS_DIR": str(Path(tmp) / "results"),
               "OCT_LOG_LEVEL": "WARNING"}
        svc = ServiceProcess(env, log_path=Path(tmp) / "service.log", clean=True)  # the limits at their defaults
        url = svc.url
        try:
            try:
                svc.start(timeout=120)
            except StartFailed as e:
                print(f"service {e}", file=sys.stderr)
                return 1
            proc = svc.proc
            assert proc is not None
            before = rss_kib(proc.pid, "VmRSS")
            stats = {"dropped": 0, "503": 0}
            started = time.perf_counter()

            async def run() -> None:
                await asyncio.gather(*(client(url, body, stats) for _ in range(args.volumes)))

            asyncio.run(run())
            took = time.perf_counter() - started
            peak = rss_kib(proc.pid, "VmHWM")
        finally:
            svc.stop()
    mib = 1024
    print(f"{args.volumes} concurrent volumes of {args.frames}×{args.rows}×{args.cols} 8-bit "
          f"({len(body) / 2**20:.0f} MiB each), default limits, heatmaps off")
    print("| volumes | answered 200 | 503 + retry | refused mid-send | wall s | RSS before MiB | peak RSS MiB |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {args.volumes} | {stats.get('200', 0)} | {stats['503']} | {stats['dropped']} | {took:.0f} | "
          f"{before / mib:.0f} | {peak / mib:.0f} |")
    other = {k: v for k, v in stats.items() if k not in ("200", "503", "dropped")}
    if other:
        print(f"other answers: {other}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
