"""Small holes closed (issue 16, point 5), each through the real gateway's front door:

* a port key of Unicode digits (``/s/ID/ports/%C2%B2/ws``: '²'.isdigit() but int('²')
  fails) is a 404 with a JSON body, never a 500; a port spec of them (``-p 1²:80``) a
  4xx naming it; the desktop route's ``?port=`` and the event stream's ``Last-Event-ID``
  are no 500 either;
* an attach ``name`` or a retarget ``reason`` with CR/LF (or any control character, or
  a Unicode line separator) cannot forge log lines: 422 naming the field through the API,
  exit 2 through the CLI, UsageError from Python;
* the state dir is private whatever umask the gateway was started with: after a start
  under umask 0 and a sandbox, nothing in it has a group or other bit (the guests' own
  /tmp aside), and what an older gateway left 0644 is made 0600.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from attachhelpers import api_post
from conftest import require_root, test_net_names
from sandport.control.gateway import Gateway
from sandport.errors import UsageError

pytestmark = pytest.mark.integration


def raw_http(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send ``request`` as it is; the status, headers (lower-case names) and the body
    read so far (an event stream is not read to its end)."""
    with socket.create_connection(("127.0.0.1", port), timeout=15) as s:
        s.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in
                   (line.partition(":") for line in lines[1:])}
        length = int(headers.get("content-length", "0") or 0)
        while len(body) < length:
            chunk = s.recv(65536)
            if not chunk:
                break
            body += chunk
    return int(lines[0].split()[1]), headers, body


def test_unicode_digits_as_a_port_are_a_4xx_with_json(
        gateway_factory: Any, loop_thread: Any) -> None:
    gw: Gateway = gateway_factory()
    info = loop_thread.run(gw.create_sandbox())
    try:
        for key in ("%C2%B2", "%C2%B9%C2%B2", "%D9%A3", "%EF%BC%95", "0x10", "+5", "%205"):
            status, headers, body = raw_http(gw.http_port, (
                f"GET /s/{info.id}/ports/{key}/ws?token={info.token} HTTP/1.1\r\n"
                "Host: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n").encode())
            assert status == 404, (key, status, body)
            assert headers["content-type"].startswith("application/json")
            assert json.loads(body)["error"] == "unknown_port", body
        # The API's port specs: the same digits are no port number.
        for spec in ("1\u00b2:80", "18080:\u00b2"):
            status, doc = api_post(gw, f"/api/sandboxes/{info.id}/forwards",
                                   {"publish": [spec]})
            assert 400 <= status < 500 and "not a port number" in doc["message"], doc
        # The desktop route's ?port= is "console" or the desktop: never a 500.
        status, headers, _ = raw_http(gw.http_port, (
            f"GET /s/{info.id}/?port=%C2%B2&token={info.token} HTTP/1.1\r\n"
            "Host: 127.0.0.1\r\nConnection: close\r\n\r\n").encode())
        assert status == 302 and "/novnc/vnc.html#" in headers["location"], status
        # Last-Event-ID: '²' (one latin-1 byte) is no event id: the stream starts anyway.
        status, headers, _ = raw_http(gw.http_port, (
            b"GET /api/events HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Authorization: Bearer " + gw.admin_token.encode() + b"\r\n"
            b"Accept: text/event-stream\r\nLast-Event-ID: \xb2\r\n\r\n"))
        assert status == 200 and headers["content-type"].startswith("text/event-stream")
    finally:
        loop_thread.run(gw.destroy_sandbox(info.id))


FORGED = ["by-cli\r\n2026-01-01 INFO sandport: admin logged in", "a\nb", "tab\there",
          "line\u2028separator", "nul\x00", "bidi\u202eevil", "x" * 65]


