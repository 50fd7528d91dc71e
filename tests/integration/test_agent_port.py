"""The agent port under a hostile guest (issue 16, point 4): a body cap on the bytes read
(chunked or not), a head timeout, an idle timeout and a per-sandbox connection cap, on a
real gateway with a real sandbox, sent from inside the sandbox's namespace (or from the
host where the source does not matter)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from typing import Any

import httpx
import pytest

from sandport.config import AgentLimits
from sandport.control.gateway import Gateway

pytestmark = pytest.mark.integration

HEAD_TIMEOUT, IDLE_TIMEOUT, PER_SOURCE = 1.5, 2.0, 3


@pytest.fixture(scope="module")
def gw(gateway_factory: Any) -> Gateway:
    gateway: Gateway = gateway_factory(agent_limits=AgentLimits(
        head_timeout=HEAD_TIMEOUT, idle_timeout=IDLE_TIMEOUT, max_per_source=PER_SOURCE))
    return gateway


@pytest.fixture(scope="module")
def sandbox(gw: Gateway) -> dict[str, Any]:
    r = httpx.post(gw.base_url + "/api/sandboxes", json={}, headers=admin(gw), timeout=90)
    assert r.status_code == 201, r.text
    return dict(r.json())


def admin(gw: Gateway) -> dict[str, str]:
    return {"Authorization": f"Bearer {gw.admin_token}"}


def agent_addr(gw: Gateway) -> tuple[str, int]:
    return str(gw.config.net.gateway_ip), gw.config.agent_port


def in_sandbox(sandbox_id: str, code: str, *args: str,
               timeout: float = 60) -> dict[str, Any]:
    """Run Python ``code`` in the sandbox's namespace; its last stdout line is JSON."""
    out = subprocess.run(["ip", "netns", "exec", f"sp-{sandbox_id}", sys.executable, "-c",
                          code, *args], capture_output=True, text=True, timeout=timeout,
                         check=False)
    assert out.returncode == 0, out.stderr
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def peak_rss_kib() -> int:
    """The peak RSS of this process, which runs the gateway (VmHWM)."""
    with open("/proc/self/status") as f:
        return next(int(x.split()[1]) for x in f if x.startswith("VmHWM:"))


#: A chunked POST of ``total`` bytes of JSON in 16 KiB chunks; stops at the first answer.
CHUNKED = r"""
import json, select, socket, sys, time
host, port, path, token, prefix, total = sys.argv[1:7]
s = socket.create_connection((host, int(port)), timeout=10)
s.sendall((f"POST {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n"
           "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n").encode())
def chunk(b): return b"%x\r\n" % len(b) + b + b"\r\n"
s.sendall(chunk(prefix.encode()))
piece, sent, answer, t0 = chunk(b"x" * 16384), 0, b"", time.monotonic()
try:
    while sent < int(total) and not select.select([s], [], [], 0)[0]:
        s.sendall(piece); sent += 16384
    if sent >= int(total):
        s.sendall(chunk(b'"}' + b"}" * prefix.count("{", 1)) + b"0\r\n\r\n")
except OSError as exc:
    answer = repr(exc).encode()
s.settimeout(10)
try:
    while True:
        more = s.recv(65536)
        if not more: break
        answer += more
except OSError as exc:
    answer += repr(exc).encode()
print(json.dumps({"sent": sent, "answer": answer.decode(errors="replace"),
                  "seconds": time.monotonic() - t0}))
"""


def _chunked(gw: Gateway, sandbox: dict[str, Any], path: str, prefix: str,
             total: int) -> dict[str, Any]:
    token = gw.roster[sandbox["id"]].spec.secrets["agent_token"]
    host, port = agent_addr(gw)
    return in_sandbox(sandbox["id"], CHUNKED, host, str(port), path, token, prefix,
                      str(total))


def test_chunked_oversize_bodies_get_413_and_are_never_buffered(
        gw: Gateway, sandbox: dict[str, Any]) -> None:
    sid, total = sandbox["id"], 48 * 1024 * 1024
    creds = f"/api/sandboxes/{sid}/credentials"

    def stored() -> list[Any]:
        r = httpx.get(gw.base_url + creds, headers=admin(gw), timeout=10)
        return list(r.json()["credentials"])

    before_creds = stored()
    peak = peak_rss_kib()
    report = _chunked(gw, sandbox, f"/api/sandboxes/{sid}/agent/report", '{"pad": "', total)
    posted = _chunked(gw, sandbox, creds, '{"data": {"pad": "', total)
    grew = (peak_rss_kib() - peak) / 1024
    for out in (report, posted):
        assert out["answer"].startswith("HTTP/1.1 413 "), out
        doc = json.loads(out["answer"].split("\r\n\r\n", 1)[1].splitlines()[0])
        assert doc["error"] == "too_large" and "65536" in doc["message"], doc
        assert out["sent"] < 4 * 1024 * 1024, out  # refused at once, not at the end
    assert grew < 16, f"the gateway's peak RSS grew by {grew:.0f} MiB"
    assert stored() == before_creds  # nothing stored
    # A declared Content-Length over the cap never reaches the app either.
    token = gw.roster[sid].spec.secrets["agent_token"]
    with socket.create_connection(agent_addr(gw), timeout=5) as s:
        s.sendall(f"POST {creds} HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {token}\r\n"
                  f"Content-Length: {total}\r\n\r\n".encode())
        assert s.recv(4096).startswith(b"HTTP/1.1 413 ")


