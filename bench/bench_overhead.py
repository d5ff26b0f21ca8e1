"""The service's own CPU cost per request, with a scorer that costs nothing; prints tables, asserts nothing.

    python bench/bench_overhead.py --model_dir model_store/kermany-oct/1 [--workers 1,2] [--seconds 8]
    python bench/bench_overhead.py --model_dir model_store/kermany-oct/1 --real    # the whole cost, real model
    python bench/bench_overhead.py --model_dir model_store/kermany-oct/1 --region retina   # a model of the band

The scorer is `bench/null_scorer.py` built from `--model_dir`'s manifest (the same maps and scores, at `--size`²),
so what is measured is decoding, preprocessing, batching, heatmaps, HTTP and JSON. For JPEG, PNG and DICOM uploads
(multipart, one 512×496 B-scan), heatmaps off and on, it reports the CPU-seconds of the service's whole process tree
(every process and thread: /proc/<pid>/stat utime+stime, children included) per answered request, and the same for
a bare Starlette endpoint that only reads the upload (`bench/overhead_bare_app.py`). CPU-seconds per request does not
depend on what else runs on the machine; requests per second does, so the scaling table also prints the cores the
service used and the load average.

With `--workers 1,2` it then runs the service with each OCT_WORKERS value at a concurrency that keeps every process
busy and prints requests/s, cores used and CPU per request. The load generator (`--loadgen python`: threads in this
process; `ab`: ApacheBench, far cheaper) runs on the CPUs the service is not pinned to when `--pin` is given; on a
2-core machine it shares them, and its CPU is not counted.
"""

from __future__ import annotations

import argparse
import io
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from http.client import HTTPConnection
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_service import free_port, start, stop  # noqa: E402
from bench.null_scorer import build_null_store  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")
BOUNDARY = "bench-overhead-boundary"


def tree_cpu_s(root: int) -> float:
    """utime + stime (with reaped children's) of `root` and every process below it, in seconds."""
    stats: dict[int, tuple[int, float]] = {}
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        stats[int(p)] = (int(fields[1]), sum(int(x) for x in fields[11:15]) / TICK)
    keep, todo = set(), [root]
    while todo:
        q = todo.pop()
        keep.add(q)
        todo += [c for c, (parent, _) in stats.items() if parent == q and c not in keep]
    return sum(stats[p][1] for p in keep if p in stats)


def multipart(data: bytes, filename: str, media: str) -> bytes:
    head = (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
            f"Content-Type: {media}\r\n\r\n").encode()
    return head + data + f"\r\n--{BOUNDARY}--\r\n".encode()


def load(url: str, body: bytes, path: str, concurrency: int, seconds: float) -> tuple[int, int, float, float]:
    """Keep-alive clients posting `body` for `seconds` → (ok, not ok, wall seconds, p99 latency ms)."""
    u = urllib.parse.urlsplit(url)
    stop = time.monotonic() + seconds
    counts = [[0, 0] for _ in range(concurrency)]
    latencies: list[list[float]] = [[] for _ in range(concurrency)]
    headers = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}

    def worker(i: int) -> None:
        c = HTTPConnection(u.hostname, u.port, timeout=120)
        while time.monotonic() < stop:
            sent = time.monotonic()
            c.request("POST", path, body=body, headers=headers)
            r = c.getresponse()
            r.read()
            latencies[i].append(time.monotonic() - sent)
            counts[i][0 if r.status == 200 else 1] += 1
        c.close()

    t0 = time.monotonic()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    every = [x for per_client in latencies for x in per_client]
    p99 = 1e3 * float(np.percentile(every, 99)) if every else float("nan")
    return sum(c[0] for c in counts), sum(c[1] for c in counts), time.monotonic() - t0, p99


