"""The gateway's data plane: a native binary (the Rust crate in deployer/gateway/dataplane/, standard
library only) that serves every client request. Python on the hot path cost 65-130 us of CPU per request
here, most of it the event loop and its callbacks; the budget is under 100 us and throughput within 10%
of direct Triton on a machine Triton shares, which only a native relay meets. This module finds the
running binary or starts one, and speaks its control protocol; routes, announcements and samples stay in
Python.

Lifetime. The data plane listens on a Unix socket, `--control-socket PATH` (made mode 0600, so only the
platform's user steers the gateway; by default `$PLATFORM_STATE_DIR/gateway-<host>-<port>.sock`). A
control plane connects there: if a data plane answers, it is adopted as it runs (no client notices);
if nothing does (no file, or a stale one its dead data plane left), a new data plane is started in a
session of its own, so that it is not killed with the control plane's process group, and connected to.
When the control connection ends, the data plane goes on serving the last table it applied, drops (and
counts) samples, and waits for the next control plane. It exits on SIGTERM or SIGINT, or when its control
plane sends `stop` (as a control plane does when it is stopped cleanly), never merely because its
control plane went. One control connection at a time: another is refused while one is live (the
control plane that holds the connection keeps it; a dead one's connection is closed by the kernel, so
it never blocks its successor).

Protocol. First the data plane sends one frame: b"H" (hello; payload: its process id) when the
connection is now the control connection, or b"R" (refused; payload: why) before it closes. Then the
control plane sends TAB-separated lines, a table applied atomically at `end`; `arm` and `capture` lines
belong to the `model` line before them (one capture line at most):

    table   <version>
    model   <name>  <canary weight>  [<shadow share>]
    arm     stable  <version>  <triton model>  <host:port>[,<host:port>...]
    arm     canary  ...
    arm     shadow  ...     (copies of `shadow share` percent of stable's requests, after the client's answer)
    capture <fraction>  <floor per second>      (the model's own sampling, in place of --sample-rate)
    end
    dropped <n>     (between tables: samples the control plane could not take, for the metrics)
    stop            (between tables: the data plane exits)

and the data plane sends frames, `<kind byte><u32 LE length><payload>`: b"A" a table applied (payload:
its version; only to the connection that sent it), b"S" a traffic sample (payload: fields, each `<u16 LE
name length><name><u32 LE value length><value>`; a mirrored request's sample also holds the shadow arm's
answer: shadow_version, shadow_triton_model, shadow_status (0: none came), shadow_latency_ms,
shadow_response).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

from deployer.gateway.routing import Arm, RoutingTable

log = logging.getLogger("deployer.gateway")

BINARY_NAME = "mlops-gateway-dataplane"
BINARY_ENV = "GATEWAY_DATAPLANE"  # where the binary is, if not in the virtual environment's bin/
ACK_TIMEOUT_S = 5.0
START_TIMEOUT_S = 10.0  # a data plane just started opens its control socket within this
SOCKET_PATH_MAX = 107  # bytes of a Unix socket's path (sun_path holds 108, the last a NUL)
REPO = Path(__file__).resolve().parents[2]


class DataPlaneMissing(RuntimeError):
    pass


class DataPlaneFailed(RuntimeError):
    """A data plane could not be started, or did not answer on its control socket."""


class DataPlaneBusy(RuntimeError):
    """The data plane already has a control plane (it refused this connection)."""


def binary_path() -> Path:
    """The data plane binary: $GATEWAY_DATAPLANE, else the one `make install` puts beside this Python."""
    configured = os.environ.get(BINARY_ENV)
    path = Path(configured) if configured else Path(sys.prefix) / "bin" / BINARY_NAME
    if not os.access(path, os.X_OK):
        where = f"${BINARY_ENV} ({configured})" if configured else str(path)
        raise DataPlaneMissing(f"the gateway's data plane binary is not at {where}: build it with `make install` "
                               f"(needs Rust's cargo) or point ${BINARY_ENV} at it")
    return path


def control_socket_path(host: str, port: int) -> Path:
    """The control socket of the gateway listening on host:port, unless --control-socket says otherwise: in
    the platform's state folder ($PLATFORM_STATE_DIR, else the repository's .state, as for the stack), so
    a control plane the stack restarts finds the data plane its predecessor left serving."""
    return Path(os.environ.get("PLATFORM_STATE_DIR") or REPO / ".state") / f"gateway-{host}-{port}.sock"


def encode_table(version: int, table: RoutingTable) -> bytes:
    """A validated table (parse_table refuses control characters, so no field holds a tab or newline)."""
    def arm(role: str, a: Arm) -> str:
        return f"arm\t{role}\t{a.version}\t{a.triton_model}\t{','.join(a.nodes)}\n"

    lines = [f"table\t{version}\n"]
    for name, route in sorted(table.items()):
        weight = route.canary_weight if route.canary else 0
        share = f"\t{route.shadow_share}" if route.shadow is not None else ""
        lines.append(f"model\t{name}\t{weight}{share}\n")
        if route.capture is not None:
            lines.append(f"capture\t{route.capture.fraction!r}\t{route.capture.floor_per_s}\n")
        lines.append(arm("stable", route.stable))
        if route.canary is not None:
            lines.append(arm("canary", route.canary))
        if route.shadow is not None:
            lines.append(arm("shadow", route.shadow))
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


def _connect(path: Path) -> socket.socket | None:
    """A connection to whatever listens at `path`; None when nothing does (no file, or a stale one)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(path))
    except (FileNotFoundError, ConnectionRefusedError):
        sock.close()
        return None
    except OSError as exc:  # not ours to use (another user's socket, a path that is not a folder, ...)
        sock.close()
        raise DataPlaneFailed(f"cannot connect to the data plane's control socket {path}: {exc}") from exc
    return sock


