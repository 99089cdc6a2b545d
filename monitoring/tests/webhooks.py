"""A webhook receiver for tests: a real HTTP server on a free loopback port that checks every request's
signature and timestamp with the Standard Webhooks reference library (`standardwebhooks`, not the platform's
code) and answers from a script per path; and what the platform hands to the broker, recorded instead of
sent. The fixtures (`receiver_server`, `broker`, `fast`) are in monitoring/tests/conftest.py; the notify
and events tests share them."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from config.celery import app
from monitoring import notify, tasks
from monitoring.models import Delivery, DeliveryStatus, Receiver
from registry.audit import SYSTEM

HANG = "hang"  # a scripted answer: take the request and never answer


# ---- a receiver: a real HTTP server that verifies what it gets -----------------------------------------------


@dataclass
class Route:
    secret: str  # what this receiver verifies signatures with
    answers: list[Any]  # status code, (status code, body, headers) or HANG; the last one repeats
    served: int = 0

    def next_answer(self) -> Any:
        answer = self.answers[min(self.served, len(self.answers) - 1)]
        self.served += 1
        return answer


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    verified: bool
    problem: str
    at: float

    @property
    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class ReceiverServer:
    base_url: str
    routes: dict[str, Route] = field(default_factory=dict)
    received: list[Received] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def route(self, path: str, secret: str, *answers: Any) -> None:
        self.routes[path] = Route(secret, list(answers) or [200])

    def at(self, path: str) -> list[Received]:
        return [r for r in self.received if r.path == path]


def verify(secret: str, body: bytes, headers: dict[str, str]) -> str:
    """'' if the request is signed with `secret` and stamped within 5 s of now, else what is wrong."""
    try:
        Webhook(secret).verify(body, headers)
    except WebhookVerificationError as exc:
        return f"signature: {exc}"
    if abs(int(headers.get("webhook-timestamp", "0")) - time.time()) > 5:
        return "timestamp more than 5 s off"
    return ""


@contextmanager
def serving() -> Iterator[ReceiverServer]:
    """A receiver server, shut down when the block ends."""
    state: ReceiverServer

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            headers = {k.lower(): v for k, v in self.headers.items()}
            with state.lock:
                route = state.routes.get(self.path)
                answer = route.next_answer() if route else 404
                problem = verify(route.secret, body, headers) if route else "no such route"
                state.received.append(Received(self.path, headers, body, not problem, problem, time.time()))
            if answer == HANG:
                state.release.wait(30)
                return
            code, text, extra = (answer, "ok", {}) if isinstance(answer, int) else answer
            if problem and route:
                code, text, extra = 401, problem, {}
            payload = text.encode()
            self.send_response(code)
            for name, value in extra.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state = ReceiverServer(f"http://127.0.0.1:{server.server_address[1]}")
    # shutdown() waits for serve_forever to look again: every 0.05 s, not its default 0.5 s (each test's teardown)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        state.release.set()
        server.shutdown()
        server.server_close()


# ---- what reaches the broker, recorded ------------------------------------------------------------------------


@dataclass
class Sent:
    task: str
    args: list[Any]
    countdown: float | None


def recording_broker(monkeypatch: pytest.MonkeyPatch) -> list[Sent]:
    """What is sent to the broker from now on, recorded in the list returned instead of sent."""
    record: list[Sent] = []

    def send_task(name: str, args: Any = (), countdown: float | None = None, **options: Any) -> None:
        assert name in app.tasks, f"{name} is not a registered task"
        record.append(Sent(name, list(args), countdown))

    monkeypatch.setattr(app, "send_task", send_task)
    return record


def fast_webhooks(settings: Any) -> dict[str, Any]:
    """Small backoff and timeouts, so that retries and a silent receiver take a fraction of a second."""
    settings.PLATFORM = {**settings.PLATFORM, "WEBHOOK_ATTEMPTS": 6, "WEBHOOK_BACKOFF_S": 0.05,
                         "WEBHOOK_BACKOFF_MAX_S": 2.0, "WEBHOOK_CONNECT_TIMEOUT_S": 0.5,
                         "WEBHOOK_READ_TIMEOUT_S": 0.5}
    return settings.PLATFORM


def receiver_at(server: ReceiverServer, path: str, *answers: Any, kind: str = "json", name: str | None = None,
                verify_with: str | None = None, event_types: list[str] | None = None,
                models: list[str] | None = None) -> Receiver:
    """A receiver made through the service, answering at `path` of the server with `answers`."""
    receiver = notify.receiver_create(SYSTEM, name or f"hook{path.replace('/', '-')}", kind,
                                      server.base_url + path, event_types=event_types, models=models)
    server.route(path, verify_with or receiver.secret, *answers)
    return receiver


def deliver_until_settled(delivery_id: int, broker: list[Sent], most: int = 10) -> list[float]:
    """Run the delivery task as the broker would: again after each countdown it scheduled; the countdowns."""
    countdowns: list[float] = []
    for _ in range(most):
        before = len(broker)
        tasks.deliver(delivery_id)
        if Delivery.objects.get(pk=delivery_id).status != DeliveryStatus.PENDING:
            return countdowns
        retry = broker[before:]
        assert [(s.task, s.args) for s in retry] == [(notify.DELIVER_TASK, [delivery_id])]
        assert retry[0].countdown is not None
        countdowns.append(retry[0].countdown)
        time.sleep(retry[0].countdown)
    raise AssertionError(f"delivery {delivery_id} still pending after {most} attempts")
