"""python -m deployer.gateway --port P [--host H] [--routes-from redis://...] [--control-socket PATH]
[--sample-rate 0.01] [--read-timeout-s 30] [--max-body-bytes N] [--request-deadline-s 30]
[--body-buffer-bytes N] [--max-connections 4096]

The control plane: adopts the data plane (which serves every request) listening on the control socket,
or starts one if none does; follows the routing table in Redis and hands each new one to it, announces
this gateway once the table is in use, and writes the data plane's traffic samples to a Redis stream.
SIGTERM or SIGINT stop it and its data plane; if it dies otherwise (SIGKILL), the data plane goes on
serving the last table until the next control plane takes it over. Exits 1 if the data plane's
connection ends (the data plane died), 3 if another control plane holds the data plane.

The limits that protect the gateway from its clients (body size, request deadline, bodies held in
memory, connections) can also be set by environment variables, GATEWAY_*: see --help."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from deployer.gateway.dataplane import (
    DataPlane,
    DataPlaneBusy,
    DataPlaneFailed,
    DataPlaneMissing,
    control_socket_path,
)
from deployer.gateway.routing import RoutesWatcher, RoutingTable
from deployer.gateway.sampling import Sampler
from monitoring.samples import SAMPLES_STREAM

log = logging.getLogger("deployer.gateway")

# The limits the data plane enforces on its clients: (flag, environment variable, default, type, help).
LIMITS: list[tuple[str, str, float, type, str]] = [
    ("--max-body-bytes", "GATEWAY_MAX_BODY_BYTES", 64 << 20, int,
     "a request with a longer body gets a 413 before its body is read"),
    ("--request-deadline-s", "GATEWAY_REQUEST_DEADLINE_S", 30, float,
     "a request whose head and body have not all arrived this long after they started gets a 408"),
    ("--body-buffer-bytes", "GATEWAY_BODY_BUFFER_BYTES", 512 << 20, int,
     "request bodies held in memory at once, all connections together; a large body waits for room "
     "(until its deadline, then a 503)"),
    ("--max-connections", "GATEWAY_MAX_CONNECTIONS", 4096, int,
     "client connections served at once; past it a connection gets a 503"),
]


def _limit_default(parser: argparse.ArgumentParser, env: str, default: float, kind: type) -> float:
    """The environment's value for a limit (strictly parsed; main checks it is positive), else the default."""
    raw = os.environ.get(env)
    if raw is None:
        return default
    try:
        return kind(raw)
    except ValueError:
        parser.error(f"${env} must be a {'number' if kind is float else 'whole number'}, not {raw!r}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deployer.gateway", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--routes-from", default=os.environ.get("REDIS_URL", ""),
                        help="Redis URL holding the routing table (default: $REDIS_URL)")
    parser.add_argument("--routes-poll-s", type=float, default=1.0)
    parser.add_argument("--control-socket", type=Path,
                        help="the data plane's control socket: a data plane listening there is adopted, else one is "
                             "started (default: $PLATFORM_STATE_DIR/gateway-<host>-<port>.sock)")
    parser.add_argument("--sample-rate", type=float, default=0.01,
                        help="fraction of inference requests sampled, for models whose route has no capture of its own")
    parser.add_argument("--sample-stream", default=SAMPLES_STREAM)
    parser.add_argument("--sample-maxlen", type=int, default=100_000)
    parser.add_argument("--node-down-s", type=float, default=5.0,
                        help="a node that refused a connection is skipped this long (default 5)")
    parser.add_argument("--read-timeout-s", type=float, default=30.0,
                        help="a request whose upstream response has not completed this long after the gateway "
                             "took it gets a 504 (default 30)")
    for flag, env, default, kind, text in LIMITS:
        parser.add_argument(flag, type=kind, default=_limit_default(parser, env, default, kind),
                            help=f"{text} (default: ${env}, else {default})")
    args = parser.parse_args(argv)
    if not args.routes_from:
        parser.error("--routes-from (or REDIS_URL) is required")
    if not 0 <= args.sample_rate <= 1:
        parser.error("--sample-rate is a fraction 0..1")
    for flag in ("read_timeout_s", "node_down_s", "routes_poll_s", "max_body_bytes", "request_deadline_s",
                 "body_buffer_bytes", "max_connections"):
        if getattr(args, flag) <= 0:
            parser.error(f"--{flag.replace('_', '-')} must be positive")
    if args.body_buffer_bytes < args.max_body_bytes:
        parser.error("--body-buffer-bytes must be at least --max-body-bytes (the largest body must fit)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s gateway %(levelname)s %(message)s")

    # Handled from the start: a stop that came while the data plane was being started still stops it.
    stopping = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.set())
    # Always: requests mirrored to a shadow arm come back as samples whatever --sample-rate says.
    sampler = Sampler(args.routes_from, args.sample_stream, args.sample_maxlen)
    sampler.start()
    socket_path = args.control_socket or control_socket_path(args.host, args.port)
    try:
        dataplane = DataPlane.attach(socket_path, [
            "--listen", f"{args.host}:{args.port}",
            "--read-timeout-ms", str(round(args.read_timeout_s * 1000)),
            "--node-down-ms", str(round(args.node_down_s * 1000)),
            "--sample-rate", repr(args.sample_rate),
            "--max-body-bytes", str(args.max_body_bytes),
            "--request-deadline-ms", str(max(1, round(args.request_deadline_s * 1000))),
            "--body-buffer-bytes", str(args.body_buffer_bytes),
            "--max-connections", str(args.max_connections)], on_sample=sampler.offer)
    except DataPlaneMissing as exc:
        log.error("%s", exc)
        return 2
    except DataPlaneBusy as exc:
        log.error("the data plane on %s has a control plane already (%s); leaving it alone", socket_path, exc)
        return 3
    except DataPlaneFailed as exc:
        log.error("%s", exc)
        return 1
    # An adopted data plane keeps the flags it was started with; a clean stop and start applies new ones.
    log.info("%s the data plane (pid %d) serving %s:%d, control socket %s",
             "started" if dataplane.proc is not None else "adopted", dataplane.pid, args.host, args.port, socket_path)

    def apply(version: int, table: RoutingTable) -> bool:
        if dataplane.apply(version, table):
            return True
        log.error("the data plane did not confirm routing table version %d; sending it again", version)
        return False

    # The deployer reads every announced gateway's /metrics and waits for all to have a table in use
    # before it unloads a model the table no longer routes to.
    watcher = RoutesWatcher(args.routes_from, apply, poll_s=args.routes_poll_s,
                            announce_as=f"{args.host}:{args.port}", metrics_url=f"http://{args.host}:{args.port}/metrics")
    watcher.start()

    while not stopping.is_set() and not dataplane.closed.is_set():
        stopping.wait(0.5)
    watcher.stopping.set()
    watcher.join(2)  # it withdraws this gateway's announcement
    code = dataplane.stop() if stopping.is_set() else dataplane.exit_status()
    sampler.stop()
    sampler.join(2)
    if not stopping.is_set():
        log.error("the data plane's control connection ended (it exited with status %s)", code)
        return code or 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
