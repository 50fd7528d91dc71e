"""Doctor and error words that are true for the case they are shown in (issue 17, point 4).

Each case is made for real: a sandbox whose published port has no service behind it, a
guest made by hand (plain `ip` commands and Xvnc, no sandport) that is attached, loses its
VNC server and is marked gone, an address on that guest's link where nothing answers,
and `sandport ws` as a user runs it. The words must name what is broken and a fix that
works there: sandport restarts only what it started; an attached target is its owner's.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from attachhelpers import HandMade, api_post, hand_made  # noqa: F401 - a fixture
from conftest import require_programs
from nethelpers import free_port
from sandport.control.gateway import Gateway
from sandport.errors import SandboxFailed
from sandport.forward.spec import parse_port_spec

pytestmark = pytest.mark.integration

QUIET = {"probe_interval": 600.0, "forward_mode": "proxy"}


def cli(gw: Gateway, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sandport", *args, "--state-dir",
                           str(gw.config.state_dir)], capture_output=True, text=True,
                          timeout=60, check=False)


def api_get(gw: Gateway, path: str) -> tuple[int, Any]:
    req = urllib.request.Request(f"{gw.base_url}{path}",
                                 headers={"Authorization": f"Bearer {gw.admin_token}"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_doctor_takes_the_port_names_forward_list_shows(gateway_factory: Any,
                                                        loop_thread: Any) -> None:
    """`doctor --port 8080/tcp` (as `forward list` names it) walks that port, and the fix
    for a user's own port with no service is to start the service, not "sandport restarts
    a desktop's services"; another form is refused naming the forms taken (CLI exit 2,
    API 422 with a JSON body)."""
    gw: Gateway = gateway_factory(**QUIET)
    info = loop_thread.run(gw.create_sandbox(
        publish=list(parse_port_spec(f"127.0.0.1:{free_port()}:8080"))))
    try:
        listed = json.loads(cli(gw, "forward", "list", "--json").stdout)
        assert "8080/tcp" in [f["name"] for f in listed], listed
        r = cli(gw, "doctor", info.id, "--port", "8080/tcp", "--json")
        assert r.returncode == 1, r.stdout + r.stderr
        failed = json.loads(r.stdout)["reports"][0]["failed"]
        assert failed["hop"] == "guest service" and failed["port"] == "8080/tcp", failed
        assert "start your service there" in failed["fix"], failed
        assert "0.0.0.0:8080" in failed["fix"], failed
        assert "sandport restarts" not in failed["fix"], failed
        vnc = cli(gw, "doctor", info.id, "--port", "5901/tcp", "--json")
        assert vnc.returncode == 0, vnc.stdout + vnc.stderr
        assert {r["port"] for r in json.loads(vnc.stdout)["reports"][0]["rows"]} <= \
            {"vnc", ""}
        bad = cli(gw, "doctor", info.id, "--port", "8080/sctp")
        assert bad.returncode == 2, bad.stdout + bad.stderr
        assert "8080/tcp, 53/udp" in bad.stderr and "Traceback" not in bad.stderr
        assert "should match pattern" not in bad.stderr
        status, doc = api_get(gw, f"/api/sandboxes/{info.id}/doctor?port=8080%2Fsctp")
        assert status == 422 and doc["error"] == "invalid_port", doc
        assert "8080/tcp, 53/udp" in doc["message"], doc
        status, doc = api_get(gw, f"/api/sandboxes/{info.id}/doctor?port=8080%2Ftcp")
        assert status == 200 and doc["failed"]["port"] == "8080/tcp", doc
    finally:
        loop_thread.run(gw.destroy_sandbox(info.id))


def test_an_attached_target_is_its_owners_and_gone_is_said_so(
        gateway_factory: Any, loop_thread: Any, hand_made: HandMade) -> None:
    """An attached desktop whose VNC server stopped: the fix is to start it on the target
    (sandport runs nothing there, keeps no log of it). Marked gone: the doctor says so
    and to detach and attach again, never to restart `sandport up`."""
    gw: Gateway = gateway_factory(attach_subnets=(hand_made.network,), **QUIET)
    info = loop_thread.run(gw.attach(ip=hand_made.ip, vnc_password=hand_made.password))
    try:
        hand_made.xvnc.kill()
        hand_made.xvnc.wait(10)
        report = loop_thread.run(gw.doctor(info.id))
        row = report.failed
        assert row is not None and row.hop == "guest service", report.rows
        assert f"nothing listens on {hand_made.ip}:5901" in row.fix, row
        assert "start the service on the target" in row.fix, row
        assert "sandport restarts" not in row.fix and "log" not in row.fix, row

        loop_thread.run(gw.retarget(info.id, gone=True, reason="VM stopped"))
        r = cli(gw, "doctor", info.id, "--json")
        assert r.returncode == 1, r.stdout + r.stderr
        [doc] = json.loads(r.stdout)["reports"]
        failed = doc["failed"]
        assert failed["hop"] == "route" and "VM stopped" in failed["evidence"], failed
        assert "marked gone" in failed["fix"], failed
        assert f"sandport detach {info.id}" in failed["fix"], failed
        assert not [x for x in doc["rows"] if "sandport up" in x["fix"]], doc["rows"]
    finally:
        loop_thread.run(gw.destroy_sandbox(info.id))


def test_attaching_where_nothing_answers_fails_fast_and_truly(
        gateway_factory: Any, loop_thread: Any, hand_made: HandMade) -> None:
    """An address on the target's link where nothing answers ARP is refused within
    15 s, naming the hop (ARP on that link), not after the ready timeout with words of
    guest logs; a target whose port refuses is waited for, and its failure speaks of the
    target, not of logs sandport does not have."""
    gw: Gateway = gateway_factory(attach_subnets=(hand_made.network,), ready_timeout=40,
                                  **QUIET)
    dead = str(hand_made.network.network_address + 9)
    t0 = time.monotonic()
    status, doc = api_post(gw, "/api/attach", {"ip": dead, "profile": "http", "port": 8080})
    took = time.monotonic() - t0
    assert status == 503 and doc["error"] == "not_ready", doc
    assert took < 25, (took, doc)  # within ANSWER_WINDOW (15 s), not the ready timeout
    assert f"nothing answers on {dead}:8080 from this host" in doc["message"], doc
    assert f"no host on {hand_made.host_link} answers ARP" in doc["message"], doc
    assert "guest logs" not in doc["message"], doc
    assert gw.sandbox_ids() == []

    quick: Gateway = gateway_factory(attach_subnets=(hand_made.network,), ready_timeout=3,
                                     **QUIET)
    with pytest.raises(SandboxFailed) as caught:  # the target is there; 8081 refuses
        loop_thread.run(quick.attach(ip=hand_made.ip, profile="tcp", port=8081))
    words = str(caught.value)
    assert "refused" in words and "guest logs" not in words, words
    assert f"check that the target's service answers on {hand_made.ip}:8081" in words, words


def test_ws_says_what_it_serves_and_names_wrap_mode(tmp_path: Path) -> None:
    require_programs("openssl")
    subprocess.run(["openssl", "req", "-new", "-x509", "-days", "2", "-nodes", "-out",
                    "self.pem", "-keyout", "self.pem", "-subj", "/CN=localhost"],
                   cwd=tmp_path, check=True, capture_output=True)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "sandport", "ws", "--ssl-only",
                             f"127.0.0.1:{port}", "127.0.0.1:5901"], cwd=tmp_path,
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    try:
        assert proc.stderr is not None
        seen = ""
        deadline = time.monotonic() + 20
        while "sandport ws on" not in seen and time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            seen += line
        [startup] = [x for x in seen.splitlines() if x.startswith("sandport ws on")]
        assert "(wss only" in startup and "ws and wss" not in startup, seen
        assert "ws and wss" not in seen, seen  # the log line too
    finally:
        proc.terminate()
        proc.wait(10)
    for argv in (["18975", "--", "cat"], ["18975", "localhost:5901", "--", "cat", "-n"]):
        r = subprocess.run([sys.executable, "-m", "sandport", "ws", *argv],
                           capture_output=True, text=True, timeout=30, cwd=tmp_path)
        assert r.returncode == 2, (argv, r.stderr)
        assert "wrap mode" in r.stderr and "is not supported" in r.stderr, r.stderr
        assert "not HOST:PORT" not in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_moving_a_target_to_where_nothing_answers_is_refused_and_changes_nothing(
        gateway_factory: Any, loop_thread: Any, hand_made: HandMade) -> None:
    """`retarget --ip` to an address where nothing answers is refused as an attach is
    (within seconds, naming the hop), before anything moves: the target stays where it
    was, ready, its forward serving, and still watched."""
    gw: Gateway = gateway_factory(attach_subnets=(hand_made.network,), ready_timeout=40,
                                  **QUIET)
    info = loop_thread.run(gw.attach(ip=hand_made.ip, vnc_password=hand_made.password))
    try:
        dead = str(hand_made.network.network_address + 9)
        t0 = time.monotonic()
        status, doc = api_post(gw, f"/api/sandboxes/{info.id}/target", {"ip": dead})
        took = time.monotonic() - t0
        assert status == 503, doc
        assert took < 25, (took, doc)  # the answer window (15 s), not the ready timeout
        assert f"nothing answers on {dead}:5901 from this host" in doc["message"], doc
        assert f"the target stays at {hand_made.ip}" in doc["message"], doc
        after = gw.sandboxes.info(info.id)
        assert (after.ip, after.state) == (hand_made.ip, "ready"), after
        with socket.create_connection((after.vnc_host, after.vnc_port), timeout=5) as s:
            assert s.recv(12) == b"RFB 003.008\n"
        assert gw.readiness.watching(info.id), "the monitor no longer watches it"
    finally:
        loop_thread.run(gw.destroy_sandbox(info.id))
