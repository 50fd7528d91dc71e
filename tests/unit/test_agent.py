"""The guest agent: a real agent process, a stub gateway in the test, loopback only.

The agent runs as it will in a sandbox, ``python -I -S agent.py`` (standard library only),
here in the test's own network namespace, so /health must list the test's sockets and pid.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

import sandport
from proxytrap import proxy_trap
from sandport import agent

pytestmark = pytest.mark.unit

AGENT = Path(sandport.__file__).with_name("agent.py")
SANDBOX = "sbx-t1"
TOKEN = "agent-token-5f3a9c"
SECRET = "pa55-w0rd-never-logged"


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


# --------------------------------------------------------------------------- stub gateway


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class StubGateway:
    """A gateway stand-in: records every request, answers per path suffix."""

    url: str = ""
    requests: list[Recorded] = field(default_factory=list)
    answers: dict[str, tuple[int, bytes]] = field(default_factory=lambda: {
        "/credentials": (201, b'{"id": "cred-1", "stored": true}'),
        "/agent/report": (200, b'{"ok": true}'),
    })
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, req: Recorded) -> tuple[int, bytes]:
        with self.lock:
            self.requests.append(req)
        for suffix, answer in self.answers.items():
            if req.path.endswith(suffix):
                return answer
        return 404, b'{"error": "not_found", "message": "stub"}'

    def seen(self, suffix: str) -> list[Recorded]:
        with self.lock:
            return [r for r in self.requests if r.path.endswith(suffix)]


class _StubHandler(BaseHTTPRequestHandler):
    server: Any

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        status, answer = self.server.stub.record(
            Recorded("POST", self.path, dict(self.headers.items()), body))
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def gateway() -> Iterator[StubGateway]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _StubHandler)
    server.daemon_threads = True
    stub = StubGateway(url=f"http://127.0.0.1:{server.server_address[1]}")
    server.stub = stub  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    yield stub
    server.shutdown()
    server.server_close()


# --------------------------------------------------------------------------- agent process


@dataclass
class AgentProc:
    proc: subprocess.Popen[bytes]
    port: int
    stderr_path: Path

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], Any]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=15)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            data = resp.read()
            return resp.status, dict(resp.getheaders()), json.loads(data) if data else None
        finally:
            conn.close()

    def raw(self, data: bytes) -> bytes:
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
            s.sendall(data)
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks)

    def stderr(self) -> str:
        return self.stderr_path.read_text()


def agent_env(gateway_url: str, port: int, interval: str) -> dict[str, str]:
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "SANDPORT_SANDBOX_ID": SANDBOX,
        "SANDPORT_GATEWAY_URL": gateway_url,
        "SANDPORT_AGENT_TOKEN": TOKEN,
        "SANDPORT_AGENT_LISTEN": f"127.0.0.1:{port}",
        "SANDPORT_AGENT_REPORT_INTERVAL": interval,
    }


@pytest.fixture
def start_agent(tmp_path: Path) -> Iterator[Callable[..., AgentProc]]:
    started: list[subprocess.Popen[bytes]] = []

    def start(gateway_url: str, interval: str = "0",
              env: dict[str, str] | None = None) -> AgentProc:
        port = free_port()
        stderr_path = tmp_path / f"agent-{len(started)}.log"
        with stderr_path.open("wb") as err:
            proc = subprocess.Popen([sys.executable, "-I", "-S", str(AGENT)],
                                    env={**agent_env(gateway_url, port, interval),
                                         **(env or {})},
                                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=err)
        started.append(proc)
        running = AgentProc(proc, port, stderr_path)

        def answers() -> bool:
            assert proc.poll() is None, f"agent exited {proc.returncode}: {running.stderr()}"
            with contextlib.suppress(OSError), socket.create_connection(
                    ("127.0.0.1", port), timeout=0.5):
                return True
            return False

        wait_for(answers, 5, "the agent to listen")
        return running

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=5)


@pytest.fixture
def running(gateway: StubGateway, start_agent: Callable[..., AgentProc]) -> AgentProc:
    return start_agent(gateway.url)


# --------------------------------------------------------------------------- /health


def test_health_lists_the_tests_sockets_and_pid(gateway: StubGateway, running: AgentProc) -> None:
    with socket.socket() as tcp, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        tcp.bind(("127.0.0.1", 0))
        tcp.listen()
        udp.bind(("127.0.0.1", 0))
        status, _, doc = running.request("GET", "/health")
        tcp_port, udp_port = tcp.getsockname()[1], udp.getsockname()[1]
    assert status == 200
    assert doc["sandbox"] == SANDBOX
    assert doc["ok"] is True
    assert doc["pid"] == running.proc.pid
    assert doc["uptime_s"] >= 0
    listening = doc["listening"]
    assert {"proto": "tcp", "address": "127.0.0.1", "port": tcp_port} in listening
    assert {"proto": "udp", "address": "127.0.0.1", "port": udp_port} in listening
    assert {"proto": "tcp", "address": "127.0.0.1", "port": running.port} in listening
    keys = [(s["proto"], s["port"], s["address"]) for s in listening]
    assert keys == sorted(set(keys))
    pids = [p["pid"] for p in doc["processes"]]
    assert pids == sorted(pids)
    me = next(p for p in doc["processes"] if p["pid"] == os.getpid())
    assert "pytest" in me["cmdline"] or "python" in me["name"]
    assert any(p["pid"] == running.proc.pid and "agent.py" in p["cmdline"]
               for p in doc["processes"])
    assert doc["gateway"]["url"] == gateway.url


# --------------------------------------------------------------------------- /credentials


def test_credentials_are_forwarded_unchanged_with_the_bearer_token(
    gateway: StubGateway, running: AgentProc
) -> None:
    body = b'{"user": "alice",  "password": "' + SECRET.encode() + b'", "n": [1, 2.50]}'
    status, headers, answer = running.request(
        "POST", "/credentials", body, {"Content-Type": "application/json"})
    assert (status, answer) == (201, {"id": "cred-1", "stored": True})
    assert headers["Content-Type"] == "application/json"
    [seen] = gateway.seen("/credentials")
    assert seen.path == f"/api/sandboxes/{SANDBOX}/credentials"
    assert seen.headers["Authorization"] == f"Bearer {TOKEN}"
    assert seen.headers["Content-Type"] == "application/json"
    assert seen.body == body


def test_the_agent_token_never_goes_to_a_proxy_from_the_guests_environment(
    gateway: StubGateway, start_agent: Callable[..., AgentProc]
) -> None:
    """A guest's environment may name a proxy (http_proxy, ALL_PROXY ...): the agent
    still posts to the gateway directly, and the proxy sees nothing."""
    with proxy_trap() as trap:
        running = start_agent(gateway.url, env=trap.env())
        status, _, answer = running.request("POST", "/credentials", b'{"a": 1}',
                                            {"Content-Type": "application/json"})
        assert (status, answer) == (201, {"id": "cred-1", "stored": True})
        assert trap.seen == []
    [seen] = gateway.seen("/credentials")
    assert seen.headers["Authorization"] == f"Bearer {TOKEN}"


@pytest.mark.parametrize("status", [401, 404, 409, 422])
def test_gateway_refusals_are_passed_through(
    gateway: StubGateway, running: AgentProc, status: int
) -> None:
    refusal = {"error": f"refused_{status}", "message": "the gateway says no"}
    gateway.answers["/credentials"] = (status, json.dumps(refusal).encode())
    got, _, answer = running.request("POST", "/credentials", b'{"k": "v"}')
    assert (got, answer) == (status, refusal)


def test_gateway_down_is_a_502_naming_the_url(start_agent: Callable[..., AgentProc]) -> None:
    down = f"http://127.0.0.1:{free_port()}"
    running = start_agent(down)
    status, _, answer = running.request("POST", "/credentials", b'{"k": "v"}')
    assert status == 502
    assert answer["error"] == "gateway_unreachable"
    assert f"{down}/api/sandboxes/{SANDBOX}/credentials" in answer["message"]
    assert "Connection refused" in answer["message"]


@pytest.mark.parametrize(
    ("body", "error", "words"),
    [
        (b"{not json", "bad_json", "not valid JSON"),
        (b"", "bad_json", "not valid JSON"),
        (b'{"a": NaN}', "bad_json", "NaN"),
        (b"\xff\xfe{}", "bad_json", "not UTF-8"),
        (b"[1, 2]", "not_an_object", "got an array"),
        (b'"text"', "not_an_object", "got a string"),
        (b"null", "not_an_object", "got null"),
    ],
)
def test_bodies_that_are_not_a_json_object_are_400(
    gateway: StubGateway, running: AgentProc, body: bytes, error: str, words: str
) -> None:
    status, _, answer = running.request("POST", "/credentials", body)
    assert status == 400
    assert answer["error"] == error
    assert words in answer["message"]
    assert gateway.seen("/credentials") == []


def test_a_body_over_64_kib_is_413(gateway: StubGateway, running: AgentProc) -> None:
    body = json.dumps({"blob": "x" * (64 * 1024)}).encode()
    status, _, answer = running.request("POST", "/credentials", body)
    assert status == 413
    assert answer["error"] == "body_too_large"
    assert "65536" in answer["message"]
    assert gateway.seen("/credentials") == []


def test_content_length_missing_is_411_and_invalid_is_400(running: AgentProc) -> None:
    missing = running.raw(b"POST /credentials HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    assert missing.startswith(b"HTTP/1.0 411 ")
    assert b'"length_required"' in missing
    invalid = running.raw(b"POST /credentials HTTP/1.1\r\nHost: a\r\nContent-Length: 1_0\r\n"
                          b"Connection: close\r\n\r\n{}")
    assert invalid.startswith(b"HTTP/1.0 400 ")
    assert b'"bad_content_length"' in invalid


def test_unknown_path_and_wrong_method(running: AgentProc) -> None:
    status, _, answer = running.request("GET", "/nope")
    assert (status, answer["error"]) == (404, "not_found")
    status, headers, answer = running.request("GET", "/credentials")
    assert (status, answer["error"], headers["Allow"]) == (405, "method_not_allowed", "POST")
    status, headers, answer = running.request("POST", "/health", b"{}")
    assert (status, headers["Allow"]) == (405, "GET")
    status, _, answer = running.request("BREW", "/health")
    assert status == 501
    assert set(answer) == {"error", "message"}


# --------------------------------------------------------------------------- reports


def test_reports_arrive_periodically_with_the_health_document(
    gateway: StubGateway, start_agent: Callable[..., AgentProc]
) -> None:
    running = start_agent(gateway.url, interval="0.3")
    wait_for(lambda: len(gateway.seen("/agent/report")) >= 2, 3, "two reports")
    first, second = gateway.seen("/agent/report")[:2]
    assert first.path == f"/api/sandboxes/{SANDBOX}/agent/report"
    assert first.headers["Authorization"] == f"Bearer {TOKEN}"
    doc = json.loads(second.body)
    assert doc["sandbox"] == SANDBOX
    assert doc["pid"] == running.proc.pid
    assert {"proto": "tcp", "address": "127.0.0.1", "port": running.port} in doc["listening"]
    assert any(p["pid"] == running.proc.pid for p in doc["processes"])
    assert doc["gateway"]["last_report_at"] is not None  # the first report succeeded
    _, _, health = running.request("GET", "/health")
    assert health["gateway"]["last_error"] == ""
    assert abs(health["gateway"]["last_report_at"] - time.time()) < 5


def test_a_refused_report_is_recorded_and_retried(
    gateway: StubGateway, start_agent: Callable[..., AgentProc]
) -> None:
    gateway.answers["/agent/report"] = (404, b'{"error": "no_such_endpoint", "message": "?"}')
    running = start_agent(gateway.url, interval="0.3")
    wait_for(lambda: len(gateway.seen("/agent/report")) >= 2, 3, "a retried report")
    _, _, health = running.request("GET", "/health")
    assert health["gateway"]["last_report_at"] is None
    assert "answered 404" in health["gateway"]["last_error"]
    assert "/agent/report" in health["gateway"]["last_error"]
    gateway.answers["/agent/report"] = (200, b"{}")
    wait_for(lambda: running.request("GET", "/health")[2]["gateway"]["last_error"] == "", 3,
             "the report to succeed again")
    assert running.proc.poll() is None


def test_logs_have_one_line_per_request_and_never_the_token_or_body(
    gateway: StubGateway, start_agent: Callable[..., AgentProc]
) -> None:
    running = start_agent(gateway.url, interval="0.3")
    running.request("POST", "/credentials", json.dumps({"password": SECRET}).encode())
    running.request("GET", "/health")
    wait_for(lambda: len(gateway.seen("/agent/report")) >= 2, 3, "two reports")
    running.proc.send_signal(signal.SIGTERM)
    running.proc.wait(timeout=5)
    log = running.stderr()
    assert "POST /credentials 201" in log
    assert "GET /health 200" in log
    assert TOKEN not in log
    assert SECRET not in log


# --------------------------------------------------------------------------- process life


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_ends_the_agent_with_0_within_a_second(
    gateway: StubGateway, start_agent: Callable[..., AgentProc], sig: signal.Signals
) -> None:
    running = start_agent(gateway.url, interval="0.3")
    t0 = time.monotonic()
    running.proc.send_signal(sig)
    assert running.proc.wait(timeout=5) == 0
    assert time.monotonic() - t0 < 1.0


@pytest.mark.parametrize(
    ("drop", "override", "words"),
    [
        ("SANDPORT_SANDBOX_ID", {}, "SANDPORT_SANDBOX_ID is not set"),
        ("SANDPORT_AGENT_TOKEN", {}, "SANDPORT_AGENT_TOKEN is not set"),
        (None, {"SANDPORT_GATEWAY_URL": "10.0.0.1:7411"}, "not an http:// or https:// URL"),
        (None, {"SANDPORT_AGENT_LISTEN": "localhost:7412"}, "is not an IP address"),
        (None, {"SANDPORT_AGENT_REPORT_INTERVAL": "-1"}, ">= 0"),
    ],
)
def test_bad_configuration_exits_2_with_one_line(
    drop: str | None, override: dict[str, str], words: str
) -> None:
    env = agent_env("http://127.0.0.1:9", free_port(), "10") | override
    if drop:
        del env[drop]
    done = subprocess.run([sys.executable, "-I", "-S", str(AGENT)], env=env,
                          capture_output=True, text=True, timeout=10)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1
    assert words in done.stderr
    assert done.stderr.startswith("sandport-agent: invalid configuration: ")


# --------------------------------------------------------------------------- pure functions

TCP_FIXTURE = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1
   1: 00000000:170C 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 2 1
   2: 0100007F:1F90 0100007F:D431 01 00000000:00000000 00:00000000 00000000     0        0 3 1
   3: 00000000:170C 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4 1
   4: garbage
"""
TCP6_FIXTURE = """\
  sl  local_address                         remote_address                        st ...
   0: 00000000000000000000000000000000:170D 00000000000000000000000000000000:0000 0A 0
   1: 00000000000000000000000001000000:0016 00000000000000000000000000000000:0000 0A 0
"""
UDP_FIXTURE = """\
   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout
  100: 00000000:0035 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0
  101: 0100007F:A1B2 0101A8C0:0035 01 00000000:00000000 00:00000000 00000000     0        0
"""


