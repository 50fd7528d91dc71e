"""The scale soak, short: `bench/soak_scale.py` as a user runs it, against a real gateway.

`make soak` opens 10,000 idle connections through a proxy forward and 1,000 RFB sessions
through the WebSocket front door to a real Xvnc; here the same script runs each scenario
small (500 connections, 50 sessions) with the test's own state dir, bridge and subnet.
Every connection must be verified by a round trip through the gateway (an echo from the
guest; a FramebufferUpdate from Xvnc), the gateway must really have held them (its
descriptors at the peak), and after close its descriptors must come back to where they
were. The second test runs the proxy scenario against a gateway whose descriptor limit
is too small for it: the run must say so (errors, the gateway's resets by reason, its
limit), so the first test cannot pass by measuring nothing.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from conftest import remove_gateway_leftovers, require_programs, require_root, test_net_names

pytestmark = pytest.mark.integration

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "soak_scale.py"
CONNS = 500
SESSIONS = 50
#: The whole run (two gateways, their sandboxes, the scenarios) must end within this.
RUN_TIMEOUT = 240
#: A descriptor limit far too small for CONNS relayed connections (2 descriptors each).
SMALL_NOFILE = 300
#: Descriptors of the gateway's own that may come and go between two samples.
FD_SLACK = 8


def soak(tmp_path: Path, *extra: str) -> tuple[dict[str, Any], str, str]:
    """Run the script to its end; its JSON, stdout and stderr. Leaves nothing behind."""
    require_root()
    require_programs("Xvnc", "openbox", "xsetroot", "xmessage", "crun", "prlimit")
    bridge, subnet = test_net_names()
    state, out = tmp_path / "state", tmp_path / "soak.json"
    argv = [sys.executable, str(SCRIPT), "--no-lock", "--state-dir", str(state),
            "--bridge", bridge, "--subnet", str(subnet), "--listen", "127.0.0.1:0",
            "--out", str(out), *extra]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGINT)  # the script's own teardown runs
        stdout, stderr = proc.communicate(timeout=90)
        pytest.fail(f"the soak did not end within {RUN_TIMEOUT} s:\n{stderr[-3000:]}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        remove_gateway_leftovers(bridge=bridge, state_dir=state)
    # 0: measured (a MISS too); 1 would be a failed setup or something left behind.
    assert proc.returncode == 0, stderr[-3000:]
    assert not state.exists(), "the script removes its state dir"
    return json.loads(out.read_text()), stdout, stderr


def test_short_soak_every_connection_and_session_answers_and_descriptors_come_back(
        tmp_path: Path) -> None:
    doc, stdout, _ = soak(tmp_path, "--conns", str(CONNS), "--ws-sessions", str(SESSIONS))
    proxy, ws = doc["results"]["proxy"], doc["results"]["ws"]

    # Idle proxy connections: all open at once, each echoed through the relay.
    assert (proxy["verified"], proxy["errors"], proxy["gateway_failures"]) == (
        CONNS, {}, {}), proxy["why"]
    g = proxy["gateway"]
    assert proxy["active_at_peak"] == CONNS  # the gateway held them all at once
    # Two descriptors per connection; a few of the gateway's own come and go between the
    # samples (an API request's socket, a file it writes), so the baseline moves by a few.
    assert g["peak"]["fds"] >= g["before"]["fds"] + 2 * CONNS - FD_SLACK, g
    assert proxy["descriptors_back"], g  # back to the baseline after close
    assert proxy["api_unanswered"] == []

    # RFB sessions through the front door: ServerInit, then a FramebufferUpdate each.
    assert (ws["verified"], ws["errors"]) == (SESSIONS, {}), ws["why"]
    assert ws["active_at_peak"] == SESSIONS
    assert ws["xvnc"]["peak"]["fds"] >= ws["xvnc"]["before"]["fds"] + SESSIONS
    assert ws["xvnc"]["same_process_after"] and ws["xvnc"]["new_session_after"], ws["xvnc"]
    assert ws["descriptors_back"], ws["gateway"]
    assert ws["closes_by_reason"] == {"client_closed": SESSIONS + 1}, ws  # + the new one

    assert "MISS" not in stdout, stdout


def test_short_soak_says_why_when_the_gateway_runs_out_of_descriptors(tmp_path: Path) -> None:
    doc, stdout, _ = soak(tmp_path, "--scenarios", "proxy", "--conns", str(CONNS),
                          "--gateway-nofile", str(SMALL_NOFILE), "--timeout", "3")
    proxy = doc["results"]["proxy"]
    assert proxy["verified"] < CONNS and proxy["errors"], proxy
    # The failures the client saw are the ones the gateway counted, under their reason.
    resets = proxy["gateway_failures"].get("descriptors", 0)
    assert resets == CONNS - proxy["verified"], proxy
    assert "connections open and echoing, 0 errors" in stdout and "MISS" in stdout
    assert f"why: gateway failures by reason (/metrics): {{'descriptors': {resets}}}" \
        in stdout, stdout
    assert f"RLIMIT_NOFILE {SMALL_NOFILE} soft / {SMALL_NOFILE} hard" in stdout, stdout
    assert f"UNDER `prlimit --nofile={SMALL_NOFILE}:{SMALL_NOFILE}`" in stdout
    assert proxy["descriptors_back"], proxy["gateway"]
    # The relays leave the last descriptors to the gateway's own port: its API answered
    # /metrics all through the run, full relays or not.
    assert proxy["api_unanswered"] == [], proxy["api_unanswered"]
