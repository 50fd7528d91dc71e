"""``sandport ws`` with a large token file: an edit is loaded without stalling the
sessions that are open (the file is parsed in a worker thread, the table swapped in
whole), and the new token works once it is loaded.

A WebSocket session echoes a small message every 20 ms through the bridge to a TCP echo
server on loopback and times each round trip, while the 600k-line file is replaced and a
second client knocks with the token it adds until it is let in.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from nethelpers import free_port

pytestmark = pytest.mark.integration

LINES = 600_000
STALL_LIMIT = 0.5  # seconds: the longest echo round trip allowed while the file reloads
# (an inline reload stalls 2 s or more; a loaded 2-core machine alone adds ~0.1-0.3 s)


@contextlib.contextmanager
def echo_server() -> Iterator[int]:
    """A TCP echo server on 127.0.0.1 (a thread per connection); yields its port."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    srv.settimeout(0.1)
    stop = threading.Event()

    def serve(conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            while data := conn.recv(65536):
                conn.sendall(data)

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except TimeoutError:
                continue
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield srv.getsockname()[1]
    finally:
        stop.set()
        thread.join(5)
        srv.close()


def write_tokens(path: Path, port: int, extra: str) -> None:
    """``LINES`` tokens plus ``extra``."""
    with path.open("w") as f:
        f.writelines(f"t{i:07d}: 127.0.0.1:{port}\n" for i in range(LINES))
        f.write(f"live: 127.0.0.1:{port}\n{extra}")


def test_a_large_token_file_reloads_without_stalling_open_sessions(tmp_path: Path) -> None:
    with echo_server() as echo_port:
        tokens = tmp_path / "tokens"
        write_tokens(tokens, echo_port, "")
        # The edit, written beforehand (this process must not be busy while it measures)
        # and moved into place during the measurement: a new inode, as editors do.
        write_tokens(tmp_path / "tokens.new", echo_port, f"fresh: 127.0.0.1:{echo_port}\n")
        port = free_port()
        log = tmp_path / "ws.log"
        with log.open("w") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "sandport", "ws", "--token-plugin", "TokenFile",
                 "--token-source", str(tokens), f"127.0.0.1:{port}"],
                stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 60
            while socket.socket().connect_ex(("127.0.0.1", port)) != 0:
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.1)
            rtts, loaded_after = asyncio.run(measure(port, tokens))
        finally:
            proc.terminate()
            proc.wait(10)
    worst = max(rtts)
    print(f"{len(rtts)} round trips, worst {worst * 1000:.0f} ms, median "
          f"{sorted(rtts)[len(rtts) // 2] * 1000:.1f} ms; new token in after "
          f"{loaded_after:.2f} s")
    assert len(rtts) > 20
    assert worst < STALL_LIMIT, f"the event loop stalled {worst:.2f} s: {log.read_text()}"
    assert "loading it in the background" in log.read_text()


async def measure(port: int, tokens: Path) -> tuple[list[float], float]:
    """Round trips of an open session while the file is replaced; and how long after
    the replacement the new token was let in."""
    rtts: list[float] = []
    done = asyncio.Event()
    url = f"ws://127.0.0.1:{port}/websockify?token="
    async with connect(url + "live", subprotocols=["binary"], open_timeout=30) as ws:  # type: ignore[list-item]
        async def ping() -> None:
            while not done.is_set():
                t0 = time.perf_counter()
                await ws.send(b"x" * 16)
                got = b""
                while len(got) < 16:
                    got += await ws.recv()  # type: ignore[operator]
                rtts.append(time.perf_counter() - t0)
                await asyncio.sleep(0.02)

        pinger = asyncio.create_task(ping())
        try:
            await asyncio.sleep(1)
            tokens.with_suffix(".new").replace(tokens)
            changed = time.monotonic()
            while True:  # knock with the new token until it is loaded
                try:
                    async with connect(url + "fresh", subprotocols=["binary"],  # type: ignore[list-item]
                                       open_timeout=30) as fresh:
                        await fresh.send(b"hello")
                        assert await fresh.recv() == b"hello"
                        break
                except InvalidStatus as exc:
                    refused = exc.response.status_code
                    assert refused == 403, refused
                assert time.monotonic() - changed < 60, "the new token never loaded"
                await asyncio.sleep(0.05)
            loaded_after = time.monotonic() - changed
            await asyncio.sleep(0.5)
        finally:
            done.set()
            await pinger
    return rtts, loaded_after
