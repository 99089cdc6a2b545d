"""The floor for any proxy written like the gateway (Python protocols on uvloop) on this machine: bytes
relayed both ways between each client connection and a connection of its own to Triton, with no HTTP at
all (no parsing, routing, pooling, metrics or sampling). What it costs per request is what the kernel's
loopback sockets, uvloop and two Python callbacks cost; the gateway can only add to it.

    python -m bench.gateway.floor_proxy LISTEN_PORT UPSTREAM_PORT
"""

from __future__ import annotations

import asyncio
import sys

import uvloop


class _Up(asyncio.Protocol):
    def __init__(self, down: _Down) -> None:
        self.down = down

    def data_received(self, data: bytes) -> None:
        self.down.transport.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.down.transport.close()


class _Down(asyncio.Protocol):
    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.up: asyncio.Transport | None = None
        self.early: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        self.up, _ = await asyncio.get_running_loop().create_connection(lambda: _Up(self), "127.0.0.1",
                                                                         self.upstream_port)
        self.up.writelines(self.early)

    def data_received(self, data: bytes) -> None:
        if self.up is None:
            self.early.append(data)
        else:
            self.up.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.up is not None:
            self.up.close()


async def _serve(port: int, upstream_port: int) -> None:
    server = await asyncio.get_running_loop().create_server(lambda: _Down(upstream_port), "127.0.0.1", port)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    uvloop.run(_serve(int(sys.argv[1]), int(sys.argv[2])))