@pytest.mark.parametrize(
    ("line", "proto", "expected"),
    [
        ("0: 0100007F:1F90 00000000:0000 0A 0", "tcp", ("tcp", "127.0.0.1", 8080)),
        ("0: 0100007F:1F90 0100007F:D431 01 0", "tcp", None),  # established
        ("0: 00000000:0035 00000000:0000 07 0", "udp", ("udp", "0.0.0.0", 53)),
        ("0: 0100007F:A1B2 0101A8C0:0035 01 0", "udp", None),  # connected UDP
        ("0: 00000000:0035 00000000:0000 07 0", "tcp", None),  # closed TCP
        ("0: 00000000000000000000000000000000:170D 0:0 0A 0", "tcp", ("tcp", "::", 5901)),
        ("0: 00000000000000000000000001000000:0016 0:0 0A 0", "tcp", ("tcp", "::1", 22)),
        ("0: 0000000000000000FFFF00000100007F:0050 0:0 0A 0", "tcp",
         ("tcp", "::ffff:127.0.0.1", 80)),
        ("  sl  local_address rem_address   st", "tcp", None),
        ("0: 0100007F:XYZW 00000000:0000 0A 0", "tcp", None),
        ("0: 0100007F 00000000:0000 0A 0", "tcp", None),
    ],
)
def test_parse_proc_net_line(line: str, proto: Any, expected: tuple[str, str, int] | None) -> None:
    assert agent.parse_proc_net_line(line, proto, byteorder="little") == expected