def test_names_and_reasons_cannot_forge_log_lines(gateway_factory: Any,
                                                  loop_thread: Any) -> None:
    gw: Gateway = gateway_factory()
    for name in FORGED:
        status, doc = api_post(gw, "/api/attach", {"ip": "10.99.0.2", "name": name})
        assert status == 422 and "body.name" in doc["message"], (name, status, doc)
        status, doc = api_post(gw, "/api/sandboxes/abc123/target",
                               {"gone": True, "reason": name * 4})
        assert status == 422 and "body.reason" in doc["message"], (name, status, doc)
        with pytest.raises(UsageError, match="the name"):
            loop_thread.run(gw.attach(ip="10.99.0.2", name=name))
    # Printable names in any script are fine (refused here for the address only).
    status, doc = api_post(gw, "/api/attach", {"ip": "10.99.0.2", "name": "vm-1 Ünïcødé 名前"})
    assert status == 403 and doc["error"] == "forbidden_target", doc

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "sandport", *args, "--state-dir",
                               str(gw.config.state_dir)], capture_output=True, text=True,
                              timeout=120, check=False)

    r = cli("attach", FORGED[0], "--ip", "10.99.0.2")
    assert r.returncode == 2 and "name" in r.stderr and "control character" in r.stderr, \
        r.stderr
    assert "Traceback" not in r.stderr
    r = cli("retarget", "abc123", "--gone", "--reason", "gone\nINFO forged")
    assert r.returncode == 2 and "reason" in r.stderr and "Traceback" not in r.stderr, \
        r.stderr
    assert gw.sandbox_ids() == []


def test_the_state_dir_is_private_whatever_the_umask(loop_thread: Any,
                                                     tmp_path: Path) -> None:
    from sandport.config import GatewayConfig, NetConfig

    require_root()
    state = tmp_path / "state"
    # What an older gateway (under umask 022, or 000) left behind.
    (state / "sandboxes" / "0ld000" / "logs").mkdir(parents=True, mode=0o755)
    state.chmod(0o755)
    (state / "sandboxes" / "0ld000" / "logs" / "xvnc.log").write_text("old\n")
    (state / "sandboxes" / "0ld000" / "logs" / "xvnc.log").chmod(0o644)
    (state / "sandboxes" / "0ld000" / "tmp").mkdir(mode=0o1777)
    (state / "sandboxes" / "0ld000" / "tmp").chmod(0o1777)
    (state / "sandboxes" / "0ld000" / "tmp" / "guest-file").write_text("the guest's")
    (state / "sandboxes" / "0ld000" / "tmp" / "guest-file").chmod(0o666)
    before = os.umask(0)
    try:
        bridge, subnet = test_net_names()
        gw = Gateway(GatewayConfig(listen_host="127.0.0.1", listen_port=0, state_dir=state,
                                   net=NetConfig(bridge=bridge, subnet=subnet),
                                   ready_timeout=60))
        loop_thread.run(gw.start())
        try:
            info = loop_thread.run(gw.create_sandbox())
            assert info.state == "ready"
            wide = loose_modes(state)
            assert (state / "sandport.db").exists() and \
                (state / "sandboxes" / info.id / "logs").is_dir()
            assert any(p.name == "pids.json" for p in (state / "sandboxes" / info.id).iterdir())
            assert wide == [], wide
            assert os.umask(0o077) == 0o077  # held while it runs
        finally:
            loop_thread.run(gw.stop())
    finally:
        os.umask(before)
    guest = state / "sandboxes" / "0ld000" / "tmp"
    assert stat.S_IMODE(guest.stat().st_mode) == 0o1777  # a guest's /tmp is its own
    assert stat.S_IMODE((guest / "guest-file").stat().st_mode) == 0o666


def loose_modes(state: Path) -> list[str]:
    """Every path under ``state`` (itself included) with a group or other bit, but a
    guest's /tmp and what is in it, and the directory of files handed to a contained
    guest: exactly 0755 (its root must enter it), inside a 0700 workdir."""
    found = []
    for root, dirs, files in os.walk(state):
        if Path(root).parent == state / "sandboxes" and "tmp" in dirs:
            dirs.remove("tmp")
        if Path(root).parent == state / "sandboxes" and "guest" in dirs:
            if stat.S_IMODE(Path(root, "guest").lstat().st_mode) != 0o755:
                found.append(f"not 0755: {Path(root, 'guest').relative_to(state.parent)}")
            if stat.S_IMODE(Path(root).lstat().st_mode) & 0o077:
                found.append(f"workdir open: {Path(root).relative_to(state.parent)}")
            dirs.remove("guest")
            found += [f"{oct(m)} {f.relative_to(state.parent)}"
                      for f in Path(root, "guest").iterdir()
                      if (m := stat.S_IMODE(f.lstat().st_mode)) & 0o077]
        for path in (Path(root), *(Path(root, f) for f in files)):
            mode = stat.S_IMODE(path.lstat().st_mode)
            if mode & 0o077 and not path.is_symlink():
                found.append(f"{oct(mode)} {path.relative_to(state.parent)}")
    return sorted(set(found))
