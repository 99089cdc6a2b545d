"""python -m deployer.gateway --port P [--host H] [--routes-from redis://...] [--sample-rate 0.01]
[--read-timeout-s 30]"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal

from deployer.gateway.routing import RoutesWatcher
from deployer.gateway.sampling import SAMPLES_STREAM, Sampler
from deployer.gateway.server import Gateway, Settings


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m deployer.gateway", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--routes-from", default=os.environ.get("REDIS_URL", ""),
                        help="Redis URL holding the routing table (default: $REDIS_URL)")
    parser.add_argument("--routes-poll-s", type=float, default=1.0)
    parser.add_argument("--sample-rate", type=float, default=0.01, help="fraction of inference requests sampled")
    parser.add_argument("--sample-stream", default=SAMPLES_STREAM)
    parser.add_argument("--sample-maxlen", type=int, default=100_000)
    parser.add_argument("--node-down-s", type=float, default=5.0)
    parser.add_argument("--read-timeout-s", type=float, default=30.0,
                        help="a request whose upstream response has not completed this long after the gateway "
                             "took it gets a 504 (default 30)")
    parser.add_argument("--no-uvloop", action="store_true")
    args = parser.parse_args(argv)
    if not args.routes_from:
        parser.error("--routes-from (or REDIS_URL) is required")
    if not 0 <= args.sample_rate <= 1:
        parser.error("--sample-rate is a fraction 0..1")
    if args.read_timeout_s <= 0:
        parser.error("--read-timeout-s must be positive")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s gateway %(levelname)s %(message)s")
    if not args.no_uvloop:
        try:
            import uvloop

            asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
        except ImportError:
            logging.getLogger("deployer.gateway").info("uvloop not installed: the standard event loop serves")
    asyncio.run(_serve(args))


async def _serve(args: argparse.Namespace) -> None:
    gw = Gateway(Settings(node_down_s=args.node_down_s, sample_rate=args.sample_rate,
                          read_timeout_s=args.read_timeout_s))
    if args.sample_rate > 0:
        gw.sampler = Sampler(args.routes_from, args.sample_stream, args.sample_maxlen,
                             on_drop=gw.metrics.samples_dropped.inc)
        gw.sampler.start()
    server = await gw.serve(args.host, args.port)
    # The deployer reads every announced gateway's /metrics and waits for all to apply a table before
    # it unloads a model the table no longer routes to.
    watcher = RoutesWatcher(args.routes_from, gw.apply_threadsafe, poll_s=args.routes_poll_s,
                            announce_as=f"{args.host}:{args.port}", metrics_url=f"http://{args.host}:{args.port}/metrics")
    watcher.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    logging.getLogger("deployer.gateway").info("listening on %s:%d", args.host, args.port)
    await stop.wait()
    server.close()
    watcher.stopping.set()
    if gw.sampler is not None:
        gw.sampler.stop()
        gw.sampler.join(2)


if __name__ == "__main__":
    main()
