"""Replay: recorded stable requests sent again, off every client's path, to the stable version and to a
candidate, so the candidate is judged on real requests without a user seeing its answers.

The gateway's samples (Redis stream `gateway:samples`, bodies included) are the record. Each replayed
request goes to one node of each arm, in alternating order (neither version always gets the warmer turn),
back to back on kept-alive connections, at most `rate_per_s` requests a second and within a time budget:
its two answers, statuses and latencies make one `monitoring.shadow.Pair`. Both are timed the same way by
the same client at the same moment, so the latency comparison is fair, and stable's answer is today's, not
the recorded one. Replayed requests go straight to the Triton nodes, never through a gateway: they are never
counted as served. Triton counts them, so the deployer keeps its own count per Triton model (REPLAYED_KEY),
which the analysis takes off Triton's before judging live traffic.
"""

from __future__ import annotations

import http.client
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from monitoring import kserve
from monitoring.samples import SAMPLES_STREAM
from monitoring.shadow import Pair

log = logging.getLogger("deployer.shadow")

REPLAYED_KEY = "deployer:replayed"  # hash: "<triton model>:requests" / ":errors" -> replayed so far
KEPT_HEADERS = (b"content-type", b"inference-header-content-length")


@dataclass(frozen=True)
class Recorded:
    body: bytes
    headers: dict[str, str]  # those of KEPT_HEADERS the request had


@dataclass(frozen=True)
class ReplayArm:
    triton_model: str
    nodes: list[str]  # "host:port"


def _headers(head: bytes) -> dict[str, str]:
    out = {}
    for line in head.split(b"\r\n")[1:]:
        name, sep, value = line.partition(b":")
        if sep and name.strip().lower() in KEPT_HEADERS:
            out[name.strip().decode("latin-1")] = value.strip().decode("latin-1")
    return out


def recorded_requests(redis: Any, model: str, version: str, limit: int, max_age_s: float = 3600.0,
                      stream: str = SAMPLES_STREAM, scan: int = 5000) -> list[Recorded]:
    """Up to `limit` of the newest inference requests that `version` of `model` answered with 200, sampled
    in the last `max_age_s` (newest first; the newest `scan` samples are looked at)."""
    oldest_ms = int((time.time() - max_age_s) * 1000)
    found: list[Recorded] = []
    for _id, fields in redis.xrevrange(stream, min=oldest_ms, count=scan):
        f = {k.decode() if isinstance(k, bytes) else k: v for k, v in fields.items()}
        if f.get("model", b"").decode() != model or f.get("version", b"").decode() != version \
                or f.get("status") != b"200" or not f.get("request") \
                or not kserve.is_inference(f.get("request_head", b"")):
            continue
        found.append(Recorded(f["request"], _headers(f.get("request_head", b""))))
        if len(found) >= limit:
            break
    return found


def mirrored_pairs(redis: Any, model: str, shadow_version: str, limit: int, max_age_s: float = 3600.0,
                   stream: str = SAMPLES_STREAM, scan: int = 5000) -> list[Pair]:
    """Up to `limit` of the newest requests the gateway mirrored to `shadow_version` of `model` (its shadow
    arm), each with stable's answer and the shadow arm's: the pairs of a live shadow."""
    oldest_ms = int((time.time() - max_age_s) * 1000)
    found: list[Pair] = []
    for _id, fields in redis.xrevrange(stream, min=oldest_ms, count=scan):
        f = {k.decode() if isinstance(k, bytes) else k: v for k, v in fields.items()}
        if f.get("model", b"").decode() != model or f.get("shadow_version", b"").decode() != shadow_version:
            continue
        found.append(Pair(int(f["status"]), float(f["latency_ms"]), f.get("response", b""),
                          int(f["shadow_status"]), float(f["shadow_latency_ms"]), f.get("shadow_response", b"")))
        if len(found) >= limit:
            break
    return found


class _Client:
    """Kept-alive connections to the nodes of one arm, round robin."""

    def __init__(self, arm: ReplayArm, timeout_s: float) -> None:
        self.arm, self.timeout_s, self.next = arm, timeout_s, 0
        self.conns: dict[str, http.client.HTTPConnection] = {}

    def send(self, r: Recorded) -> tuple[int, float, bytes]:
        node = self.arm.nodes[self.next % len(self.arm.nodes)]
        self.next += 1
        path = f"/v2/models/{self.arm.triton_model}/infer"
        headers = {"Content-Type": "application/json", **r.headers}
        for attempt in (0, 1):  # a kept-alive connection the node closed meanwhile: once more on a new one
            conn = self.conns.get(node)
            if conn is None:
                host, port = node.rsplit(":", 1)
                conn = self.conns[node] = http.client.HTTPConnection(host, int(port), timeout=self.timeout_s)
            start = time.perf_counter()
            try:
                conn.request("POST", path, body=r.body, headers=headers)
                resp = conn.getresponse()
                body = resp.read()
                return resp.status, (time.perf_counter() - start) * 1000, body
            except (OSError, http.client.HTTPException) as exc:
                conn.close()
                del self.conns[node]
                if attempt:
                    return 599, (time.perf_counter() - start) * 1000, str(exc).encode()
        raise AssertionError("unreachable")

    def close(self) -> None:
        for conn in self.conns.values():
            conn.close()


def replay(recorded: Iterable[Recorded], stable: ReplayArm, candidate: ReplayArm, *, rate_per_s: float,
           budget_s: float, timeout_s: float = 5.0) -> list[Pair]:
    """Each recorded request to both arms (alternating which goes first), at most `rate_per_s` a second,
    stopping when `budget_s` is spent."""
    s, c = _Client(stable, timeout_s), _Client(candidate, timeout_s)
    pairs: list[Pair] = []
    began = time.monotonic()
    try:
        for i, r in enumerate(recorded):
            due = began + i / rate_per_s
            if due - began >= budget_s:
                break
            time.sleep(max(0.0, due - time.monotonic()))
            if i % 2 == 0:
                st, ca = s.send(r), c.send(r)
            else:
                ca, st = c.send(r), s.send(r)
            pairs.append(Pair(st[0], st[1], st[2], ca[0], ca[1], ca[2]))
            if time.monotonic() - began >= budget_s:
                break
    finally:
        s.close()
        c.close()
    return pairs


def count_replayed(redis: Any, pairs: list[Pair], stable: ReplayArm, candidate: ReplayArm) -> None:
    """Adds the replayed requests (and failures) to each Triton model's count, for the analysis to take off."""
    pipe = redis.pipeline(transaction=False)
    for arm, errors in ((stable, sum(1 for p in pairs if p.stable_status != 200)),
                        (candidate, sum(1 for p in pairs if p.candidate_status != 200))):
        pipe.hincrby(REPLAYED_KEY, f"{arm.triton_model}:requests", len(pairs))
        pipe.hincrby(REPLAYED_KEY, f"{arm.triton_model}:errors", errors)
    pipe.execute()


def replayed_so_far(redis: Any, triton_model: str) -> tuple[int, int]:
    """(requests, errors) replayed to `triton_model` so far."""
    req, err = redis.hmget(REPLAYED_KEY, f"{triton_model}:requests", f"{triton_model}:errors")
    return int(req or 0), int(err or 0)
