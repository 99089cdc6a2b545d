"""Safe retries: every POST of the API accepts an `Idempotency-Key` header (the IETF draft's name, as
Stripe and others use it). The key is the caller's (one per logical request, kept for 24 hours, per
user). The first request with a key runs; its answer is stored in the same transaction as the change
it made, so either both are committed or neither is. A retry with the same key and the same request
(method, path, body; for uploads, each file's SHA-256) gets that answer again, marked
`Idempotent-Replayed: true`, and changes nothing; the same key with another request is a 422. A retry
that arrives while the first is still running waits for it (the database's unique index holds the
second insert until the first commits). Only successful answers are kept: after an error the key is
free again, and nothing was changed. A secret in an answer (a new token) is shown once and never
stored: a retry of that request gets a 409 naming what the first one created instead.
"""

from __future__ import annotations

import hashlib
import json
import re
from datetime import timedelta
from typing import Any

from django.core.files.uploadedfile import UploadedFile
from django.core.serializers.json import DjangoJSONEncoder
from django.db import IntegrityError, transaction
from django.http.response import HttpResponseBase
from django.utils import timezone
from rest_framework.request import Request
from rest_framework.response import Response

from registry.models import IdempotencyRecord

HEADER = "HTTP_IDEMPOTENCY_KEY"
KEEP = timedelta(hours=24)
_KEY_RE = re.compile(r"^[\x21-\x7e]{1,255}$")
_SECRET_WITHHELD = "_secret_withheld"


class IdempotencyError(Exception):
    """A malformed key, or a key reused for another request: answered with its status."""

    def __init__(self, status_code: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status_code, self.code = status_code, code


class Replay(Exception):
    """The request was answered before: this is that answer."""

    def __init__(self, record: IdempotencyRecord) -> None:
        super().__init__(record.key)
        self.record = record

    def response(self) -> Response:
        from registry.api.errors import error_response  # errors imports this module

        body = self.record.body
        if isinstance(body, dict) and body.get(_SECRET_WITHHELD):
            return error_response(409, "already_done", (
                f"this request (Idempotency-Key {self.record.key!r}) was already done and its answer held a "
                "secret, which is shown only once; what it created: "
                f"{json.dumps({k: v for k, v in body.items() if k != _SECRET_WITHHELD})}"),
                headers={"Idempotent-Replayed": "true"})
        return Response(body, status=self.record.status_code, headers={"Idempotent-Replayed": "true"})


def wanted(request: Any) -> bool:
    return request.method == "POST" and HEADER in request.META


def _canonical(value: Any) -> Any:
    if isinstance(value, UploadedFile):
        digest = hashlib.sha256()
        for chunk in value.chunks():
            digest.update(chunk)
        value.seek(0)
        return {"file": value.name, "sha256": digest.hexdigest()}
    if isinstance(value, dict):
        return {str(k): _canonical(v) for k, v in value.items()}
    if hasattr(value, "lists"):  # QueryDict: every value of every field
        return {k: [_canonical(v) for v in vs] for k, vs in value.lists()}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    return value


def fingerprint(request: Request) -> str:
    blob = json.dumps([request.method, request.path, _canonical(request.data)], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def begin(request: Request) -> None:
    """After authentication, before the view: claim the key for this request, or raise Replay with the
    first answer, or IdempotencyError for a malformed or reused key."""
    key = request.META[HEADER]
    if not _KEY_RE.match(key):
        raise IdempotencyError(400, "invalid_input", "Idempotency-Key must be 1 to 255 visible ASCII characters "
                                              "(a UUID is a good choice)")
    fp = fingerprint(request)
    user: Any = request.user  # authenticated: POSTs need a capability
    try:
        with transaction.atomic():
            record = IdempotencyRecord.objects.create(user=user, key=key, fingerprint=fp)
    except IntegrityError:
        first = IdempotencyRecord.objects.get(user=user, key=key)
        if first.fingerprint != fp:
            raise IdempotencyError(422, "idempotency_key_reused",
                            f"Idempotency-Key {key!r} was used with another request (method, path or body); "
                            "use a new key for a new request") from None
        raise Replay(first) from None
    request._idempotency_record = record  # type: ignore[attr-defined]


def finish(request: Request, response: HttpResponseBase, secret_fields: tuple[str, ...] = ()) -> None:
    """Inside the request's transaction, after the view: keep a successful answer with its key (less
    the view's `secret_fields`); after an error, free the key (nothing the view did is kept: the
    transaction rolls back)."""
    record: IdempotencyRecord | None = getattr(request, "_idempotency_record", None)
    if record is None:
        return
    if 200 <= response.status_code < 300:
        body = getattr(response, "data", None)
        if isinstance(body, dict) and any(f in body for f in secret_fields):
            body = {**{k: v for k, v in body.items() if k not in secret_fields}, _SECRET_WITHHELD: True}
        # As the client got it: datetimes, decimals and UUIDs in their JSON form (a deployment's answer has them).
        body = json.loads(json.dumps(body, cls=DjangoJSONEncoder))
        IdempotencyRecord.objects.filter(pk=record.pk).update(status_code=response.status_code, body=body)
    else:
        transaction.set_rollback(True)


def forget_old() -> int:
    return int(IdempotencyRecord.objects.filter(created_at__lt=timezone.now() - KEEP).delete()[0])