def _start(path: Path, args: list[str]) -> tuple[socket.socket, subprocess.Popen[bytes]]:
    """A new data plane with `args`, in a session of its own (a signal to the control plane's process group
    does not reach it), and a connection to its control socket at `path`."""
    binary = binary_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([str(binary), *args, "--control-socket", str(path)], stdin=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + START_TIMEOUT_S
    while (sock := _connect(path)) is None:
        if proc.poll() is not None:
            raise DataPlaneFailed(f"the data plane exited with status {proc.returncode} (its log says why)")
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise DataPlaneFailed(f"the data plane did not open its control socket {path} "
                                  f"within {START_TIMEOUT_S:.0f}s")
        time.sleep(0.02)
    return sock, proc


def _first_frame(sock: socket.socket) -> tuple[bytes, bytes]:
    """The frame a data plane greets a connection with: (b"H", its pid) or (b"R", why it refused)."""
    sock.settimeout(ACK_TIMEOUT_S)
    try:
        head = _recv_exactly(sock, 5)
        payload = _recv_exactly(sock, struct.unpack("<I", head[1:])[0])
    except OSError as exc:  # a timeout included
        raise DataPlaneFailed(f"no answer on the data plane's control socket ({exc!r})") from exc
    sock.settimeout(None)
    return head[:1], payload


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionResetError("the data plane closed the connection")
        data += chunk
    return data


class DataPlane:
    """The control connection to a running data plane: `apply` sends a table and waits until the data plane
    has it in use; samples are handed to `on_sample` from a reader thread. `on_sample` must not block (the
    applied notices come down the same connection): it returns False for a sample it dropped, which the
    data plane then counts in gateway_samples_dropped_total with its own. `pid` is the data plane's
    process; `proc` is it when this control plane started it, None when it adopted a running one.
    `closed` is set when the connection ends: the data plane exited."""

    def __init__(self, sock: socket.socket, pid: int, proc: subprocess.Popen[bytes] | None,
                 on_sample: Callable[[dict[str, bytes]], bool] | None = None) -> None:
        self.sock, self.pid, self.proc, self.on_sample = sock, pid, proc, on_sample
        self.applied = 0
        self.closed = threading.Event()
        self._changed = threading.Condition()
        self._write = threading.Lock()
        self._reader = threading.Thread(target=self._read, name="dataplane-reader", daemon=True)
        self._reader.start()

    @classmethod
    def attach(cls, path: Path, args: list[str],
               on_sample: Callable[[dict[str, bytes]], bool] | None = None) -> DataPlane:
        """Adopt the data plane whose control socket is `path`, or, when none listens there, start one with
        `args`. DataPlaneBusy: another control plane holds it; DataPlaneFailed: a new one did not come up;
        DataPlaneMissing: there is no binary to start."""
        if len(os.fsencode(path)) > SOCKET_PATH_MAX:
            raise DataPlaneFailed(f"the control socket path {path} is longer than a Unix socket's "
                                  f"{SOCKET_PATH_MAX} bytes: choose a shorter one with --control-socket")
        proc = None
        sock = _connect(path)
        if sock is None:
            sock, proc = _start(path, args)
        try:
            kind, payload = _first_frame(sock)
        except DataPlaneFailed:
            sock.close()
            raise
        if kind != b"H":
            sock.close()
            raise DataPlaneBusy(payload.decode(errors="replace"))
        pid = int(payload)
        if proc is not None and proc.pid != pid:
            # Ours lost the port to another control plane's, started at the same moment: that one is adopted.
            proc = None
        return cls(sock, pid, proc, on_sample)

    def _read(self) -> None:
        stream = self.sock.makefile("rb")
        try:
            for kind, payload in read_frames(stream):
                if kind == b"A":
                    with self._changed:
                        self.applied = int(payload)
                        self._changed.notify_all()
                elif kind == b"S" and self.on_sample is not None and not self.on_sample(decode_sample(payload)):
                    self._send(b"dropped\t1\n")
        except OSError:  # the connection ended (or was closed here)
            pass
        finally:
            stream.close()
            self.closed.set()
            with self._changed:
                self._changed.notify_all()

    def _send(self, data: bytes) -> None:
        with self._write:
            self.sock.sendall(data)

    def apply(self, version: int, table: RoutingTable) -> bool:
        """Send a table; True once the data plane reports it in use (False: not within ACK_TIMEOUT_S)."""
        try:
            self._send(encode_table(version, table))
        except OSError:
            return False
        with self._changed:
            return self._changed.wait_for(lambda: self.applied >= version or self.closed.is_set(),
                                          ACK_TIMEOUT_S) and self.applied >= version

    def exit_status(self, timeout_s: float = 5.0) -> int | None:
        """The status the data plane exited with, when this control plane started it (None otherwise)."""
        if self.proc is None:
            return None
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, timeout_s: float = 5.0) -> int:
        """Tell the data plane to exit and wait until it has (its connection ends); SIGTERM, then SIGKILL,
        if it does not. Its exit status when this control plane started it, else 0 once it is gone."""
        try:
            self._send(b"stop\n")
        except OSError:
            pass
        code = 0
        for sig in (None, signal.SIGTERM, signal.SIGKILL):
            if sig is not None:
                log.warning("the data plane (pid %d) has not stopped: sending it %s", self.pid, sig.name)
                code = -sig
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, sig)
            if self.closed.wait(timeout_s):
                break
        self.sock.close()
        status = self.exit_status(timeout_s)
        return code if status is None else status
