"""A differential test of the gateway's request framing against llhttp (httptools): thousands of generated
and mutated requests, in classes of the request smuggling shapes (CL.TE, TE.CL, TE.TE, odd
Content-Lengths, obs-fold, NUL and bare CR/LF, huge chunk sizes, chunk extensions, trailers, odd methods
and targets), each sent to a data plane in front of a model server that frames what reaches it with
llhttp again. Wherever the two frame a request differently, the gateway must be the stricter: it
forwards only requests llhttp reads the same way (method, target, headers, body), never more requests
than llhttp finds, and what reaches the model server is always well-framed. The requests come from
seeded generators: every run sends the same bytes."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Iterator

import pytest

from deployer.tests.gateway_upstream import (
    MODEL,
    TRITON_MODEL,
    Message,
    RecordingUpstream,
    Response,
    dataplane_before,
    exchange,
    llhttp_frame,
    split_responses,
)

pytestmark = pytest.mark.timeout(120)

CASES_PER_CLASS = 220
INFER = f"/v2/models/{MODEL}/infer".encode()
READY = f"/v2/models/{MODEL}/ready".encode()
# A second request after the first, as a smuggler would hide it: forwarded if framed, so seen upstream.
SMUGGLED = [b"", b"GET " + READY + b" HTTP/1.1\r\nHost: gw\r\n\r\n",
            b"POST " + INFER + b" HTTP/1.1\r\nHost: gw\r\nContent-Length: 4\r\n\r\nnext",
            b"GET /v2/health/ready HTTP/1.1\r\nHost: gw\r\n\r\n"]
# A refusal: the gateway's answer when it will not read a request (or what follows it), then the close.
REFUSALS = {400, 404, 405, 408, 413, 431}


@pytest.fixture(scope="module")
def upstream() -> Iterator[RecordingUpstream]:
    server = RecordingUpstream()
    yield server
    server.close()


@pytest.fixture(scope="module")
def port(upstream: RecordingUpstream) -> Iterator[int]:
    with dataplane_before(upstream, "--sample-rate", "0") as (_, p):
        yield p


def _upstream_url(url: bytes) -> bytes:
    """The target as the gateway forwards it: the logical model's name replaced by the Triton model's."""
    prefix = f"/v2/models/{MODEL}".encode()
    if url == prefix or url.startswith(prefix + b"/") or url.startswith(prefix + b"?"):
        return f"/v2/models/{TRITON_MODEL}".encode() + url[len(prefix):]
    return url


def upstream_seq(answer: Response) -> int | None:
    """Which request of the model server's this answer relays, if any (model metadata is relayed with a
    head the gateway makes: there the model server's body tells)."""
    seq = answer.headers.get(b"x-upstream-seq")
    if seq is None and answer.status == 200 and answer.body.startswith(b"seq="):
        seq = answer.body[4:]
    return None if seq is None else int(seq)


def check(port: int, upstream: RecordingUpstream, request: bytes, outcomes: Counter[str]) -> None:
    """Sends one case and compares the gateway's framing of it with llhttp's."""
    upstream.clear()
    framed = llhttp_frame(request)
    responses = [r for r in split_responses(exchange(port, request)) if r.status >= 200]
    with upstream.lock:
        received, errors = list(upstream.received), list(upstream.errors)
    why = f"request {request!r}: llhttp {framed}, gateway answered {[r.status for r in responses]}"
    assert not errors, f"the model server got a request it could not frame: {errors}; {why}"
    # The last answer may be a refusal, after which the gateway closes and reads nothing more; every other
    # answer is to a request the gateway framed, and llhttp must have framed as many.
    answered = responses
    if responses and responses[-1].status in REFUSALS and responses[-1].headers.get(b"connection") == b"close" \
            and upstream_seq(responses[-1]) is None:
        answered = responses[:-1]
    assert len(answered) <= len(framed.messages), f"the gateway framed more requests than llhttp: {why}"
    forwarded = 0
    for answer, message in zip(answered, framed.messages, strict=False):
        seq = upstream_seq(answer)
        if seq is None:
            continue
        forwarded += 1
        got: Message = received[seq]
        assert (got.method, got.url, got.body) == (message.method, _upstream_url(message.url), message.body), why
        assert got.end_to_end_headers() == message.end_to_end_headers(), why
    assert forwarded == len(received), f"the model server got requests that were not answered: {why}"
    agreement = "same requests" if len(answered) == len(framed.messages) else "gateway stricter"
    outcomes[f"{agreement}, llhttp {'refused' if framed.end == 'error' else 'read all'}"] += 1
    outcomes["forwarded"] += forwarded


