"""Samples of inference traffic (request and response bodies) into a Redis stream, for monitoring.

The data plane hands samples over through bounded queues, its own and this one, and what does not fit is
dropped (and counted), so neither Redis latency nor an outage ever reaches a request; here a thread
batches them into pipelined XADDs with an approximate MAXLEN. The stream and its fields are the monitors'
contract (monitoring/samples.py).
"""

from __future__ import annotations

import logging
import queue
import threading
import time

from monitoring.samples import SAMPLES_STREAM

log = logging.getLogger("deployer.gateway")


class Sampler(threading.Thread):
    def __init__(self, redis_url: str, stream: str = SAMPLES_STREAM, maxlen: int = 100_000,
                 queue_size: int = 1000) -> None:
        super().__init__(name="sampler", daemon=True)
        self.redis_url, self.stream, self.maxlen = redis_url, stream, maxlen
        self.queue: queue.Queue[dict[str, bytes] | None] = queue.Queue(queue_size)
        self.gather_s = 0.1
        self.sent = 0

    def offer(self, fields: dict[str, bytes]) -> bool:
        """Queue a sample; False (dropped) when the queue is full."""
        try:
            self.queue.put_nowait(fields)
        except queue.Full:
            return False
        return True

    def stop(self) -> None:
        try:
            self.queue.put_nowait(None)
        except queue.Full:
            pass

    def run(self) -> None:
        import redis

        client = redis.Redis.from_url(self.redis_url, socket_timeout=5, socket_connect_timeout=5)
        while True:
            item = self.queue.get()
            if item is None:
                return
            # Let a batch gather: one round trip for many samples rather than one each (monitoring does
            # not mind a sample 100 ms late).
            time.sleep(self.gather_s)
            batch = [item]
            while len(batch) < 100:
                try:
                    more = self.queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self.queue.put(None)
                    break
                batch.append(more)
            try:
                pipe = client.pipeline(transaction=False)
                for fields in batch:
                    pipe.xadd(self.stream, fields, maxlen=self.maxlen, approximate=True)  # type: ignore[arg-type]
                pipe.execute()
                self.sent += len(batch)
            except (OSError, redis.RedisError) as exc:
                log.warning("sampling: %d samples lost (%s)", len(batch), exc)
                time.sleep(0.5)
