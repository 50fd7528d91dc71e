"""Guest service for the connection-rate bench: accept, write one byte, close.

Runs inside the bench namespace (``ip netns exec sp-bench-<hex> python byteserver.py``).
One thread, blocking sockets: the bench connects sequentially, so there is never more than
one connection to serve, and the server adds the least possible time of its own.

The server closes first (after its byte), so its side holds TIME_WAIT; the client's
ephemeral ports are not used up by a long run.
"""

from __future__ import annotations

import argparse
import contextlib
import socket
import time

BACKLOG = 1024
ACCEPT_POLL = 1.0  # seconds; how often the lifetime bound is checked while idle
PAYLOAD = b"x"


def serve(host: str, port: int, lifetime: float) -> None:
    """Serve until killed or until ``lifetime`` seconds have passed (a crashed bench's leftover
    does not run forever)."""
    deadline = time.monotonic() + lifetime
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(BACKLOG)
        sock.settimeout(ACCEPT_POLL)
        print(f"ready {host}:{port}", flush=True)
        while time.monotonic() < deadline:
            try:
                conn, _ = sock.accept()
            except TimeoutError:
                continue
            except OSError:  # client gave up between SYN and accept
                continue
            with conn, contextlib.suppress(OSError):  # the client gave up early
                conn.sendall(PAYLOAD)


def main() -> None:
    """Parse arguments and serve."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="0.0.0.0")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--lifetime", type=float, default=3600.0,
                    help="exit after this many seconds (default: %(default)s)")
    args = ap.parse_args()
    serve(args.host, args.port, args.lifetime)


if __name__ == "__main__":
    main()