def run_class(port: int, upstream: RecordingUpstream, generate: Callable[[random.Random], bytes], seed: int,
              capsys: pytest.CaptureFixture[str]) -> None:
    rng = random.Random(seed)
    outcomes: Counter[str] = Counter()
    for _ in range(CASES_PER_CLASS):
        check(port, upstream, generate(rng), outcomes)
    assert sum(n for k, n in outcomes.items() if k != "forwarded") == CASES_PER_CLASS
    with capsys.disabled():
        print(f"\n{generate.__name__}: {dict(sorted(outcomes.items()))}")


# Building blocks -------------------------------------------------------------------------------------


def chunked_body(rng: random.Random, data: bytes) -> bytes:
    """`data` in 1-3 chunks, then the last chunk and the end."""
    cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randint(0, 2))))
    pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"


def request(headers: list[bytes], body: bytes, method: bytes = b"POST", target: bytes = INFER,
            version: bytes = b"HTTP/1.1") -> bytes:
    return method + b" " + target + b" " + version + b"\r\nHost: gw\r\n" + b"".join(h + b"\r\n" for h in headers) \
        + b"\r\n" + body


def payload(rng: random.Random) -> bytes:
    return bytes(rng.choice(b"abcdefghij0123456789") for _ in range(rng.randint(1, 40)))


TE_VALUES = [b"chunked", b"Chunked", b"CHUNKED", b" chunked", b"chunked ", b"\tchunked", b"chunked\t", b"xchunked",
             b"chunked, identity", b"identity, chunked", b"gzip, chunked", b"chunked,", b", chunked", b"chunk",
             b"\"chunked\"", b"chunked\x0b", b"chunked;q=1", b"identity", b"", b"chunked\x00", b"ch\x00unked"]
TE_NAMES = [b"Transfer-Encoding", b"transfer-encoding", b"TRANSFER-ENCODING", b"Transfer-Encoding ",
            b"Transfer-Encoding\t", b"Transfer_Encoding", b" Transfer-Encoding", b"Transfer-Encodin",
            b"X-Transfer-Encoding"]


def te_header(rng: random.Random) -> bytes:
    name = rng.choice(TE_NAMES) if rng.random() < 0.3 else b"Transfer-Encoding"
    return name + rng.choice([b": ", b":", b":\t", b" : "]) + rng.choice(TE_VALUES)


def cl_header(rng: random.Random, n: int) -> bytes:
    value = rng.choice([b"%d" % n, b"%d" % n, b"0%d" % n, b"+%d" % n, b"-%d" % n, b"%d " % n, b" %d" % n,
                        b"%d, %d" % (n, n), b"%d,%d" % (n, n + 1), b"%x" % n, b"0x%x" % n, b"%d.0" % n,
                        b"", b"99999999999999999999", b"18446744073709551617", b"%d\x00" % n, b"1_0"])
    name = rng.choice([b"Content-Length", b"content-length", b"Content-Length ", b"Content_Length",
                       b"CONTENT-LENGTH"]) if rng.random() < 0.3 else b"Content-Length"
    return name + b": " + value


# The classes ------------------------------------------------------------------------------------------


def cl_te(rng: random.Random) -> bytes:
    """Content-Length, then Transfer-Encoding: the two framings of one body disagree."""
    data = payload(rng)
    body = chunked_body(rng, data)
    n = rng.choice([len(body), len(data), 0, 3, len(body) + 5])
    return request([cl_header(rng, n), te_header(rng)], body + rng.choice(SMUGGLED))


def te_cl(rng: random.Random) -> bytes:
    """Transfer-Encoding, then Content-Length."""
    data = payload(rng)
    body = chunked_body(rng, data)
    n = rng.choice([len(body), len(data), 0, 4, 6])
    return request([te_header(rng), cl_header(rng, n)], body + rng.choice(SMUGGLED))


def te_te(rng: random.Random) -> bytes:
    """Two Transfer-Encoding headers or one obfuscated: case, white space, lists, look-alike names."""
    data = payload(rng)
    headers = [te_header(rng) for _ in range(rng.randint(1, 2))]
    if rng.random() < 0.3:
        headers.insert(rng.randint(0, len(headers)), cl_header(rng, len(data)))
    body = chunked_body(rng, data) if rng.random() < 0.7 else data
    return request(headers, body + rng.choice(SMUGGLED))


def content_length(rng: random.Random) -> bytes:
    """Duplicate, signed, +, leading-zero, list, hex, huge, empty Content-Lengths."""
    data = payload(rng)
    headers = [cl_header(rng, len(data)) for _ in range(rng.choice([1, 1, 2, 3]))]
    return request(headers, data + rng.choice(SMUGGLED))


