"""The CLI talks to a gateway through ``sandport.client.Client``, and so do programs.

A stub gateway (a standard library HTTP server on loopback) answers what each test sets
up; it records every request. The client must turn a refusal into an ``ApiError`` with the
gateway's status and message whatever the body is, a gateway that does not answer (or
answers something that is not JSON) into status 0; the CLI must show either as one line
on stderr with exit 2 for a refusal and 1 for a gateway that does not answer, never a
traceback.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from proxytrap import proxy_trap
from sandport.cli import app
from sandport.client import ApiError, Client

pytestmark = pytest.mark.unit

TOKEN = "admin-secret"


@dataclass
class Stub:
    """What the stub gateway answers (by method and path, query excluded) and what it got."""

    url: str
    answers: dict[tuple[str, str], tuple[int, dict[str, str], bytes]] = field(
        default_factory=dict)
    requests: list[tuple[str, str, str, Any]] = field(default_factory=list)

    def answer(self, method: str, path: str, status: int, body: Any = None, *,
               raw: bytes | None = None, headers: dict[str, str] | None = None) -> None:
        data = raw if raw is not None else b"" if body is None else json.dumps(body).encode()
        self.answers[(method, path)] = (status, headers or {}, data)


@pytest.fixture
def stub() -> Iterator[Stub]:
    box: list[Stub] = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def _serve(self) -> None:
            gw = box[0]
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length)) if length else None
            gw.requests.append((self.command, self.path,
                                self.headers.get("Authorization", ""), body))
            status, headers, data = gw.answers.get(
                (self.command, self.path.split("?")[0]),
                (404, {}, b'{"error":"not_found","message":"no such route"}'))
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_DELETE = _serve

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    box.append(Stub(url=f"http://127.0.0.1:{server.server_address[1]}"))
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield box[0]
    finally:
        server.shutdown()
        server.server_close()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize(
    ("status", "raw", "error", "message"),
    [
        (404, b'{"error":"unknown_sandbox","message":"no sandbox \'x\'"}', "unknown_sandbox",
         "no sandbox 'x'"),
        (422, b'{"detail":[{"loc":["body","ttl_seconds"]}]}', "error",
         '[{"loc": ["body", "ttl_seconds"]}]'),
        (502, b"<html>bad gateway</html>", "error", "<html>bad gateway</html>"),
        (500, b'["not", "an", "object"]', "error", '["not", "an", "object"]'),
        (503, b"x" * 100_000, "error", "x" * 2000),
    ],
)
def test_a_refusal_is_an_api_error_with_the_gateways_words(
        stub: Stub, status: int, raw: bytes, error: str, message: str) -> None:
    stub.answer("GET", "/api/sandboxes", status, raw=raw)
    with pytest.raises(ApiError) as caught:
        Client(stub.url, TOKEN).sandboxes()
    assert (caught.value.status, caught.value.error, caught.value.message) == (
        status, error, message)
    assert stub.requests[0][2] == f"Bearer {TOKEN}"


def test_no_answer_and_no_json_are_status_0(stub: Stub) -> None:
    with pytest.raises(ApiError) as caught:
        Client(f"http://127.0.0.1:{_closed_port()}", TOKEN, timeout=5).sandboxes()
    assert caught.value.status == 0 and caught.value.error == "unreachable"
    stub.answer("GET", "/api/forwards", 200, raw=b"<html>a proxy's page</html>")
    with pytest.raises(ApiError) as caught:
        Client(stub.url, TOKEN).forwards()
    assert caught.value.status == 0 and caught.value.error == "bad_answer"
    with pytest.raises(ApiError, match="not an http"):
        Client("ftp://example", TOKEN).sandboxes()


def test_the_calls_the_cli_needs(stub: Stub) -> None:
    gw = Client(stub.url, TOKEN)
    sb = gw.sandbox("ab/c", fetch=False)
    assert sb.id == "ab/c" and stub.requests == []  # a handle asks nothing
    stub.answer("GET", "/api/sandboxes/ab%2Fc/logs", 200, raw=b"boot\xff ok\n",
                headers={"x-next-offset": "9", "x-logs": "serial,qemu"})  # as uvicorn sends
    chunk = sb.logs("serial")
    assert (chunk.text, chunk.next_offset, chunk.names) == ("boot\ufffd ok\n", 9,
                                                            ("serial", "qemu"))
    assert stub.requests[-1][1] == "/api/sandboxes/ab%2Fc/logs?name=serial&offset=-65536"
    follow = sb.follow_logs("serial", interval=0.01)
    next(follow), next(follow)
    assert stub.requests[-1][1].endswith("offset=9")  # goes on where the last read ended
    stub.answer("GET", "/api/sandboxes/ab%2Fc/doctor", 200, {"sandbox": "ab/c"})
    assert sb.doctor(port="vnc", token="t k") == {"sandbox": "ab/c"}
    assert stub.requests[-1][1] == "/api/sandboxes/ab%2Fc/doctor?port=vnc&token=t+k"
    stub.answer("GET", "/api/sandboxes/ab%2Fc/tokens", 200, {"tokens": [{"id": "t1"}]})
    assert sb.tokens() == [{"id": "t1"}]
    stub.answer("GET", "/api/forwards", 200, {"forwards": [{"id": "f1"}]})
    assert gw.forwards() == [{"id": "f1"}]
    stub.answer("DELETE", "/api/sandboxes/ab%2Fc", 204)
    sb.delete()
    assert stub.requests[-1][:2] == ("DELETE", "/api/sandboxes/ab%2Fc")


@pytest.fixture
def state_dir(tmp_path: Path, stub: Stub) -> Path:
    (tmp_path / "gateway.json").write_text(json.dumps(
        {"pid": 4242, "url": stub.url, "admin_token": TOKEN}))
    return tmp_path


def cli(*args: str) -> Any:
    return CliRunner().invoke(app, list(args), prog_name="sandport")


def test_the_cli_shows_a_refusal_in_one_line_and_exits_2(stub: Stub, state_dir: Path) -> None:
    stub.answer("DELETE", "/api/sandboxes/nope", 404,
                {"error": "unknown_sandbox", "message": "no sandbox 'nope'"})
    r = cli("sandbox", "rm", "nope", "--state-dir", str(state_dir))
    assert r.exit_code == 2, r.output
    assert "error: the gateway answered 404: no sandbox 'nope'" in r.stderr
    assert "Traceback" not in r.output
    stub.answer("POST", "/api/sandboxes/fc/target", 409,
                {"error": "conflict", "message": "fc is not attached"})
    r = cli("retarget", "fc", "--gone", "--reason", "stopped", "--state-dir", str(state_dir))
    assert r.exit_code == 2 and "answered 409: fc is not attached" in r.stderr
    assert stub.requests[-1][3] == {"gone": True, "reason": "stopped"}


def test_the_cli_says_when_the_gateway_does_not_answer(state_dir: Path) -> None:
    (state_dir / "gateway.json").write_text(json.dumps(
        {"pid": 4242, "url": f"http://127.0.0.1:{_closed_port()}", "admin_token": TOKEN}))
    r = cli("sandbox", "list", "--state-dir", str(state_dir))
    assert r.exit_code == 1, r.output
    assert "gateway pid 4242" in r.stderr and "does not answer" in r.stderr
    assert "hint: is it still running?" in r.stderr and "Traceback" not in r.output
    r = cli("sandbox", "list", "--state-dir", str(state_dir / "nowhere"))
    assert r.exit_code == 2 and "no gateway runs with state dir" in r.stderr


def test_the_cli_prints_what_the_client_fetched(stub: Stub, state_dir: Path) -> None:
    stub.answer("GET", "/api/forwards", 200, {"forwards": [{"id": "f1"}]})
    r = cli("forward", "list", "--json", "--state-dir", str(state_dir))
    assert r.exit_code == 0 and json.loads(r.stdout) == [{"id": "f1"}]
    stub.answer("GET", "/api/sandboxes/s1/logs", 200, raw=b"booted\n",
                headers={"X-Next-Offset": "7"})
    r = cli("sandbox", "logs", "s1", "--name", "serial", "--state-dir", str(state_dir))
    assert r.exit_code == 0 and r.stdout == "booted\n"
    stub.answer("GET", "/api/sandboxes/s1/tokens", 200, {"tokens": []})
    r = cli("token", "list", "s1", "--state-dir", str(state_dir))
    assert r.exit_code == 0 and "no access tokens" in r.stderr


def test_the_admin_token_never_goes_to_a_proxy_from_the_environment(
        stub: Stub, state_dir: Path) -> None:
    """http_proxy, HTTPS_PROXY, ALL_PROXY ... point at a trap on loopback: the Client (a
    fresh process, as a program would be) and the CLI go straight to the gateway, and the
    trap sees nothing, not even a connection."""
    stub.answer("GET", "/api/forwards", 200, {"forwards": [{"id": "f1"}]})
    with proxy_trap() as trap:
        env = {**os.environ, **trap.env()}
        program = ("import sys; from sandport.client import Client; "
                   "print(Client(sys.argv[1], sys.argv[2], timeout=10).forwards())")
        r = subprocess.run([sys.executable, "-c", program, stub.url, TOKEN], env=env,
                           capture_output=True, text=True, timeout=60, check=False)
        assert r.returncode == 0 and "f1" in r.stdout, r.stderr
        r = subprocess.run([sys.executable, "-m", "sandport", "forward", "list", "--json",
                            "--state-dir", str(state_dir)], env=env, capture_output=True,
                           text=True, timeout=60, check=False)
        assert r.returncode == 0 and json.loads(r.stdout) == [{"id": "f1"}], r.stderr
        assert trap.seen == []
    assert [req[2] for req in stub.requests] == [f"Bearer {TOKEN}"] * 2


def test_a_redirect_is_not_followed_with_the_token(stub: Stub) -> None:
    """urllib would send the Authorization header on to wherever a 3xx points."""
    with proxy_trap() as elsewhere:
        stub.answer("GET", "/api/forwards", 307, headers={
            "Location": f"{elsewhere.url}/api/forwards"})
        with pytest.raises(ApiError) as caught:
            Client(stub.url, TOKEN, timeout=10).forwards()
        assert caught.value.status == 307 and elsewhere.seen == []
