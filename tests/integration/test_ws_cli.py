"""``sandport ws`` takes websockify's command lines: each one here runs both programs.

A command line is run with ``websockify`` and then, unchanged, with ``sandport ws`` in its
place; the same client must get the same bytes back from both.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from websockets.asyncio.client import connect

from conftest import require_programs, require_root
from nethelpers import RemoteHost, echo_guest, free_port

pytestmark = pytest.mark.integration

SANDPORT = [sys.executable, "-m", "sandport", "ws"]


@pytest.fixture(scope="module")
def guest(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RemoteHost]:
    require_root()
    with echo_guest(tmp_path_factory.mktemp("echo")) as r:
        yield r


@contextlib.contextmanager
def running(argv: list[str], port: int, cwd: Path) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        deadline = time.monotonic() + 20
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                out = proc.communicate(timeout=5)[0] if proc.poll() is not None else ""
                raise AssertionError(f"{argv} did not listen on {port}: {out}")
            time.sleep(0.05)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def echo(uri: str, payload: bytes, ctx: ssl.SSLContext | None = None) -> bytes:
    async def main() -> bytes:
        kw = {"ssl": ctx} if ctx is not None else {}
        async with connect(uri, subprotocols=["binary"], max_size=None, open_timeout=10,
                           **kw) as ws:  # type: ignore[arg-type]
            await ws.send(payload)
            got = b""
            while len(got) < len(payload):
                got += await ws.recv()  # type: ignore[operator]
            return got

    return asyncio.run(main())


@pytest.mark.parametrize("program", ["websockify", "sandport"])
@pytest.mark.parametrize("shape", ["token-plugin", "target-config", "web", "cert"])
def test_websockify_command_lines(program: str, shape: str, guest: RemoteHost,
                                  tmp_path: Path) -> None:
    """The command lines of websockify's README and man page, as users have them."""
    require_programs("websockify", "openssl")
    port = free_port()
    target = f"{guest.ip}:7"
    tokens = tmp_path / "tokens.cfg"
    tokens.write_text(f"# token: host:port\nsandbox1: {target}\n")
    web = tmp_path / "novnc"
    web.mkdir()
    (web / "vnc.html").write_text("<title>noVNC</title>")
    scheme, ctx, path = "ws", None, "/websockify"
    if shape == "token-plugin":
        args = ["--token-plugin", "TokenFile", "--token-source", str(tokens), str(port)]
        path = "/websockify?token=sandbox1"
    elif shape == "target-config":
        args = [f"--target-config={tokens}", str(port)]
        path = "/websockify?token=sandbox1"
    elif shape == "web":
        args = ["--web", str(web), str(port), target]
    else:  # README: openssl req -new -x509 -days 365 -nodes -out self.pem -keyout self.pem
        subprocess.run(["openssl", "req", "-new", "-x509", "-days", "365", "-nodes", "-out",
                        "self.pem", "-keyout", "self.pem", "-subj", "/CN=localhost"],
                       cwd=tmp_path, check=True, capture_output=True)
        args = ["--ssl-only", str(port), target]  # ./self.pem is the default --cert
        scheme = "wss"
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    argv = [shutil.which("websockify") or "websockify", *args] if program == "websockify" \
        else [*SANDPORT, *args]
    with running(argv, port, tmp_path):
        payload = os.urandom(100_000)
        assert echo(f"{scheme}://127.0.0.1:{port}{path}", payload, ctx) == payload
        if shape == "web":
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                s.sendall(b"GET /vnc.html HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                data = b""
                while chunk := s.recv(65536):
                    data += chunk
            assert data.startswith(b"HTTP/1.") and b" 200 " in data.split(b"\r\n")[0]
            assert data.endswith(b"<title>noVNC</title>")


def test_run_once_and_idle_timeout_end_the_server(guest: RemoteHost, tmp_path: Path) -> None:
    port = free_port()
    with running([*SANDPORT, "--run-once", str(port), f"{guest.ip}:7"], port, tmp_path) as p:
        assert echo(f"ws://127.0.0.1:{port}/", b"once") == b"once"
        assert p.wait(10) == 0
    port = free_port()
    with running([*SANDPORT, "--idle-timeout", "0.5", str(port), f"{guest.ip}:7"], port,
                 tmp_path) as p:
        assert p.wait(10) == 0
        assert "--idle-timeout 0.5 s without a session" in (p.stdout.read() if p.stdout else "")


def test_timeout_and_log_file(guest: RemoteHost, tmp_path: Path) -> None:
    port, log = free_port(), tmp_path / "ws.log"
    with running([*SANDPORT, "--timeout", "1", "--log-file", str(log), str(port),
                  f"{guest.ip}:7"], port, tmp_path) as p:
        assert echo(f"ws://127.0.0.1:{port}/", b"logged") == b"logged"
        assert p.wait(10) == 0  # --timeout: exits a second after start
    text = log.read_text()
    assert f"-> {guest.ip}:7 (binary)" in text and "exiting: --timeout 1 s" in text


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["6080"], "give exactly one of TARGET_ADDR:TARGET_PORT"),
        (["6080", "localhost"], "is not HOST:PORT"),
        (["http", "localhost:5900"], "is not [SOURCE_ADDR:]SOURCE_PORT"),
        (["6080", "localhost:5900", "--", "vncserver"], "wrap mode is not supported"),
        (["-D", "6080", "localhost:5900"], "run it under systemd"),
        (["--auth-plugin", "BasicHTTPAuth", "6080", "localhost:5900"], "auth plugins"),
        # each refused websockify option says what to do instead, naming itself once
        (["--record", "x", "6080", "localhost:5900"], "--record: session recording is not "
         "supported: drop --record"),
        (["--syslog", "x", "6080", "localhost:5900"], "error: --syslog: not supported: use "
         "--log-file"),
        (["--web-auth", "6080", "localhost:5900"], "error: --web-auth: not supported (it "
         "needs an auth plugin): use token files"),
        (["--token-plugin", "TokenRedis", "--token-source", "x", "6080"], "not supported"),
        (["--token-plugin", "TokenFile", "--token-source", "/nonexistent", "6080"],
         "does not exist"),
        (["--ssl-only", "6080", "localhost:5900"], "--ssl-only needs a certificate"),
        (["--cert", "/nonexistent.pem", "6080", "localhost:5900"], "no such file"),
        (["--trusted-proxy", "lan", "6080", "localhost:5900"], "is not an address"),
    ],
)
def test_bad_command_lines_exit_2_with_a_message(args: list[str], needle: str,
                                                 tmp_path: Path) -> None:
    r = subprocess.run([*SANDPORT, *args], capture_output=True, text=True, timeout=30,
                       cwd=tmp_path)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert needle in r.stderr
    assert "Traceback" not in r.stderr


def test_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        r = subprocess.run([*SANDPORT, f"127.0.0.1:{port}", "localhost:5900"],
                           capture_output=True, text=True, timeout=30, cwd=tmp_path)
    assert r.returncode == 2
    assert f"127.0.0.1:{port} is already in use" in r.stderr


def test_help_teaches() -> None:
    r = subprocess.run([*SANDPORT, "--help"], capture_output=True, text=True, timeout=30,
                       env={**os.environ, "COLUMNS": "120"})
    assert r.returncode == 0
    for word in ("[SOURCE_ADDR:]SOURCE_PORT", "--token-plugin", "--web", "--cert", "Examples",
                 "--origin", "--unix-target"):
        assert word in r.stdout, word
