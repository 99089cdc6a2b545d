"""KServe v2 bodies into tensors and rows: JSON and the binary tensor extension, and clear refusals."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from monitoring.kserve import DecodeError, outputs, rows, tensors


def _json(**tensors_by_key) -> bytes:
    return json.dumps(tensors_by_key).encode()


def test_a_json_request_becomes_one_row_per_batch_item_with_a_column_per_feature():
    body = _json(inputs=[{"name": "x", "datatype": "FP32", "shape": [2, 3], "data": [1, 2, 3, 4, 5, 6]},
                         {"name": "site", "datatype": "BYTES", "shape": [2], "data": ["a", "b"]}])
    assert rows(tensors(body)) == [{"x_0": 1, "x_1": 2, "x_2": 3, "site": "a"},
                                   {"x_0": 4, "x_1": 5, "x_2": 6, "site": "b"}]
    nested = _json(inputs=[{"name": "x", "datatype": "FP32", "shape": [2, 2], "data": [[1, 2], [3, 4]]}])
    assert rows(tensors(nested)) == [{"x_0": 1, "x_1": 2}, {"x_0": 3, "x_1": 4}]


def test_a_binary_request_is_decoded_by_its_datatypes():
    x = np.arange(6, dtype="<f4").reshape(2, 3)
    names = [b"cat", b"dog"]
    raw_bytes = b"".join(struct.pack("<I", len(n)) + n for n in names)
    head = json.dumps({"inputs": [
        {"name": "x", "datatype": "FP32", "shape": [2, 3], "parameters": {"binary_data_size": x.nbytes}},
        {"name": "pet", "datatype": "BYTES", "shape": [2], "parameters": {"binary_data_size": len(raw_bytes)}},
    ]}).encode()
    body = head + x.tobytes() + raw_bytes
    assert rows(tensors(body, len(head))) == [{"x_0": 0.0, "x_1": 1.0, "x_2": 2.0, "pet": "cat"},
                                              {"x_0": 3.0, "x_1": 4.0, "x_2": 5.0, "pet": "dog"}]


@pytest.mark.parametrize(("body", "header_length", "reason"), [
    (b"not json", None, "does not parse"),
    (_json(outputs=[]), None, "no 'inputs' list"),
    (_json(inputs=[{"name": "x", "datatype": "FP32", "shape": [2, 2], "data": [1, 2, 3]}]), None,
     "3 values for a shape of [2, 2]"),
    (_json(inputs=[{"name": "x", "datatype": "FP32", "shape": [1, 2],
                    "parameters": {"binary_data_size": 8}}]), None, "runs past the body's binary part"),
    (_json(inputs=[{"name": "x", "datatype": "FP32", "shape": [2], "data": [1, 2]}]), 10_000, "outside the body"),
    (_json(inputs=[{"name": "img", "datatype": "UINT8", "shape": [1, 28, 28], "data": [0] * 784}]), None,
     "784 values per row"),
    (_json(inputs=[{"name": "a", "datatype": "FP32", "shape": [2], "data": [1, 2]},
                   {"name": "b", "datatype": "FP32", "shape": [3], "data": [1, 2, 3]}]), None, "one batch size"),
    (_json(inputs=[{"name": "x", "datatype": "FP32", "shape": [True, 2], "data": [1, 2]}]), None,
     "shape must be a list of non-negative integers"),
    (_json(inputs=[{"name": "x", "datatype": "FP32", "shape": [1], "parameters": ["binary_data_size", 4]}]), None,
     "no data"),
    (b'{"inputs": []} trailing', None, "does not parse"),
])
def test_what_cannot_be_decoded_is_refused_with_the_reason(body, header_length, reason):
    with pytest.raises(DecodeError, match=reason.replace("[", r"\[").replace("]", r"\]")):
        rows(tensors(body, header_length))


def test_outputs_by_name_or_none():
    body = _json(outputs=[{"name": "label", "datatype": "INT64", "shape": [2], "data": [1, 0]},
                          {"name": "probabilities", "datatype": "FP32", "shape": [2, 2], "data": [[.2, .8], [.9, .1]]}])
    assert outputs(body) == {"label": [1, 0], "probabilities": [.2, .8, .9, .1]}
    assert outputs(b"{}") is None


def test_json_bodies_read_as_pythons_json_reads_them():
    """The decoder parses with ujson, for speed: the same values as the json module, to the last bit."""
    rng = np.random.default_rng(3)
    floats = [float(v) for v in rng.normal(scale=1e6, size=200)] + [5e-324, 1.7976931348623157e308, -0.0, 0.1]
    texts = ["plain", "caf\u00e9", "\U0001f600", "a/b", 'quote " and \\ backslash']
    body = json.dumps({"inputs": [
        {"name": "x", "datatype": "FP64", "shape": [len(floats)], "data": floats},
        {"name": "big", "datatype": "INT64", "shape": [2], "data": [2**63 - 1, -(2**63)]},
        {"name": "huge", "datatype": "INT64", "shape": [1], "data": [10**30]},
        {"name": "t", "datatype": "BYTES", "shape": [len(texts)], "data": texts},
    ]}).encode()
    expected = json.loads(body)["inputs"]
    found = tensors(body)
    assert [t.values for t in found] == [e["data"] for e in expected]
    assert all(a.hex() == b.hex() for a, b in zip(found[0].values, floats, strict=True))
