"""RFBClient against a real TigerVNC Xvnc (Debian tigervnc-standalone-server).

A plain blocking socket moves the bytes; the sans-I/O client does all the protocol work.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import require
from sandport.proto.rfb import (
    AuthFailed,
    AuthOK,
    ClientState,
    Event,
    PasswordRequired,
    RFBClient,
    SecurityTypes,
    ServerInitReceived,
    ServerVersion,
    Stage,
    obfuscate_password,
)

pytestmark = pytest.mark.integration

DISPLAY = 77  # the VncAuth server; the security-None server uses the next one
PASSWORD = "s3cret"
DESKTOP = "rfbtest"


def _stale(display: int) -> list[Path]:
    """Files Xvnc leaves behind if it dies without cleaning up."""
    return [Path(f"/tmp/.X{display}-lock"), Path(f"/tmp/.X11-unix/X{display}")]


def _xvnc() -> str:
    path = shutil.which("Xvnc") or ("/usr/bin/Xvnc" if Path("/usr/bin/Xvnc").exists() else None)
    require(path is not None, "Xvnc", "apt-get install tigervnc-standalone-server")
    assert path is not None
    return path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass(frozen=True)
class Server:
    port: int
    log: Path


def _wait_for_banner(port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"Xvnc exited with {proc.returncode}:\n{log.read_text(errors='replace')}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
                if sock.recv(12).startswith(b"RFB "):
                    return
        except OSError:
            pass
        time.sleep(0.1)
    pytest.fail(f"no RFB banner on port {port} within 20 s:\n{log.read_text(errors='replace')}")


@contextlib.contextmanager
def _run_xvnc(tmp: Path, security: str, display: int) -> Iterator[Server]:
    xvnc = _xvnc()
    for path in _stale(display):
        if path.exists():
            pytest.fail(f"{path} exists: is another Xvnc using :{display}?")
    passwd = tmp / "passwd"
    passwd.write_bytes(obfuscate_password(PASSWORD))
    passwd.chmod(0o600)
    port = _free_port()
    log = tmp / "xvnc.log"
    argv = [
        xvnc,
        f":{display}",
        "-rfbport",
        str(port),
        "-SecurityTypes",
        security,
        "-PasswordFile",
        str(passwd),
        "-desktop",
        DESKTOP,
        "-geometry",
        "320x200",
        "-localhost",
    ]
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, cwd=tmp, stdout=out, stderr=subprocess.STDOUT)
    try:
        _wait_for_banner(port, proc, log)
        yield Server(port=port, log=log)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        for path in _stale(display):
            path.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def vncauth_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with _run_xvnc(tmp_path_factory.mktemp("xvnc-vncauth"), "VncAuth", DISPLAY) as server:
        yield server


def handshake(port: int, client: RFBClient) -> list[Event]:
    """Drive ``client`` over a blocking socket until it is done, fails or the server closes."""
    events: list[Event] = []
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        while not client.done and client.state is not ClientState.FAILED:
            data = sock.recv(65536)
            if not data:
                client.receive_eof()
                break
            events += client.receive_data(data)
            sock.sendall(client.data_to_send())
    return events


def test_vncauth_right_password(vncauth_server: Server) -> None:
    client = RFBClient(password=PASSWORD)
    events = handshake(vncauth_server.port, client)
    assert client.done
    assert events[0] == ServerVersion(version=(3, 8), negotiated=(3, 8))
    assert events[1] == SecurityTypes(types=(2,), chosen=2)
    assert events[2] == AuthOK()
    assert isinstance(events[3], ServerInitReceived)
    init = events[3].init
    assert (init.width, init.height, init.name) == (320, 200, DESKTOP)
    assert init.pixel_format.bits_per_pixel in (8, 16, 32)


def test_vncauth_wrong_password(vncauth_server: Server) -> None:
    client = RFBClient(password="wrong")
    events = handshake(vncauth_server.port, client)
    assert client.state is ClientState.FAILED
    assert events[-1] == AuthFailed(reason="Authentication failure")


def test_probe_stops_at_security_types(vncauth_server: Server) -> None:
    client = RFBClient(stop_at=Stage.SECURITY_TYPES)
    events = handshake(vncauth_server.port, client)
    assert client.done
    assert events == [
        ServerVersion(version=(3, 8), negotiated=(3, 8)),
        SecurityTypes(types=(2,), chosen=None),
    ]


def test_full_handshake_without_password_is_refused_locally(vncauth_server: Server) -> None:
    with pytest.raises(PasswordRequired):
        handshake(vncauth_server.port, RFBClient())


def test_security_none(tmp_path: Path) -> None:
    """3.8 sends a SecurityResult even for security type None (RFC 6143 section 7.1.3)."""
    with _run_xvnc(tmp_path, "None", DISPLAY + 1) as server:
        client = RFBClient(password=PASSWORD)  # a password is not needed, None is taken
        events = handshake(server.port, client)
    assert client.done
    assert events[1] == SecurityTypes(types=(1,), chosen=1)
    assert events[2] == AuthOK()
    assert isinstance(events[3], ServerInitReceived)
    assert events[3].init.name == DESKTOP
