"""Send the outbox's pending messages to the broker whenever it answers: `make run` keeps one running
(platform/processes.conf). Two at once are safe (each message is claimed with SKIP LOCKED)."""

from __future__ import annotations

import signal
import threading
from typing import Any

from django.core.management.base import BaseCommand

from registry.outbox import outbox_dispatch_forever


class Command(BaseCommand):
    help = "Send follow-up work recorded in the outbox to the broker, forever."

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("--interval", type=float, default=0.5, help="seconds between passes when idle")

    def handle(self, *args: Any, **options: Any) -> None:
        stop = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        self.stdout.write("outbox dispatcher: sending pending follow-up work to the broker")
        outbox_dispatch_forever(stop, options["interval"])