def test_listening_sockets_reads_all_files_deduplicates_and_sorts(tmp_path: Path) -> None:
    (tmp_path / "tcp").write_text(TCP_FIXTURE)
    (tmp_path / "tcp6").write_text(TCP6_FIXTURE)
    (tmp_path / "udp").write_text(UDP_FIXTURE)  # no udp6: IPv6 off is fine
    assert agent.listening_sockets(tmp_path, byteorder="little") == [  # the fixtures' order
        ("tcp", "::1", 22),
        ("tcp", "0.0.0.0", 5900),
        ("tcp", "::", 5901),
        ("tcp", "127.0.0.1", 8080),
        ("udp", "0.0.0.0", 53),
    ]
    assert agent.listening_sockets(tmp_path / "missing") == []


def test_netns_processes_include_this_process() -> None:
    procs = agent.netns_processes()
    assert [p.pid for p in procs] == sorted(p.pid for p in procs)
    me = next(p for p in procs if p.pid == os.getpid())
    assert me.name == Path(f"/proc/{os.getpid()}/comm").read_text().strip()
    assert "\0" not in me.cmdline


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("::1", True),
        ("::ffff:127.0.0.1", True),
        ("10.201.3.2", False),
        ("::ffff:10.201.3.2", False),
        ("fe80::1%eth0", False),
        ("not-an-ip", False),
    ],
)
def test_is_loopback_client(host: str, loopback: bool) -> None:
    assert agent.is_loopback_client(host) is loopback