def load_ab(url: str, body: bytes, path: str, concurrency: int, seconds: float) -> tuple[int, int, float, float]:
    """The same load from ApacheBench (`ab`, apt package apache2-utils): a C client that costs a fraction of the
    Python one's CPU, so on a small machine more of the cores are left to the service."""
    with tempfile.NamedTemporaryFile(suffix=".body") as f:
        f.write(body)
        f.flush()
        t0 = time.monotonic()
        out = subprocess.run(["ab", "-q", "-k", "-c", str(concurrency), "-t", str(seconds), "-n", "10000000",
                              "-p", f.name, "-T", f"multipart/form-data; boundary={BOUNDARY}", url + path],
                             capture_output=True, text=True, check=True).stdout
        wall = time.monotonic() - t0

    def field(name: str) -> int:
        m = re.search(rf"^{name}:\s+(\d+)", out, re.M)
        return int(m.group(1)) if m else 0

    # ab counts an answer whose length differs from the first one's as "failed" (Length); ours differ by design.
    m = re.search(r"\(Connect: (\d+), Receive: (\d+), Length: \d+, Exceptions: (\d+)\)", out)
    bad = field("Non-2xx responses") + (sum(int(x) for x in m.groups()) if m else 0)
    p99 = re.search(r"^\s*99%\s+(\d+)", out, re.M)
    return field("Complete requests") - bad, bad, wall, float(p99.group(1)) if p99 else float("nan")


LOADERS = {"python": load, "ab": load_ab}


def measure(pid: int, url: str, body: bytes, path: str, concurrency: int, seconds: float,
            loader: str = "python") -> dict[str, float]:
    run = LOADERS[loader]
    run(url, body, path, concurrency, min(2.0, seconds))  # warm: first batches, allocator, connection set-up
    c0 = tree_cpu_s(pid)
    ok, bad, wall, p99 = run(url, body, path, concurrency, seconds)
    cpu = tree_cpu_s(pid) - c0
    return {"ms": 1e3 * cpu / max(ok, 1), "rps": ok / wall, "cores": cpu / wall, "bad": bad, "p99": p99}


def uploads(image: Path) -> dict[str, tuple[bytes, str, str]]:
    """The same B-scan as JPEG (as given), PNG and a single-frame DICOM: (bytes, file name, media type)."""
    with Image.open(image) as im:
        gray = np.asarray(im.convert("L"))
    png = io.BytesIO()
    Image.fromarray(gray).save(png, format="PNG")
    return {"jpeg": (image.read_bytes(), "scan.jpeg", "image/jpeg"), "png": (png.getvalue(), "scan.png", "image/png"),
            "dicom": (dicom_bytes(gray), "scan.dcm", "application/dicom")}