def obs_fold(rng: random.Random) -> bytes:
    """A header line continued on the next (SP or HTAB first), framing headers among them."""
    data = payload(rng)
    framing = rng.choice([cl_header(rng, len(data)), b"Transfer-Encoding: chunked"])
    body = chunked_body(rng, data) if b"Transfer" in framing else data
    fold = rng.choice([b" ", b"\t", b"  ", b" \t"])
    shapes = [
        [b"X-A: a", fold + b"b", framing],
        [framing, fold + b"x"],
        [b"X-A: a", fold + framing],
        [b"Transfer-Encoding:", fold + b"chunked"],
        [b"Content-Length:", fold + b"%d" % len(data)],
        [fold + framing],
    ]
    body = chunked_body(rng, data) if b"Transfer" in b"".join(shapes[-1]) else body
    return request(rng.choice(shapes), body + rng.choice(SMUGGLED))


def nul_and_bare_cr_lf(rng: random.Random) -> bytes:
    """NUL, bare CR, bare LF (and other control bytes) put somewhere in the head."""
    data = payload(rng)
    chunked = rng.random() < 0.4
    framing = b"Transfer-Encoding: chunked" if chunked else b"Content-Length: %d" % len(data)
    head = bytearray(request([b"X-A: abc", framing, b"X-B: def"], b""))
    end = len(head) - 2
    for _ in range(rng.randint(1, 2)):
        at = rng.randrange(0, end)
        bad = rng.choice([b"\x00", b"\r", b"\n", b"\r\r\n", b"\n\n", b"\x0b", b"\x0c", b"\x7f", b"\x1b", b"\r \n"])
        if rng.random() < 0.5:
            head[at:at] = bad
        else:
            head[at:at + 2] = bad if head[at:at + 2] == b"\r\n" else head[at:at + 2]
            if head[at:at + 2] != b"\r\n":
                head[at:at + 1] = bad
    body = chunked_body(rng, data) if chunked else data
    return bytes(head) + body + rng.choice(SMUGGLED)


def huge_chunk_sizes(rng: random.Random) -> bytes:
    """Chunk sizes with many digits, leading zeros, overflowing 64 bits, or larger than what follows."""
    data = payload(rng)
    size = rng.choice([b"f" * rng.randint(15, 24), b"0" * rng.randint(1, 30) + b"%x" % len(data),
                       b"1" + b"0" * rng.randint(14, 20), b"ffffffffffffffff", b"10000000000000000" + b"%x" % len(data),
                       b"%x" % len(data), b"%X" % (len(data) + 1), b"-%x" % len(data), b"0x%x" % len(data),
                       b"%x" % len(data) + b" ", b" %x" % len(data)])
    body = size + b"\r\n" + data + b"\r\n0\r\n\r\n"
    return request([b"Transfer-Encoding: chunked"], body + rng.choice(SMUGGLED))


def chunk_extensions(rng: random.Random) -> bytes:
    """Chunk extensions, well-formed or with bare LF, CR, NUL, white space, unterminated quotes."""
    data = payload(rng)
    ext = rng.choice([b";a", b";a=b", b";a=b;c=d", b';a="x y"', b';a="x\\"y"', b";a=b\nx", b";a\n",
                      b";a=b\rx", b";a=\x00", b';a="b\nc"', b';a="b', b"; a", b";a =b", b";a= b", b";a=b c",
                      b";", b";a;", b";a=", b"\n", b";a=b\t", b";" + b"x" * rng.randint(100, 20000),
                      b';a="\t"', b";a=\x80", b';a="\x80"'])
    last_ext = rng.choice([b"", b"", ext])
    body = b"%x" % len(data) + ext + b"\r\n" + data + b"\r\n0" + last_ext + b"\r\n\r\n"
    return request([b"Transfer-Encoding: chunked"], body + rng.choice(SMUGGLED))


def trailers(rng: random.Random) -> bytes:
    """Trailer sections: fields, framing fields, folding, bare LF, NUL, no colon."""
    data = payload(rng)
    fields = rng.sample([b"A: b\r\n", b"A:b\r\n", b"X-Checksum: 123\r\n", b"A: b\nB: c\r\n", b"A: b\n\r\n",
                         b"A: b\x00\r\n", b"A\r\n", b": b\r\n", b"A : b\r\n", b" A: b\r\n", b"A: b\r\n c\r\n",
                         b"Content-Length: 5\r\n", b"Transfer-Encoding: chunked\r\n", b"A: \x80\r\n",
                         b"A: b\rc\r\n", b"\n", b"A: " + b"x" * 20000 + b"\r\n"], rng.randint(1, 2))
    body = b"%x\r\n" % len(data) + data + b"\r\n0\r\n" + b"".join(fields) + b"\r\n"
    return request([b"Transfer-Encoding: chunked", b"Trailer: A"], body + rng.choice(SMUGGLED))