def test_config_from_env_defaults_and_repr_hides_the_token() -> None:
    config = agent.AgentConfig.from_env({
        "SANDPORT_SANDBOX_ID": "ab12cd",
        "SANDPORT_GATEWAY_URL": "http://10.201.3.1:7411/",
        "SANDPORT_AGENT_TOKEN": TOKEN,
    })
    assert (config.listen_host, config.listen_port, config.report_interval) == \
        ("0.0.0.0", 7412, 10.0)
    assert config.credentials_url == "http://10.201.3.1:7411/api/sandboxes/ab12cd/credentials"
    assert config.report_url == "http://10.201.3.1:7411/api/sandboxes/ab12cd/agent/report"
    assert TOKEN not in repr(config)
    v6 = agent.AgentConfig.from_env({
        "SANDPORT_SANDBOX_ID": "ab12cd", "SANDPORT_GATEWAY_URL": "https://gw",
        "SANDPORT_AGENT_TOKEN": TOKEN, "SANDPORT_AGENT_LISTEN": "[::]:7412",
        "SANDPORT_AGENT_REPORT_INTERVAL": "0"})
    assert (v6.listen_host, v6.listen, v6.report_interval) == ("::", "[::]:7412", 0.0)


def test_config_errors_name_every_problem_on_one_line() -> None:
    with pytest.raises(agent.ConfigError) as caught:
        agent.AgentConfig.from_env({"SANDPORT_GATEWAY_URL": "http://u:p@gw",
                                    "SANDPORT_AGENT_REPORT_INTERVAL": "soon"})
    message = str(caught.value)
    assert "\n" not in message
    for words in ("SANDPORT_SANDBOX_ID is not set", "user:password",
                  "SANDPORT_AGENT_TOKEN is not set", "not a number"):
        assert words in message


@pytest.mark.parametrize(
    ("answer", "status", "error"),
    [
        (agent.GatewayAnswer(200, b'{"a": 1}', "application/json"), 200, None),
        (agent.GatewayAnswer(500, b'{"error": "x"}', "application/json"), 500, None),
        (agent.GatewayAnswer(204, b"", ""), 204, None),
        (agent.GatewayAnswer(200, b"<html>", "text/html"), 502, "gateway_bad_response"),
        (agent.GatewayAnswer(404, b"<html>404</html>", "text/html"), 404, "gateway_error"),
        (agent.GatewayAnswer(302, b"", "text/html", "http://elsewhere/"), 502,
         "gateway_redirect"),
    ],
)
def test_relay_answer(answer: agent.GatewayAnswer, status: int, error: str | None) -> None:
    got_status, body = agent.relay_answer(answer, "http://gw/x")
    assert got_status == status
    if error is None:
        assert body == (answer.body or None)
    else:
        assert isinstance(body, dict)
        assert body["error"] == error
        assert "http://gw/x" in body["message"]
