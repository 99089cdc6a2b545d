"""The gateway's routing table: what the deployer publishes into Redis and the gateway applies.

    {"<logical model>": {"stable": {"version": "3", "triton_model": "digits_v3", "nodes": ["127.0.0.1:8000"]},
                         "canary": {"version": "4", "triton_model": "digits_v4", "nodes": [...], "weight": 10}}}

`canary` may be absent or null; so may `shadow` (an arm with a "share") and `capture`, a model's own traffic
sampling, {"fraction": 0.05, "floor_per_s": 20} (see Capture). The table lives under ROUTES_KEY as JSON;
ROUTES_VERSION_KEY is a counter bumped with every publication (in the same transaction) and ROUTES_CHANNEL
carries a notice, so a gateway picks a change up at once and, should it miss the notice, on its next cheap
poll of the counter.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("deployer.gateway")

ROUTES_KEY = "gateway:routes"
ROUTES_VERSION_KEY = "gateway:routes:version"
ROUTES_CHANNEL = "gateway:routes:changed"
# Each gateway announces itself here (id -> {"metrics": url, "routes_version": n, "seen": unix time}) so the
# deployer knows whose metrics to read and when every gateway has applied a table.
INSTANCES_KEY = "gateway:instances"


@dataclass(frozen=True)
class Arm:
    version: str
    triton_model: str
    nodes: tuple[str, ...]


# A guard against a slip (a floor of millions): the control plane writes at most about 1,000 samples a second to
# Redis anyway (batches of up to 100 every 0.1 s), dropping and counting what does not fit.
MAX_CAPTURE_FLOOR_PER_S = 10_000


@dataclass(frozen=True)
class Capture:
    """A model's own traffic sampling, in place of the gateway's --sample-rate: every inference request of the
    model is sampled while fewer than `floor_per_s` of its requests have been sampled in the current second;
    past that, each with probability `fraction`."""
    fraction: float  # 0..1
    floor_per_s: int  # 0..MAX_CAPTURE_FLOOR_PER_S


@dataclass(frozen=True)
class ModelRoute:
    stable: Arm
    canary: Arm | None = None
    canary_weight: int = 0  # percent of requests sent to the canary, 0..100
    # Mirrored, after stable answered, to a candidate whose answers no client sees (the gateway's shadow arm).
    shadow: Arm | None = None
    shadow_share: int = 0  # percent of stable's requests mirrored, 0..100
    capture: Capture | None = None  # None: sampled at the gateway's --sample-rate


RoutingTable = dict[str, ModelRoute]


def _has_control(text: str) -> bool:
    return any(ord(c) < 32 or ord(c) == 127 for c in text)


def _node(value: Any) -> str:
    if not isinstance(value, str) or _has_control(value):
        raise ValueError(f"a node is 'host:port', not {value!r}")
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"a node is 'host:port', not {value!r}")
    return value


def _arm(model: str, role: str, data: Any) -> Arm:
    if not isinstance(data, Mapping):
        raise ValueError(f"{model}.{role} must be an object")
    version, triton_model, nodes = data.get("version"), data.get("triton_model"), data.get("nodes")
    if not isinstance(version, str | int) or str(version) == "" or _has_control(str(version)):
        raise ValueError(f"{model}.{role}.version must be a non-empty string")
    if not isinstance(triton_model, str) or not triton_model or "/" in triton_model or _has_control(triton_model):
        raise ValueError(f"{model}.{role}.triton_model must be a Triton model name")
    if not isinstance(nodes, list | tuple) or not nodes:
        raise ValueError(f"{model}.{role}.nodes must be a non-empty list of 'host:port'")
    return Arm(str(version), triton_model, tuple(_node(n) for n in nodes))


def _percent(what: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 100:
        raise ValueError(f"{what} must be an integer 0..100")
    return value


def _capture(model: str, data: Any) -> Capture:
    if not isinstance(data, Mapping):
        raise ValueError(f"{model}.capture must be an object with fraction and floor_per_s")
    unknown = sorted(str(k) for k in data if k not in ("fraction", "floor_per_s"))
    if unknown:
        raise ValueError(f"{model}.capture takes fraction and floor_per_s only, not {', '.join(unknown)}")
    fraction, floor = data.get("fraction"), data.get("floor_per_s")
    # NaN fails the range check; bool is an int to Python but not a number here.
    if isinstance(fraction, bool) or not isinstance(fraction, int | float) or not 0 <= fraction <= 1:
        raise ValueError(f"{model}.capture.fraction must be a number 0..1, not {fraction!r}")
    if isinstance(floor, bool) or not isinstance(floor, int) or not 0 <= floor <= MAX_CAPTURE_FLOOR_PER_S:
        raise ValueError(f"{model}.capture.floor_per_s must be a whole number of requests a second, 0 to at most "
                         f"{MAX_CAPTURE_FLOOR_PER_S}, not {floor!r}")
    return Capture(float(fraction), floor)


def parse_table(data: Any) -> RoutingTable:
    """Validate a decoded table; raises ValueError naming the first problem."""
    if not isinstance(data, Mapping):
        raise ValueError("the routing table must be an object keyed by model name")
    table: RoutingTable = {}
    for name, entry in data.items():
        if not isinstance(name, str) or not name or "/" in name or _has_control(name):
            raise ValueError(f"bad model name {name!r}")
        if not isinstance(entry, Mapping):
            raise ValueError(f"{name} must be an object")
        stable = _arm(name, "stable", entry.get("stable"))
        canary_data = entry.get("canary")
        canary, weight = None, 0
        if canary_data is not None:
            canary = _arm(name, "canary", canary_data)
            weight = _percent(f"{name}.canary.weight", canary_data.get("weight", 0))
        shadow_data = entry.get("shadow")
        shadow, share = None, 0
        if shadow_data is not None:
            shadow = _arm(name, "shadow", shadow_data)
            share = _percent(f"{name}.shadow.share", shadow_data.get("share", 0))
        capture_data = entry.get("capture")
        capture = None if capture_data is None else _capture(name, capture_data)
        table[name] = ModelRoute(stable, canary, weight, shadow, share, capture)
    return table


def table_to_dict(table: RoutingTable) -> dict[str, Any]:
    def arm(a: Arm) -> dict[str, Any]:
        return {"version": a.version, "triton_model": a.triton_model, "nodes": list(a.nodes)}

    def route(r: ModelRoute) -> dict[str, Any]:
        out = {"stable": arm(r.stable),
               "canary": None if r.canary is None else {**arm(r.canary), "weight": r.canary_weight}}
        if r.shadow is not None:  # only then: a table without one keeps the shape it always had
            out["shadow"] = {**arm(r.shadow), "share": r.shadow_share}
        if r.capture is not None:  # likewise
            out["capture"] = {"fraction": r.capture.fraction, "floor_per_s": r.capture.floor_per_s}
        return out

    return {name: route(r) for name, r in table.items()}


def publish_routes(client: Any, table: Mapping[str, Any] | RoutingTable) -> int:
    """Store a table (validated first) for every gateway; returns its version number. `client` is a
    redis.Redis. The JSON and the counter change in one transaction; the notice follows."""
    as_dict = table_to_dict(parse_table(table)) if not _is_typed(table) else table_to_dict(table)  # type: ignore[arg-type]
    pipe = client.pipeline(transaction=True)
    pipe.set(ROUTES_KEY, json.dumps(as_dict, sort_keys=True))
    pipe.incr(ROUTES_VERSION_KEY)
    version = int(pipe.execute()[1])
    client.publish(ROUTES_CHANNEL, str(version))
    return version


def _is_typed(table: Mapping[str, Any]) -> bool:
    return all(isinstance(v, ModelRoute) for v in table.values()) and bool(table)


def load_routes(client: Any) -> tuple[int, RoutingTable | None]:
    raw, version = client.mget(ROUTES_KEY, ROUTES_VERSION_KEY)
    if raw is None:
        return int(version or 0), None
    return int(version or 0), parse_table(json.loads(raw))


class RoutesWatcher(threading.Thread):
    """Follows the table in Redis from a thread: a pub/sub notice wakes it at once; otherwise it polls the
    version counter every `poll_s`. A table that fails validation is logged and ignored (the last good
    one stays). `on_table` returns whether the table is in use; the announced version is the last such."""

    def __init__(self, redis_url: str, on_table: Callable[[int, RoutingTable], bool], poll_s: float = 1.0,
                 announce_as: str = "", metrics_url: str = "") -> None:
        super().__init__(name="routes-watcher", daemon=True)
        self.redis_url, self.on_table, self.poll_s = redis_url, on_table, poll_s
        self.announce_as, self.metrics_url = announce_as, metrics_url
        self.stopping = threading.Event()
        self.seen: int | None = None
        self.applied = 0

    def run(self) -> None:
        import redis

        while not self.stopping.is_set():
            try:
                client = redis.Redis.from_url(self.redis_url, socket_timeout=5, socket_connect_timeout=5)
                pubsub = client.pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(ROUTES_CHANNEL)
                while not self.stopping.is_set():
                    self._check(client)
                    self._announce(client)
                    pubsub.get_message(timeout=self.poll_s)
                if self.announce_as:
                    client.hdel(INSTANCES_KEY, self.announce_as)
            except (OSError, redis.RedisError) as exc:
                log.warning("routing table: redis unavailable (%s); retrying", exc)
                self.stopping.wait(min(self.poll_s, 1.0))

    def _announce(self, client: Any) -> None:
        if self.announce_as:
            client.hset(INSTANCES_KEY, self.announce_as, json.dumps(
                {"metrics": self.metrics_url, "routes_version": self.applied, "seen": time.time()}))

    def _check(self, client: Any) -> None:
        raw_version = client.get(ROUTES_VERSION_KEY)
        version = int(raw_version or 0)
        if version == self.seen:
            return
        try:
            version, table = load_routes(client)
        except ValueError as exc:
            log.error("routing table version %s rejected: %s", version, exc)
            self.seen = version
            return
        if table is None:
            self.seen = version
        elif self.on_table(version, table):
            self.seen = self.applied = version
        # else: not in use yet (logged by on_table); tried again on the next poll
