"""Scoring-service benchmark on loopback; prints tables, asserts nothing.

    python bench/bench_service.py --model_dir model_store/kermany-oct/1 --concurrency 1,8,32 --duration 10

(a) raw scorer img/s per batch size (load_scorer, no HTTP);
(b) service img/s, p50/p99 latency per concurrency, with batching on and with OCT_MAX_BATCH_SIZE=1;
(c) the same with heatmaps=false;
(d) a bare FastAPI endpoint that only reads the same upload (the framework's ceiling).
Without --model_dir a phantom model of the default architecture is built through the project's CLIs (slow on CPU;
--tiny builds the test-sized one). The load generator shares the host with the server: on a small machine its own
CPU use lowers every service number, so compare rows of one run, not runs on different hosts.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from PIL import Image  # noqa: E402

from octcore.manifest import load_scorer  # noqa: E402
from octcore.preprocess import preprocess  # noqa: E402
from service.launch import ServiceProcess, StartFailed, free_port  # noqa: E402

TINY = ["--image_size", "64", "--n_hiddens", "32", "--n_residual_hiddens", "16", "--n_residual_layers", "2",
        "--embedding_dim", "16", "--n_embeddings", "32"]


def build_phantom_model(work: Path, tiny: bool, epochs: int) -> Path:
    def cli(*args: str) -> None:
        print("+ python -m", " ".join(args), flush=True)
        subprocess.run([sys.executable, "-m", *args], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)

    cli("training.phantom", str(work / "data"), "--train-normal", "64", "--test-per-class", "8", "--seed", "1")
    cli("training.train", "--data_root", str(work / "data"), "--output_dir", str(work / "runs"), "--epochs",
        str(epochs), "--batch_size", "8", "--device", "cpu", "--num_workers", "0", *(TINY if tiny else []))
    ckpt = next((work / "runs").glob("*/best-*.ckpt"))
    cli("training.export", "--model_dir", str(ckpt), "--model_store", str(work / "store"), "--name", "bench",
        "--version", "1")
    return work / "store" / "bench" / "1"


def raw_scorer(version_dir: Path, image: Path, batch_sizes: list[int], device: str,
               seconds: float) -> dict[int, tuple[float, float]]:
    """Batch size → (img/s of the TorchScript scorer alone on a prepared batch, img/s with each image decoded from
    the upload's bytes and preprocessed first). The second is what a script scoring files needs whatever serves it:
    a model of the retina band finds the retina in every scan (`octcore.retina`), which the first leaves out."""
    manifest, scorer = load_scorer(version_dir, device=device)
    cfg = manifest.preprocessing_config()
    data = image.read_bytes()

    def prepared() -> torch.Tensor:
        with Image.open(io.BytesIO(data)) as im:  # the same scan the HTTP load sends, prepared as the service does
            return torch.from_numpy(preprocess(im, cfg))

    one = prepared()
    out = {}
    for b in batch_sizes:
        rates = []
        for prepare in (False, True):
            with torch.inference_mode():
                x = one.expand(b, 1, *one.shape).contiguous().to(device)
                for _ in range(3):  # TorchScript optimises a shape after its profiling runs
                    scorer(x)
                n, t0 = 0, time.perf_counter()
                while time.perf_counter() - t0 < seconds:
                    if prepare:
                        x = torch.stack([prepared() for _ in range(b)])[:, None].to(device)
                    res = scorer(x)
                    # The service copies scores and maps to host memory; so does this measurement.
                    {k: v.float().cpu().numpy() for k, v in res.items()}
                    n += b
            rates.append(n / (time.perf_counter() - t0))
        out[b] = (rates[0], rates[1])
    return out


def start(cmd: list[str], env: dict[str, str], port: int, cpus: set[int] | None = None) -> ServiceProcess:
    """Start a server and wait for its /readyz (service.launch); `cpus` pins it (and its children) to those CPUs."""
    server = ServiceProcess(env, command=cmd, port=port, cpus=cpus)
    try:
        server.start(timeout=300)
    except StartFailed as e:
        server.stop()
        raise SystemExit(f"{' '.join(cmd)} {e}") from e
    return server


def stop(server: ServiceProcess) -> None:
    server.stop(60)


async def load(url: str, data: bytes, concurrency: int, seconds: float, heatmaps: bool) -> dict[str, float]:
    lat: list[float] = []
    errors = 0
    stop_at = time.perf_counter() + seconds

    async def worker(c: httpx.AsyncClient) -> None:
        nonlocal errors
        while time.perf_counter() < stop_at:
            t0 = time.perf_counter()
            r = await c.post("/score", params={"heatmaps": str(heatmaps).lower()},
                             files={"file": ("scan.jpeg", data, "image/jpeg")})
            if r.status_code == 200:
                lat.append(time.perf_counter() - t0)
            else:
                errors += 1

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as c:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(c) for _ in range(concurrency)))
        took = time.perf_counter() - t0
    a = np.array(lat) * 1e3 if lat else np.array([float("nan")])
    return {"img_s": len(lat) / took, "p50": float(np.percentile(a, 50)), "p99": float(np.percentile(a, 99)),
            "errors": errors}


def batch_totals(url: str) -> tuple[float, float]:
    """(images, batches) the service has run so far, from /metrics."""
    text = httpx.get(f"{url}/metrics").text
    s = re.search(r"^oct_batch_size_sum (\S+)$", text, re.M)
    c = re.search(r"^oct_batch_size_count (\S+)$", text, re.M)
    return (float(s.group(1)), float(c.group(1))) if s and c else (0.0, 0.0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_dir", type=Path, help="a model version dir <store>/<name>/<version>")
    p.add_argument("--tiny", action="store_true", help="build the 64 px test-sized model instead of the default")
    p.add_argument("--epochs", type=int, default=1, help="epochs when building a phantom model")
    p.add_argument("--image", type=Path, help="the upload (default: a phantom CNV scan, or a test Kermany scan)")
    p.add_argument("--concurrency", default="1,8,32")
    p.add_argument("--duration", type=float, default=10.0, help="seconds per load measurement")
    p.add_argument("--batch_sizes", default="1,2,4,8,16,32")
    p.add_argument("--max_batch_size", type=int, default=16)
    p.add_argument("--max_batch_delay_ms", type=float, default=5.0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--skip", default="", help="comma list of parts to skip: a,b,c,d")
    p.add_argument("--workers", type=int, default=1, help="OCT_WORKERS for the service runs")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"], help="OCT_PRECISION")
    args = p.parse_args()
    skip = set(args.skip.split(","))
    work = Path(tempfile.mkdtemp(prefix="bench-service-"))
    version_dir = args.model_dir or build_phantom_model(work, args.tiny, args.epochs)
    image = args.image
    if image is None:
        candidates = sorted((ROOT / "tests" / "data" / "kermany").rglob("CNV*.jpeg"))
        if not candidates:
            if not (work / "data").is_dir():
                subprocess.run([sys.executable, "-m", "training.phantom", str(work / "data"), "--train-normal", "1",
                                "--test-per-class", "1"], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
            candidates = sorted((work / "data").glob("OCT2017/test/CNV/*.jpeg"))
        image = candidates[0]
    data = image.read_bytes()
    conc = [int(c) for c in args.concurrency.split(",")]
    print(f"model {version_dir}  device {args.device}  torch threads {torch.get_num_threads()}  "
          f"cpus {os.cpu_count()}  image {image.name} ({len(data)} B)  {args.duration:.0f} s per point  "
          f"workers {args.workers}  precision {args.precision}")

    raw: dict[int, tuple[float, float]] = {}
    if "a" not in skip:
        raw = raw_scorer(version_dir, image, [int(b) for b in args.batch_sizes.split(",")], args.device,
                         min(args.duration, 5.0))
        print("\n(a) raw scorer: img/s of the scorer alone, and with decoding and preprocessing\n batch   img/s"
              "  +prep")
        for b, (v, vp) in raw.items():
            print(f" {b:5d} {v:8.1f} {vp:6.1f}")

    rows = []
    store, name, version = version_dir.parent.parent, version_dir.parent.name, version_dir.name
    configs = []
    if "b" not in skip:
        configs += [("batching", args.max_batch_size, True), ("batch=1", 1, True)]
    if "c" not in skip:
        configs += [("batching", args.max_batch_size, False), ("batch=1", 1, False)]
    for label, mbs, heat in configs:
        port = free_port()
        env = {"OCT_MODEL_STORE": str(store), "OCT_MODEL_NAME": name, "OCT_MODEL_VERSION": version,
               "OCT_DEVICE": args.device, "OCT_PORT": str(port), "OCT_MAX_BATCH_SIZE": str(mbs),
               "OCT_MAX_BATCH_DELAY_MS": str(args.max_batch_delay_ms), "OCT_MAX_QUEUE": "4096",
               "OCT_LOG_LEVEL": "WARNING", "OCT_WARMUP": "false", "OCT_WORKERS": str(args.workers),
               "OCT_PRECISION": args.precision}
        proc = start([sys.executable, "-m", "service"], env, port)
        try:
            for c in conc:
                url = f"http://127.0.0.1:{port}"
                asyncio.run(load(url, data, c, min(2.0, args.duration), heat))  # unmeasured warm-up at this load
                before = batch_totals(url)
                r = asyncio.run(load(url, data, c, args.duration, heat))
                after = batch_totals(url)
                mb = (after[0] - before[0]) / max(1.0, after[1] - before[1])
                rows.append((f"service {label}", "on" if heat else "off", c, r, mb))
        finally:
            stop(proc)
    if "d" not in skip:
        port = free_port()
        proc = start([sys.executable, "-m", "uvicorn", "bench.service_bare_app:app", "--port", str(port),
                      "--log-level", "warning"], {}, port)
        try:
            for c in conc:
                rows.append(("bare FastAPI read", "-", c, asyncio.run(load(f"http://127.0.0.1:{port}", data, c,
                                                                             args.duration, False)), float("nan")))
        finally:
            stop(proc)
    if rows:
        print("\n(b)(c)(d) over HTTP on loopback (batch: mean images per forward pass, from /metrics)")
        print(f" {'server':22s} {'heatmaps':8s} {'conc':>4s} {'img/s':>8s} {'p50 ms':>8s} {'p99 ms':>8s} "
              f"{'batch':>6s} {'err':>4s} {'vs raw':>7s} {'vs +prep':>8s}")
        for server, heat, c, r, mb in rows:
            ref = raw.get(min(raw, key=lambda b: abs(b - mb))) if raw and mb == mb else None
            vs = f"{r['img_s'] / ref[0]:6.0%}" if ref else "   -"
            vs_prep = f"{r['img_s'] / ref[1]:6.0%}" if ref else "   -"
            mb_s = f"{mb:6.1f}" if mb == mb else "     -"
            print(f" {server:22s} {heat:8s} {c:4d} {r['img_s']:8.1f} {r['p50']:8.1f} {r['p99']:8.1f} {mb_s} "
                  f"{r['errors']:4d} {vs:>7s} {vs_prep:>8s}")
        print("\n'vs raw': service img/s over raw scorer img/s at the batch size nearest the mean batch seen; "
              "'vs +prep': over the scorer's rate with each image decoded and preprocessed first.")


if __name__ == "__main__":
    main()
