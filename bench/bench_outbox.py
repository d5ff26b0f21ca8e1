"""Outbox benchmark: store N results, then list and deliver them in rounds; prints a table, asserts nothing.

    python bench/bench_outbox.py --results 10000 --round 1000

Each row is one round of deliveries to a local STOW-RS endpoint that answers 200 at once (no PACS cost), with the
time of a /dicomweb/results listing (newest 100), of one claim of due results and of a round's deliveries (each
renews its claim, then records its outcome: two index writes), next to how many results were already delivered. With
the sqlite index none of them grows with that number; before it, every wake and every listing re-read every
record.json.
"""

from __future__ import annotations

import argparse
import asyncio
import http.server
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from service.dicom.delivery import DeliveryWorker, PacsTarget  # noqa: E402
from service.dicom.outbox import Outbox  # noqa: E402
from service.dicom.schemas import Delivery, ResultInstance, ResultRecord, VolumeScoreResult  # noqa: E402
from service.schemas import ModelRef, TimingMs  # noqa: E402

SOP = "1.2.840.10008.5.1.4.1.1.88.34"
BODY = b"\0" * 2048  # stands in for an SR (the PACS stub does not parse it)


class _Ok(http.server.BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.send_header("Content-Type", "application/dicom+json")
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args: object) -> None:
        pass


def record(i: int) -> ResultRecord:
    uid = f"1.2.826.0.1.3680043.10.{i}"
    result = VolumeScoreResult(
        request_id="b", model=ModelRef(name="m", version=1), study_instance_uid="1.2.3", series_instance_uid="1.2.4",
        sop_instance_uid=uid, sop_class_uid=SOP, number_of_frames=1, score=i / 10, scores={"a": i / 10},
        threshold=0.5, is_anomalous=False, percentile=50.0, max_frame=0, frames=[],
        timing_ms=TimingMs(queue=0, inference=0, total=0))
    return ResultRecord(source_sop_instance_uid=uid, study_instance_uid="1.2.3", created_at=time.time(), result=result,
                        instances=[ResultInstance(kind="sr", sop_class_uid=SOP, sop_instance_uid=uid + ".1",
                                                  series_instance_uid="1.2.5", url="u")],
                        delivery=Delivery(status="pending"))


def ms(f, *args):
    t = time.perf_counter()
    out = f(*args)
    return (time.perf_counter() - t) * 1e3, out


async def deliver_round(worker: DeliveryWorker, outbox: Outbox, n: int) -> tuple[int, float]:
    done = 0
    t = time.perf_counter()
    async with worker.target.client() as client:
        while done < n:
            batch = outbox.claim_due(time.time(), 60, min(32, n - done))
            if not batch:
                break
            for due in batch:
                await worker.deliver(client, due)
            done += len(batch)
    return done, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", type=int, default=10_000)
    ap.add_argument("--round", type=int, default=1_000)
    ap.add_argument("--dir", type=Path, default=None, help="outbox folder (default: a temporary one)")
    args = ap.parse_args()
    pacs = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Ok)
    threading.Thread(target=pacs.serve_forever, daemon=True).start()
    with tempfile.TemporaryDirectory() as tmp:
        outbox = Outbox(args.dir or Path(tmp))
        t = time.perf_counter()
        for i in range(args.results):
            outbox.put(record(i), {"sr.dcm": BODY})
        put_s = time.perf_counter() - t
        print(f"stored {args.results} results in {put_s:.1f} s ({args.results / put_s:.0f}/s, fsynced files + index)")
        worker = DeliveryWorker(outbox, PacsTarget(url=f"http://127.0.0.1:{pacs.server_address[1]}/studies"))
        print("| delivered before | list newest 100 (ms) | claim 32 due (ms) | next_due (ms) "
              f"| deliver {args.round} (s) | deliveries/s |")
        print("|---|---|---|---|---|---|")
        delivered = 0
        while delivered < args.results:
            list_ms, _ = ms(outbox.summaries, 100)
            claim_ms, _ = ms(outbox.claim_due, time.time(), 0.0, 32)  # lease 0: claim and release at once
            next_ms, _ = ms(outbox.next_due)
            n, secs = asyncio.run(deliver_round(worker, outbox, args.round))
            print(f"| {delivered:,} | {list_ms:.2f} | {claim_ms:.2f} | {next_ms:.2f} | {secs:.2f} | {n / secs:.0f} |")
            delivered += n
            if not n:
                break
        print(f"outbox: {outbox.counts()}")
        outbox.close()
    pacs.shutdown()


if __name__ == "__main__":
    main()
