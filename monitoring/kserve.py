"""KServe v2 (Open Inference Protocol) bodies decoded into tensors and rows: what the traffic capture
stores and the shadow analysis compares. JSON bodies, and the binary tensor extension (a JSON header of
`Inference-Header-Content-Length` bytes whose tensors carry `parameters.binary_data_size`, then their
raw little-endian bytes in order). Anything else is refused with the reason, never guessed at."""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import numpy as np
import ujson  # json's semantics (checked in tests/test_kserve.py), parsed about 5x faster: capture's hot path

# KServe v2 datatypes and their numpy types (BYTES: length-prefixed strings in the binary form).
DTYPES = {"BOOL": "?", "UINT8": "<u1", "UINT16": "<u2", "UINT32": "<u4", "UINT64": "<u8", "INT8": "<i1",
          "INT16": "<i2", "INT32": "<i4", "INT64": "<i8", "FP16": "<f2", "FP32": "<f4", "FP64": "<f8"}
MAX_COLUMNS = 256  # a tensor wider than this per row (an image) is not captured as columns


class DecodeError(ValueError):
    """The body is not a KServe v2 inference body this decoder can read: the message says why."""


class Tensor(NamedTuple):
    name: str
    datatype: str
    shape: tuple[int, ...]
    values: list[Any]  # flattened, row-major


def is_inference(head: bytes) -> bool:
    """Whether an HTTP request head (as the gateway samples it) is a KServe v2 inference call."""
    method, _, rest = head.partition(b" ")
    return method == b"POST" and rest.split(b" ", 1)[0].split(b"?", 1)[0].endswith(b"/infer")


def header_length(head: bytes) -> int | None:
    """The Inference-Header-Content-Length of an HTTP head (request or response), None without one."""
    if b"inference-header-content-length" not in head.lower():  # most bodies are plain JSON
        return None
    for line in head.split(b"\r\n")[1:]:
        name, sep, value = line.partition(b":")
        if sep and name.strip().lower() == b"inference-header-content-length":
            try:
                return int(value.strip())
            except ValueError:
                raise DecodeError(f"Inference-Header-Content-Length {value.strip()!r} is not a number") from None
    return None


def _header(body: bytes, header_length: int | None) -> tuple[dict[str, Any], bytes]:
    if header_length is None:
        head, rest = body, b""
    elif not 0 <= header_length <= len(body):
        raise DecodeError(f"Inference-Header-Content-Length {header_length} is outside the body ({len(body)} bytes)")
    else:
        head, rest = body[:header_length], body[header_length:]
    try:
        doc = ujson.loads(head)
    except ValueError as exc:  # ujson.JSONDecodeError is one
        raise DecodeError(f"the JSON header does not parse: {exc}") from None
    if not isinstance(doc, dict):
        raise DecodeError("the body is not a JSON object")
    return doc, rest


def _bytes_values(raw: bytes, count: int, name: str) -> list[str]:
    out, at = [], 0
    while at < len(raw):
        if at + 4 > len(raw):
            raise DecodeError(f"{name}: a BYTES element's length prefix is cut off")
        size = int.from_bytes(raw[at:at + 4], "little")
        out.append(raw[at + 4:at + 4 + size].decode("utf-8", "replace"))
        at += 4 + size
    if len(out) != count:
        raise DecodeError(f"{name}: {len(out)} BYTES elements for a shape of {count}")
    return out


def tensors(body: bytes, header_length: int | None = None, key: str = "inputs") -> list[Tensor]:
    """The tensors under `key` ("inputs" of a request, "outputs" of a response)."""
    doc, rest = _header(body, header_length)
    entries = doc.get(key)
    if not isinstance(entries, list) or not entries:
        raise DecodeError(f"no {key!r} list in the body")
    out, at = [], 0
    for entry in entries:
        name = entry.get("name") if isinstance(entry, dict) else None
        if not isinstance(name, str):
            raise DecodeError(f"an entry of {key!r} has no name")
        datatype = entry.get("datatype", "")
        datatype = datatype if isinstance(datatype, str) else str(datatype)
        shape = entry.get("shape")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):  # no bool
            raise DecodeError(f"{name}: shape must be a list of non-negative integers")
        count = math.prod(shape)
        parameters = entry.get("parameters")
        size = parameters.get("binary_data_size") if isinstance(parameters, dict) else None
        if size is not None:
            if not isinstance(size, int) or size < 0 or at + size > len(rest):
                raise DecodeError(f"{name}: binary_data_size {size!r} runs past the body's binary part")
            raw, at = rest[at:at + size], at + size
            if datatype == "BYTES":
                values: list[Any] = _bytes_values(raw, count, name)
            elif datatype in DTYPES:
                if len(raw) != count * np.dtype(DTYPES[datatype]).itemsize:
                    raise DecodeError(f"{name}: {len(raw)} bytes of {datatype} for a shape of {shape}")
                values = np.frombuffer(raw, dtype=DTYPES[datatype]).tolist()
            else:
                raise DecodeError(f"{name}: unknown datatype {datatype!r}")
        else:
            data = entry.get("data")
            if not isinstance(data, list):
                raise DecodeError(f"{name}: no data (and no binary_data_size)")
            values = np.asarray(data, dtype=object).reshape(-1).tolist() if data and isinstance(data[0], list) \
                else data
            if len(values) != count:
                raise DecodeError(f"{name}: {len(values)} values for a shape of {shape}")
        out.append(Tensor(name, datatype, tuple(shape), values))
    return out


def rows(found: list[Tensor]) -> list[dict[str, Any]]:
    """One dict per batch row: a tensor of shape [batch] gives a column of its name, [batch, k] (or more
    dimensions, flattened) gives columns name_0 .. name_{k-1}. Every tensor must share the batch size."""
    if not found:
        return []
    batch = {t.shape[0] if t.shape else 1 for t in found}
    if len(batch) != 1:
        raise DecodeError(f"the tensors do not share one batch size: {sorted(batch)}")
    n = batch.pop()
    out: list[dict[str, Any]] = [{} for _ in range(n)]
    for t in found:
        width = math.prod(t.shape[1:]) if len(t.shape) > 1 else 1
        if width > MAX_COLUMNS:
            raise DecodeError(f"{t.name}: {width} values per row, over the {MAX_COLUMNS} captured as columns")
        if len(t.shape) <= 1:
            for row, value in zip(out, t.values, strict=False):
                row[t.name] = value
            continue
        names = _column_names(t.name, width)
        for i, row in enumerate(out):
            row.update(zip(names, t.values[i * width:(i + 1) * width], strict=False))
    return out


@functools.lru_cache(maxsize=1024)
def _column_names(name: str, width: int) -> tuple[str, ...]:
    """name_0 .. name_{width-1}: the same few tensors arrive in every sample, so their names are made once."""
    return tuple(f"{name}_{j}" for j in range(width))


def outputs(body: bytes, header_length: int | None = None) -> dict[str, list[Any]] | None:
    """The outputs of a response, by name (values flattened); None if it is not one this decoder reads."""
    try:
        return {t.name: t.values for t in tensors(body, header_length, key="outputs")}
    except DecodeError:
        return None