METHODS = [b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"OPTIONS", b"TRACE", b"PATCH", b"CONNECT", b"PRI",
           b"FOO", b"get", b"Post", b"M-SEARCH", b"PROPFIND", b"PURGE", b"QUERY", b"G\x00ET", b"GE T", b"POST\t"]
TARGETS = [INFER, READY, b"/v2/models/" + MODEL.encode(), b"/v2/health/ready", b"/v2", b"/metrics", b"*",
           b"http://gw" + INFER, b"gw:443", b"//v2/models/m/infer", b"/v2/models/m/infer?x=1#f",
           b"/v2/models/m/../m/infer", b"/v2/models/m%2Finfer", b"/v2/models/m/stats", b"/v2/trace/setting",
           b"/v2/models/m/versions/1/infer", b"/v2/models/m/infer/", b"/v2/models/\xc3\xa9/infer",
           b"/v2/models/m/in fer", b"/v2/models/m/infer\x7f", b"", b"/" + b"a" * 3000, b"/v2/models/m/infer\t"]
VERSIONS = [b"HTTP/1.1", b"HTTP/1.1", b"HTTP/1.0", b"HTTP/1.2", b"HTTP/2.0", b"HTTP/0.9", b"http/1.1", b"HTTP/1.1 ",
            b"HTTP/1", b"HTTP/1.10"]


def odd_methods_and_targets(rng: random.Random) -> bytes:
    """Methods llhttp knows and does not, asterisk, absolute and authority forms, spaces, non-ASCII."""
    data = payload(rng)
    headers = [b"Content-Length: %d" % len(data)] if rng.random() < 0.6 else []
    if rng.random() < 0.2:
        headers.append(rng.choice([b"Upgrade: h2c", b"Connection: upgrade", b"Expect: 100-continue",
                                   b"Connection: close"]))
    body = data if headers and headers[0].startswith(b"Content-Length") else b""
    # half the time each part is a usual one, so that the odd ones meet requests that are otherwise fine
    method = rng.choice(METHODS[:3] if rng.random() < 0.5 else METHODS)
    target = rng.choice(TARGETS[:4] if rng.random() < 0.5 else TARGETS)
    version = rng.choice(VERSIONS[:3] if rng.random() < 0.6 else VERSIONS)
    return request(headers, body + rng.choice(SMUGGLED), method=method, target=target, version=version)


INTERESTING = [b"\r", b"\n", b"\r\n", b" ", b"\t", b"\x00", b":", b",", b";", b"0", b"f", b"\x80", b"\xff", b"-",
               b"\"", b"\\", b"Transfer-Encoding: chunked\r\n", b"Content-Length: 1\r\n", b"HTTP/1.1"]


def mutated(rng: random.Random) -> bytes:
    """A well-formed request (or two) with bytes inserted, dropped or replaced at random."""
    data = payload(rng)
    base = bytearray(rng.choice([
        request([b"Content-Length: %d" % len(data)], data),
        request([b"Transfer-Encoding: chunked"], chunked_body(rng, data)),
        request([b"Transfer-Encoding: chunked"], b"%x;e=1\r\n" % len(data) + data + b"\r\n0\r\nT: 1\r\n\r\n"),
    ]) + rng.choice(SMUGGLED))
    for _ in range(rng.randint(1, 4)):
        at = rng.randrange(len(base))
        kind = rng.random()
        if kind < 0.4:
            base[at:at] = rng.choice(INTERESTING)
        elif kind < 0.7:
            del base[at:at + rng.randint(1, 3)]
        else:
            base[at:at + 1] = rng.choice(INTERESTING)
    return bytes(base)


CLASSES = [cl_te, te_cl, te_te, content_length, obs_fold, nul_and_bare_cr_lf, huge_chunk_sizes, chunk_extensions,
           trailers, odd_methods_and_targets, mutated]


@pytest.mark.parametrize("generate", CLASSES, ids=[c.__name__ for c in CLASSES])
def test_requests_of_each_class_are_framed_no_looser_than_llhttp(port, upstream, capsys, generate):
    run_class(port, upstream, generate, CLASSES.index(generate) + 1, capsys)
