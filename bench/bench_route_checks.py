"""What FastAPI's dependencies and response-model check cost `POST /score`; prints a table, asserts nothing.

    python bench/bench_route_checks.py --model_dir model_store/kermany-oct/1

The app serves the route twice: `/score` as shipped (key, pipeline and query through `Depends`, the answer returned
for FastAPI to check against the response model and serialise) and `/score-by-hand`, the same pipeline and answer
with the key, the query and the JSON done by hand, as the route did before. CPU-seconds of this process per request
(client and server in one process, through Starlette's TestClient), blocks of the two alternating, the median block
of each. Once with a scorer that costs nothing (bench/null_scorer.py from `--model_dir`'s manifest: the difference is
the checks' own cost), once with the model itself (what share of a real request that is). One torch thread: a second
one's spin-waits would count as CPU and drown a difference of a tenth of a millisecond.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from fastapi import Request, Response
from fastapi.testclient import TestClient

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.null_scorer import build_null_store  # noqa: E402
from service.answers import image_answer  # noqa: E402
from service.deps import require_api_key  # noqa: E402
from service.main import create_app  # noqa: E402
from service.pipeline.decode import Limits  # noqa: E402
from service.routes.score import read_upload  # noqa: E402
from service.schemas import ScoreQuery  # noqa: E402
from service.settings import Settings  # noqa: E402


async def score_by_hand(request: Request) -> Response:
    """`/score` without FastAPI's dependencies and response check: key, query and JSON by hand."""
    started = time.perf_counter()
    await require_api_key(request, None, request.headers.get("x-api-key"))
    pipeline = request.app.state.pipeline
    query = ScoreQuery.model_validate(dict(request.query_params))
    pipeline.check_ready()
    data, decoder = await read_upload(request, pipeline.settings)
    limits = Limits(max_side=pipeline.settings.max_image_side, max_pixels=pipeline.settings.max_image_pixels)
    result = await pipeline.score_upload(data, decoder, limits, maps=query.heatmaps, preview=query.preview)
    answer = await image_answer(pipeline, result, started=started, request_id=request.scope.get("oct.request_id"),
                                heatmap_format=query.heatmap_format)
    return Response(answer.model_dump_json(exclude_none=True), media_type="application/json")


def cpu_per_request(client: TestClient, path: str, files: dict, n: int) -> float:
    t0 = time.process_time()
    for _ in range(n):
        r = client.post(path, files=files)
        assert r.status_code == 200, r.text
    return (time.process_time() - t0) / n


def measure(store: Path, name: str, image: bytes, n: int, rounds: int) -> tuple[float, float]:
    settings = Settings(model_store=store, model_name=name, device="cpu", warmup=False, max_batch_delay_ms=0)
    app = create_app(settings)
    app.add_api_route("/score-by-hand", score_by_hand, methods=["POST"])
    files = {"file": ("scan.jpeg", image, "image/jpeg")}
    shipped, by_hand = [], []
    with TestClient(app) as client:
        cpu_per_request(client, "/score", files, 5)  # warm
        cpu_per_request(client, "/score-by-hand", files, 5)
        for _ in range(rounds):
            shipped.append(cpu_per_request(client, "/score", files, n))
            by_hand.append(cpu_per_request(client, "/score-by-hand", files, n))
    return statistics.median(shipped), statistics.median(by_hand)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_dir", type=Path, required=True, help="a real export <store>/<name>/<version>")
    p.add_argument("--image", type=Path, default=ROOT / "tests" / "data" / "kermany" / "CNV-103044-2.jpeg")
    p.add_argument("--requests", type=int, default=200, help="requests per block (a fifth of it with the model)")
    p.add_argument("--rounds", type=int, default=9, help="blocks of each route, alternating")
    args = p.parse_args()
    torch.set_num_threads(1)
    image = args.image.read_bytes()
    null_store = Path(tempfile.mkdtemp(prefix="bench-route-checks-"))
    size = json.loads((args.model_dir / "manifest.json").read_text())["input"]["size"]
    build_null_store(args.model_dir, null_store, size=size)
    rows = [("null scorer", *measure(null_store, "null", image, args.requests, args.rounds)),
            (f"{args.model_dir.parent.name} v{args.model_dir.name}",
             *measure(args.model_dir.parent.parent, args.model_dir.parent.name, image, max(10, args.requests // 5),
                      args.rounds))]
    print(f"{args.image.name}, heatmaps on; CPU ms per request of one process (client + server), the median of "
          f"{args.rounds} blocks")
    print(f" {'scorer':22s} {'Depends + check':>16s} {'by hand':>8s} {'difference':>11s}")
    for label, shipped, by_hand in rows:
        print(f" {label:22s} {shipped * 1e3:16.2f} {by_hand * 1e3:8.2f} {(shipped - by_hand) * 1e3:11.3f}")
    cost = rows[0][1] - rows[0][2]
    print(f"\nthe checks' cost (null scorer) over a real request: {cost / rows[1][1]:.2%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