def test_a_report_under_the_cap_still_arrives_chunked_and_plain(
        gw: Gateway, sandbox: dict[str, Any]) -> None:
    sid = sandbox["id"]
    out = _chunked(gw, sandbox, f"/api/sandboxes/{sid}/agent/report",
                   '{"from_test": 1, "pad": "', 32 * 1024)
    assert out["answer"].startswith("HTTP/1.1 204 "), out
    doc = httpx.get(f"{gw.base_url}/api/sandboxes/{sid}", headers=admin(gw),
                    timeout=10).json()["agent"]
    # The agent's own periodic report may have replaced it since; either came through.
    assert doc["report"] is not None


def test_the_front_names_the_real_source_not_a_forged_one(
        gw: Gateway, sandbox: dict[str, Any]) -> None:
    """The host (the bridge address as source) claiming the sandbox's address in
    X-Forwarded-For is still the host: the app trusts only the front's header."""
    sid = sandbox["id"]
    token = gw.roster[sid].spec.secrets["agent_token"]
    host, port = agent_addr(gw)
    r = httpx.post(f"http://{host}:{port}/api/sandboxes/{sid}/agent/report", json={},
                   headers={"Authorization": f"Bearer {token}",
                            "X-Forwarded-For": sandbox["ip"]}, timeout=10)
    assert r.status_code == 403 and f"not {host}" in r.json()["message"], r.text


def _closed_after(s: socket.socket, limit: float) -> tuple[float, bytes]:
    """Read until the gateway closes; (seconds it took, what came)."""
    t0, got = time.monotonic(), b""
    s.settimeout(limit)
    try:
        while more := s.recv(4096):
            got += more
    except TimeoutError:
        return float("inf"), got
    except ConnectionResetError:
        pass
    return time.monotonic() - t0, got


def test_a_slow_head_is_closed_by_the_head_timeout(gw: Gateway) -> None:
    with socket.create_connection(agent_addr(gw), timeout=5) as s:
        s.sendall(b"POST /api/sandboxes/x/agent/report HTTP/1.1\r\nHost: a\r\n")
        t0 = time.monotonic()
        answer = b""
        try:  # a byte every 0.2 s: never idle, never a whole head
            while time.monotonic() - t0 < HEAD_TIMEOUT + 4:
                s.sendall(b"X")
                s.settimeout(0.2)
                try:
                    answer = s.recv(4096)
                    break
                except TimeoutError:
                    continue
        except OSError:
            pass
        took = time.monotonic() - t0
        rest = _closed_after(s, 3)[1] if answer else b""
    assert answer.startswith(b"HTTP/1.1 408 "), (answer, took)
    assert b"head_timeout" in answer + rest
    assert HEAD_TIMEOUT - 0.3 < took < HEAD_TIMEOUT + 2, took


def test_an_idle_keep_alive_connection_is_closed_by_the_idle_timeout(gw: Gateway) -> None:
    with socket.create_connection(agent_addr(gw), timeout=5) as s:
        s.sendall(b"GET /nothing HTTP/1.1\r\nHost: a\r\n\r\n")
        first = s.recv(4096)
        assert first.startswith(b"HTTP/1.1 404 ") and b"connection: close" not in first.lower()
        took, rest = _closed_after(s, IDLE_TIMEOUT + 4)
    assert rest == b""  # closed, without an answer nobody asked for
    assert IDLE_TIMEOUT - 0.3 < took < IDLE_TIMEOUT + 1.5, took  # uvicorn's own: 5 s


CAP = r"""
import json, socket, sys, time
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
def open_one():
    s = socket.create_connection((host, port), timeout=5)
    s.sendall(b"GET /nothing HTTP/1.1\r\nHost: a\r\n\r\n")
    return s
held = [open_one() for _ in range(n)]
firsts = [s.recv(4096)[:12].decode() for s in held]
t0 = time.monotonic()
over = open_one()
over.settimeout(5)
answer = b""
try:
    while more := over.recv(4096): answer += more
except OSError as exc:
    answer += repr(exc).encode()
refused_in = time.monotonic() - t0
held.pop().close()
time.sleep(0.3)
again = open_one()
print(json.dumps({"firsts": firsts, "over": answer.decode(errors="replace"),
                  "refused_in": refused_in, "again": again.recv(4096)[:12].decode()}))
"""


def test_connections_over_the_per_sandbox_cap_are_refused_at_once(
        gw: Gateway, sandbox: dict[str, Any]) -> None:
    host, port = agent_addr(gw)
    out = in_sandbox(sandbox["id"], CAP, host, str(port), str(PER_SOURCE))
    assert out["firsts"] == ["HTTP/1.1 404"] * PER_SOURCE, out
    assert out["over"].startswith("HTTP/1.1 429 "), out
    assert "too_many_connections" in out["over"] and out["refused_in"] < 1, out
    assert out["again"] == "HTTP/1.1 404", out  # a freed place is taken again