def dicom_bytes(gray: np.ndarray) -> bytes:
    """One 8-bit B-scan as an uncompressed Ophthalmic Tomography instance (what a PACS forwards)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.77.1.5.4"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber, ds.NumberOfFrames = "OPT", 1, 1, 1
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = gray.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = np.ascontiguousarray(gray, np.uint8).tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def service_env(store: Path, port: int, device: str, extra: dict[str, str], name: str = "null") -> dict[str, str]:
    return {"OCT_MODEL_STORE": str(store), "OCT_MODEL_NAME": name, "OCT_DEVICE": device, "OCT_HOST": "127.0.0.1",
            "OCT_PORT": str(port), "OCT_MAX_QUEUE": "4096", "OCT_LOG_LEVEL": "WARNING", **extra}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_dir", type=Path, required=True, help="a real export <store>/<name>/<version> (template)")
    p.add_argument("--image", type=Path, default=None, help="the B-scan (default: a test Kermany CNV scan)")
    p.add_argument("--size", type=int, default=256, help="the null scorer's input and map size")
    p.add_argument("--region", choices=["scan", "retina"], default=None,
                   help="the null scorer's input region (default: --model_dir's): `retina` adds finding the retina")
    p.add_argument("--real", action="store_true",
                   help="serve --model_dir itself instead of the null scorer: the whole cost of a real request")
    p.add_argument("--seconds", type=float, default=8.0, help="measured seconds per row")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--formats", default="jpeg,png,dicom")
    p.add_argument("--workers", default="", help="comma list of OCT_WORKERS values for the scaling table")
    p.add_argument("--loadgen", default="python", choices=sorted(LOADERS),
                   help="load generator: python (http.client threads) or ab (ApacheBench, apt apache2-utils)")
    p.add_argument("--pin", default="", help="CPUs for the service, e.g. 0-7; the load generator gets the rest")
    p.add_argument("--env", action="append", default=[], help="extra OCT_X=Y for the service (repeatable)")
    args = p.parse_args()
    image = args.image or sorted((ROOT / "tests" / "data" / "kermany").rglob("CNV*.jpeg"))[0]
    extra = dict(kv.split("=", 1) for kv in args.env)
    svc_cpus: set[int] | None = None
    if args.pin:
        lo, _, hi = args.pin.partition("-")
        svc_cpus = set(range(int(lo), int(hi or lo) + 1))
        rest = set(os.sched_getaffinity(0)) - svc_cpus
        if rest:
            os.sched_setaffinity(0, rest)
    if args.real:
        store, name = args.model_dir.parent.parent, args.model_dir.parent.name
    else:
        store = build_null_store(args.model_dir, Path(tempfile.mkdtemp(prefix="bench-overhead-")), args.size,
                                 region=args.region)
        store, name = store.parent.parent, "null"
    files = uploads(image)
    scorer = (f"real scorer {args.model_dir}" if args.real else
              f"null scorer from {args.model_dir} at {args.size}², region {args.region or 'as the template'}")
    print(f"{scorer}  image {image.name}  device {args.device}  "
          f"cpus {os.cpu_count()}  load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}  "
          f"concurrency {args.concurrency}  {args.seconds:.0f} s per row  load generator {args.loadgen}  "
          f"extra env {extra or '-'}")

    port = free_port()
    bare = start([sys.executable, "-m", "uvicorn", "bench.overhead_bare_app:app", "--port", str(port),
                  "--log-level", "warning"], {}, port, svc_cpus)
    try:
        body = multipart(*files["jpeg"])
        base = measure(bare.pid(), f"http://127.0.0.1:{port}", body, "/score", args.concurrency, args.seconds,
                       args.loadgen)
    finally:
        stop(bare)

    rows = []
    port = free_port()
    svc = start([sys.executable, "-m", "service"], service_env(store, port, args.device, extra, name), port, svc_cpus)
    try:
        for fmt in args.formats.split(","):
            body = multipart(*files[fmt])
            for heat in ("false", "true"):
                r = measure(svc.pid(), f"http://127.0.0.1:{port}", body, f"/score?heatmaps={heat}",
                            args.concurrency, args.seconds, args.loadgen)
                rows.append((fmt, "on" if heat == "true" else "off", r))
    finally:
        stop(svc)

    print("\nCPU-seconds of the whole process tree per answered request (multipart upload, 512×496 B-scan)")
    print(f" {'upload':8s} {'heatmaps':8s} {'ms CPU/req':>10s} {'× bare':>7s} {'req/s':>7s} {'p99 ms':>7s} "
          f"{'cores':>6s} {'non-200':>7s}")
    print(f" {'bare':8s} {'-':8s} {base['ms']:10.2f} {1.0:7.1f} {base['rps']:7.0f} {base['p99']:7.1f} "
          f"{base['cores']:6.2f} {base['bad']:7d}")
    for fmt, heat, r in rows:
        print(f" {fmt:8s} {heat:8s} {r['ms']:10.2f} {r['ms'] / base['ms']:7.1f} {r['rps']:7.0f} {r['p99']:7.1f} "
              f"{r['cores']:6.2f} {r['bad']:7d}")

    if args.workers:
        body = multipart(*files["jpeg"])
        print(f"\nscaling, JPEG, heatmaps off (load average now {os.getloadavg()[0]:.2f})")
        print(f" {'workers':>7s} {'conc':>5s} {'req/s':>7s} {'cores':>6s} {'ms CPU/req':>10s} {'non-200':>7s}")
        first = None
        for w in (int(x) for x in args.workers.split(",")):
            port = free_port()
            svc = start([sys.executable, "-m", "service"],
                        service_env(store, port, args.device, {"OCT_WORKERS": str(w), **extra}, name), port, svc_cpus)
            try:
                conc = max(args.concurrency, 8 * w)
                r = measure(svc.pid(), f"http://127.0.0.1:{port}", body, "/score?heatmaps=false", conc, args.seconds,
                            args.loadgen)
            finally:
                stop(svc)
            first = first or r["rps"]
            print(f" {w:7d} {conc:5d} {r['rps']:7.0f} {r['cores']:6.2f} {r['ms']:10.2f} {r['bad']:7d}"
                  f"   {r['rps'] / first:.2f}× the first row")


if __name__ == "__main__":
    main()
