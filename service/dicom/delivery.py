"""Durable outbox of result objects and their delivery to the PACS by STOW-RS.

Files first, network second: a result is stored completely in the outbox (service/dicom/outbox.py) before it is
pending. Every process runs a worker, but only the one whose outbox holds the folder's delivery lock delivers (the
others try to take it over every POLL_S, so a process that stops or dies is replaced within a second or so). That
worker claims due results from the outbox's index, renews an item's claim just before sending it, POSTs it to
`OCT_PACS_STOW_URL` (basic auth from OCT_PACS_USERNAME/PASSWORD, or a bearer OCT_PACS_TOKEN) and records each attempt
for the revision and claim it sent; on start-up it picks up everything still pending, so a restart loses nothing.

Retry policy: a PACS that is unreachable, times out, or answers 408/429/5xx is retried forever, with exponential
backoff OCT_PACS_RETRY_BACKOFF_S × 2^(attempt−1) capped at MAX_BACKOFF_S; the results wait on disk. A PACS that
refuses the objects (other 4xx, or a STOW response listing failed instances) is retried OCT_PACS_RETRY_MAX times
the same way, then marked `failed` (still on disk and downloadable) because resending will not change its mind.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass

import httpx

from service.dicom.outbox import Due, Outbox
from service.dicom.schemas import Delivery
from service.multipart import build_related

log = logging.getLogger("oct.pacs")

MAX_BACKOFF_S = 300.0
_TRANSIENT_STATUS = {408, 425, 429}
CLAIM_BATCH = 32
# How often a worker that does not deliver tries to take over, and how often the one that delivers looks for results
# that other processes stored (their notify() wakes only their own worker).
POLL_S = 1.0


@dataclass(frozen=True)
class PacsTarget:
    url: str
    username: str = ""
    password: str = ""
    token: str = ""
    timeout_s: float = 30.0
    retry_max: int = 8
    backoff_s: float = 2.0

    @classmethod
    def from_settings(cls, s: object) -> PacsTarget:
        return cls(url=s.pacs_stow_url, username=s.pacs_username, password=s.pacs_password, token=s.pacs_token,
                   timeout_s=s.pacs_timeout_s, retry_max=s.pacs_retry_max, backoff_s=s.pacs_retry_backoff_s)

    def client(self) -> httpx.AsyncClient:
        headers = {"Accept": "application/dicom+json"}
        auth = None
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        elif self.username:
            auth = httpx.BasicAuth(self.username, self.password)
        return httpx.AsyncClient(timeout=self.timeout_s, headers=headers, auth=auth)

    def backoff(self, attempts: int) -> float:
        return min(MAX_BACKOFF_S, self.backoff_s * 2 ** max(0, attempts - 1))


class DeliveryWorker:
    """One background task: delivers due results, sleeps until the next one is due or `notify()` wakes it."""

    def __init__(self, outbox: Outbox, target: PacsTarget) -> None:
        self.outbox = outbox
        self.target = target
        self._wake = asyncio.Event()
        self._stopping = False

    def notify(self) -> None:
        self._wake.set()

    async def stop(self) -> None:
        self._stopping = True
        self._wake.set()

    @property
    def lease_s(self) -> float:
        """How long a claim lasts: it outlives one attempt, renewed before each send."""
        return self.target.timeout_s * 2 + 10

    async def run(self) -> None:
        async with self.target.client() as client:
            try:
                while not self._stopping:
                    wait_s = POLL_S
                    try:
                        if self.outbox.owns or await asyncio.to_thread(self.outbox.try_own):
                            wait_s = await self._deliver_due(client)
                    except Exception as e:  # never let the loop die: a broken record must not stop the others
                        log.error("delivery loop error: %s: %s", type(e).__name__, e)
                        wait_s = 5.0
                    self._wake.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), timeout=wait_s)
            finally:
                # Hand delivery over now rather than at process exit: another process's worker takes it at its next try.
                await asyncio.to_thread(self.outbox.disown)

    async def _deliver_due(self, client: httpx.AsyncClient) -> float:
        """Deliver every due result; return how long to sleep before the next one is due."""
        while not self._stopping:
            batch = await asyncio.to_thread(self.outbox.claim_due, time.time(), self.lease_s, CLAIM_BATCH)
            for due in batch:
                if self._stopping:
                    # Give the claim back: the next start (or another process) delivers it without waiting.
                    await asyncio.to_thread(self.outbox.update_delivery, due.uid, due.delivery, due.revision, due.claim)
                    continue
                await self.deliver(client, due)
            if len(batch) < CLAIM_BATCH:
                break
        next_at = await asyncio.to_thread(self.outbox.next_due)
        return POLL_S if next_at is None else min(POLL_S, max(0.0, next_at - time.time()))

    async def deliver(self, client: httpx.AsyncClient, due: Due) -> Delivery | None:
        """Send one claimed result and record the outcome; None when the claim was no longer this worker's."""
        uid = due.uid
        # A batch is sent one result after another: the claim of this one is renewed now, so it cannot run out
        # while the results before it were on the wire, and one that is no longer ours is not sent.
        if not await asyncio.to_thread(self.outbox.renew, due, time.time(), self.lease_s):
            await self._log_void_claim(due, "not sent")
            return None
        record = await asyncio.to_thread(self.outbox.get, uid)
        bodies = []
        for inst in record.instances if record is not None else []:
            path = self.outbox.file(uid, f"{inst.kind}.dcm")
            if path is not None:
                bodies.append(await asyncio.to_thread(path.read_bytes))
        body, content_type = build_related(bodies)
        d = due.delivery.model_copy()
        d.attempts += 1
        permanent, error = False, None
        try:
            resp = await client.post(self.target.url, content=body, headers={"Content-Type": content_type})
            error = _stow_error(resp)
            permanent = error is not None and resp.status_code < 500 and resp.status_code not in _TRANSIENT_STATUS
        except httpx.HTTPError as e:
            error = f"{type(e).__name__}: {e}"[:300]
        now = time.time()
        if error is None:
            d.status, d.last_error, d.next_attempt_at, d.delivered_at = "delivered", None, None, now
            log.info("delivered results of %s to the PACS (attempt %d)", uid, d.attempts)
        elif permanent and d.attempts >= self.target.retry_max:
            d.status, d.last_error, d.next_attempt_at = "failed", error, None
            log.error("PACS refused results of %s %d times, giving up: %s", uid, d.attempts, error)
        else:
            d.last_error, d.next_attempt_at = error, now + self.target.backoff(d.attempts)
            log.warning("delivery of %s failed (attempt %d, next in %.0f s): %s", uid, d.attempts,
                        d.next_attempt_at - now, error)
        # Only for the revision and claim that were sent: a result re-sent meanwhile stays pending with its new bytes.
        if not await asyncio.to_thread(self.outbox.update_delivery, uid, d, due.revision, due.claim):
            await self._log_void_claim(due, "sent, outcome not recorded")
        return d

    async def _log_void_claim(self, due: Due, what: str) -> None:
        reason = await asyncio.to_thread(self.outbox.why_unclaimed, due)
        # A result stored again meanwhile is routine (its new revision stays pending); anything else is not.
        log.log(logging.INFO if reason == "replaced" else logging.WARNING,
                "results of %s %s: the claim is void (%s)", due.uid, what, reason)


def _stow_error(resp: httpx.Response) -> str | None:
    """None when the PACS stored every instance; otherwise why not."""
    if resp.status_code == 200:
        return None
    if resp.status_code == 202:
        try:
            failed = resp.json().get("00081198", {}).get("Value", [])
        except (ValueError, AttributeError):
            failed = []
        if not failed:
            return None  # accepted with warnings only (e.g. coerced attributes): stored
        reasons = [str(f.get("00081197", {}).get("Value", ["?"])[0]) for f in failed]
        return f"PACS stored only some instances; failure reasons {reasons}"
    # Status only: a PACS's error text may quote the objects' patient attributes, and this string is logged and
    # served in /dicomweb/results.
    return f"HTTP {resp.status_code} {resp.reason_phrase}".strip()

