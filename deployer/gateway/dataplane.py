"""The gateway's data plane: a native binary (the Rust crate in deployer/gateway/dataplane/, standard
library only) that serves every client request. Python on the hot path cost 65-130 us of CPU per request
here, most of it the event loop and its callbacks; the budget is under 100 us and throughput within 10%
of direct Triton on a machine Triton shares, which only a native relay meets. This module starts the
binary and speaks its control protocol; routes, announcements and samples stay in Python.

Protocol. The data plane reads routing tables on its stdin, TAB-separated lines applied atomically at
`end`; it exits when stdin closes, so it never outlives its control plane:

    table   <version>
    model   <name>  <canary weight>
    arm     stable  <version>  <triton model>  <host:port>[,<host:port>...]
    arm     canary  ...
    end
    dropped <n>     (between tables: samples the control plane could not take, for the metrics)

and writes frames on its stdout, `<kind byte><u32 LE length><payload>`: b"A" a table applied (payload:
its version), b"S" a traffic sample (payload: fields, each `<u16 LE name length><name><u32 LE value
length><value>`).
"""

from __future__ import annotations

import logging
import os
import struct
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

from deployer.gateway.routing import Arm, RoutingTable

log = logging.getLogger("deployer.gateway")

BINARY_NAME = "mlops-gateway-dataplane"
BINARY_ENV = "GATEWAY_DATAPLANE"  # where the binary is, if not in the virtual environment's bin/
ACK_TIMEOUT_S = 5.0


class DataPlaneMissing(RuntimeError):
    pass


def binary_path() -> Path:
    """The data plane binary: $GATEWAY_DATAPLANE, else the one `make install` puts beside this Python."""
    configured = os.environ.get(BINARY_ENV)
    path = Path(configured) if configured else Path(sys.prefix) / "bin" / BINARY_NAME
    if not os.access(path, os.X_OK):
        where = f"${BINARY_ENV} ({configured})" if configured else str(path)
        raise DataPlaneMissing(f"the gateway's data plane binary is not at {where}: build it with `make install` "
                               f"(needs Rust's cargo) or point ${BINARY_ENV} at it")
    return path


def encode_table(version: int, table: RoutingTable) -> bytes:
    """A validated table (parse_table refuses control characters, so no field holds a tab or newline)."""
    def arm(role: str, a: Arm) -> str:
        return f"arm\t{role}\t{a.version}\t{a.triton_model}\t{','.join(a.nodes)}\n"

    lines = [f"table\t{version}\n"]
    for name, route in sorted(table.items()):
        lines.append(f"model\t{name}\t{route.canary_weight if route.canary else 0}\n")
        lines.append(arm("stable", route.stable))
        if route.canary is not None:
            lines.append(arm("canary", route.canary))
    lines.append("end\n")
    return "".join(lines).encode()


def read_frames(stream: IO[bytes]) -> Iterator[tuple[bytes, bytes]]:
    """(kind, payload) for each frame until the stream ends."""
    while True:
        head = stream.read(5)
        if len(head) < 5:
            return
        (length,) = struct.unpack("<I", head[1:])
        payload = stream.read(length)
        if len(payload) < length:
            return
        yield head[:1], payload


def decode_sample(payload: bytes) -> dict[str, bytes]:
    fields, i = {}, 0
    while i < len(payload):
        (n,) = struct.unpack_from("<H", payload, i)
        name = payload[i + 2:i + 2 + n].decode()
        i += 2 + n
        (m,) = struct.unpack_from("<I", payload, i)
        fields[name] = payload[i + 4:i + 4 + m]
        i += 4 + m
    return fields


class DataPlane:
    """The running binary: `apply` sends a table and waits until the data plane has it in use; samples
    are handed to `on_sample` from a reader thread. `on_sample` must not block (the applied notices
    come down the same pipe): it returns False for a sample it dropped, which the data plane then counts
    in gateway_samples_dropped_total with its own."""

    def __init__(self, args: list[str], on_sample: Callable[[dict[str, bytes]], bool] | None = None) -> None:
        self.proc = subprocess.Popen([str(binary_path()), *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.on_sample = on_sample
        self.applied = 0
        self._changed = threading.Condition()
        self._write = threading.Lock()
        self._reader = threading.Thread(target=self._read, name="dataplane-reader", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for kind, payload in read_frames(self.proc.stdout):
            if kind == b"A":
                with self._changed:
                    self.applied = int(payload)
                    self._changed.notify_all()
            elif kind == b"S" and self.on_sample is not None and not self.on_sample(decode_sample(payload)):
                try:
                    self._send(b"dropped\t1\n")
                except OSError:  # the data plane is gone: the main thread sees it exit
                    return

    def _send(self, data: bytes) -> None:
        assert self.proc.stdin is not None
        with self._write:
            self.proc.stdin.write(data)
            self.proc.stdin.flush()

    def apply(self, version: int, table: RoutingTable) -> bool:
        """Send a table; True once the data plane reports it in use (False: not within ACK_TIMEOUT_S)."""
        self._send(encode_table(version, table))
        with self._changed:
            return self._changed.wait_for(lambda: self.applied >= version, ACK_TIMEOUT_S)

    def stop(self, timeout_s: float = 5.0) -> int:
        """Close its stdin (it exits on that) and wait; killed if it does not."""
        try:
            with self._write:
                if self.proc.stdin is not None:
                    self.proc.stdin.close()
        except OSError:
            pass
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(timeout_s)
