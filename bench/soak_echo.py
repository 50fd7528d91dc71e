"""The soak's guest echo server: one process, one event loop, any number of idle connections.

Runs inside a sandbox's network namespace (started by ``soak_scale.py`` through
``sandport.sandbox.procs.NSEXEC``). It raises its own ``RLIMIT_NOFILE`` (soft and hard, as
root) to ``--nofile`` so that it is never the limit of the run, prints ``ready <limit>``
once it listens, and echoes every byte back. The test suite's echo server (a thread per
connection) would need 10,000 threads for this.

    python soak_echo.py [--port 7] [--nofile 65536]
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import socket
import sys


class Echo(asyncio.Protocol):
    """Write back what arrives."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Keep the transport."""
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        """Echo it."""
        self.transport.write(data)


def raise_nofile(want: int) -> int:
    """Raise soft and hard ``RLIMIT_NOFILE`` to ``want`` (as far as allowed); the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for limits in ((want, max(want, hard)), (max(soft, min(want, hard)), hard)):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, limits)
            break
        except (ValueError, OSError):
            continue
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


async def serve(port: int, nofile: int) -> None:
    """Listen on every address (backlog 4096), say ready, serve forever."""
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("0.0.0.0", port))
    server = await loop.create_server(Echo, sock=sock, backlog=4096)
    print(f"ready {nofile}", flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    """Command line."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, default=7)
    ap.add_argument("--nofile", type=int, default=65536)
    args = ap.parse_args()
    try:
        asyncio.run(serve(args.port, raise_nofile(args.nofile)))
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
