"""Restart without loss: `kill -9` of a gateway with sandboxes, forwards, tokens, sessions.

The next start on the same state dir adopts every sandbox whose guest services still run
(forwards back on the same host ports with the same ids, tokens valid, sessions open, the
agent reporting again) and marks the others failed with the reason, removing what was
left of them. Nothing is doubled: one link per sandbox, one nft rule per forward.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import record
from nethelpers import ECHO_SERVER, expected_guard_rules, free_port, guest_server
from sandport.client import ApiError, Client
from sandport.net import antispoof, nft
from sandport.probe import probe_rfb_tcp, probe_rfb_ws
from uphelpers import up_factory  # noqa: F401 - a fixture

pytestmark = pytest.mark.integration


def echo(port: int) -> bool:
    """True if 127.0.0.1:port echoes a line back."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.settimeout(0.5)
            s.sendall(b"ping\n")
            return s.recv(16) == b"ping\n"
    except OSError:
        return False


def rfb_ok(port: int, password: str) -> bool:
    """True if the VNC server behind 127.0.0.1:port completes the RFB handshake."""
    return asyncio.run(probe_rfb_tcp("127.0.0.1", port, password=password, timeout=2.0)).ok


def netns_pids(netns: str) -> list[int]:
    out = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True,
                         check=False).stdout
    return [int(p) for p in out.split()]


def links() -> str:
    return subprocess.run(["ip", "-o", "link"], capture_output=True, text=True,
                          check=True).stdout


def test_kill_9_with_three_sandboxes_and_six_forwards_then_restart_adopts(
        up_factory: Any, leftovers: Any, tmp_path: Path) -> None:
    state = tmp_path / "restart-state"
    # Proxy forwards die with the gateway (kernel ones keep forwarding meanwhile; the
    # kernel-rule side of a restart is test_lifecycle's): here they must come back.
    first = up_factory("--forward-mode", "proxy", state_dir=state)
    first.wait_http()
    api = Client.from_state_dir(state)
    ports = [free_port() for _ in range(3)]
    sbs = [api.create_sandbox(publish=[f"127.0.0.1:{p}:7"]) for p in ports]
    ids = [sb.id for sb in sbs]
    with contextlib.ExitStack() as guests:
        for sb in sbs:  # an app inside each sandbox, on guest port 7
            guests.enter_context(guest_server(f"sp-{sb.id}", ECHO_SERVER, os.devnull))
        forwards = {sb.id: sorted((f["id"], f["host"], f["guest"]) for f in sb.doc["forwards"])
                    for sb in sbs}
        assert sum(len(f) for f in forwards.values()) == 6
        assert all(echo(p) for p in ports)
        link = sbs[0].create_token(ttl=600, ports=["vnc"])
        session = sbs[1].create_session(ttl=600)
        doomed = sbs[2].create_session(ttl=600)
        before = {sb.id: sb.refresh().doc for sb in sbs}
        guard = expected_guard_rules(first.bridge)
        assert nft.guard_rules(first.bridge) == guard
        assert antispoof.guarded(first.bridge) == {
            f"sp-{sb.id}-v": (antispoof.sandbox_mac(sb.id), sb.doc["ip"]) for sb in sbs}
        first.proc.kill()  # SIGKILL: no cleanup at all
        first.proc.communicate(timeout=10)
        # The guests outlive the gateway, and so does what contains them.
        assert nft.guard_rules(first.bridge) == guard
        assert len(antispoof.guarded(first.bridge)) == 3

        # The guests outlive the gateway; one sandbox loses its desktop meanwhile.
        assert all(netns_pids(f"sp-{i}") for i in ids)
        assert not any(echo(p) for p in ports)  # the relays died with the gateway
        for pid in netns_pids(f"sp-{ids[2]}"):
            with contextlib.suppress(OSError):
                if Path(f"/proc/{pid}/comm").read_text().strip() == "Xvnc":
                    os.kill(pid, signal.SIGKILL)

        # A restart that fails after adopting (its HTTP port is taken) leaves the
        # sandboxes running for the next one: it does not destroy them.
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            failed_start = up_factory("--listen", f"127.0.0.1:{taken.getsockname()[1]}",
                                      state_dir=state, bridge=first.bridge,
                                      subnet=first.subnet)
            _, stderr = failed_start.proc.communicate(timeout=60)
        assert failed_start.proc.returncode == 2 and "already in use" in stderr, stderr
        assert all(netns_pids(f"sp-{i}") for i in ids[:2])
        assert all(f"sp-{i}-v" in links() for i in ids[:2])

        t0 = time.monotonic()
        second = up_factory(state_dir=state, bridge=first.bridge, subnet=first.subnet)
        back = None
        while time.monotonic() - t0 < 30 and second.proc.poll() is None:
            if echo(ports[0]) and echo(ports[1]):
                back = time.monotonic() - t0
                break
            time.sleep(0.02)
        assert back is not None, "the adopted forwards did not come back"
        second.wait_http()
        api = Client.from_state_dir(state)  # the new gateway's URL
        # How fast is a figure, not a test: `make soak` (bench/soak_faults.py) measures
        # it against its goal (new connections within 1 s of the restart being up).
        record(f"restart after kill -9: adopted forwards answer {back:.2f} s after the "
               "new gateway process started (its Python start included)")

        # Adopted: same state, same forwards (ids, host ports, guests), VNC through them.
        now = {sb.id: sb.doc for sb in api.sandboxes()}
        assert set(now) == set(ids)
        for sid in ids[:2]:
            assert now[sid]["state"] == "ready", now[sid]
            assert sorted((f["id"], f["host"], f["guest"]) for f in now[sid]["forwards"]) \
                == forwards[sid]
            assert now[sid]["token"] == before[sid]["token"]
            vnc = now[sid]["vnc"]["port"]
            assert vnc == before[sid]["vnc"]["port"]
            assert rfb_ok(vnc, now[sid]["vnc_password"])
        # The one whose Xvnc died: failed, with the reason; its resources are gone.
        failed = now[ids[2]]
        assert failed["state"] == "failed", failed
        assert "not adopted" in failed["reason"] and "Xvnc" in failed["reason"], failed
        assert failed["forwards"] == [] and not echo(ports[2])
        with pytest.raises(ApiError) as refused:  # no forwards for what failed
            api.request("POST", f"/api/sandboxes/{ids[2]}/forwards", {"publish": ["0:7"]})
        assert refused.value.status == 409 and "failed" in refused.value.message
        ended = api.session(doomed.id)  # its session can no longer complete
        assert ended.state == "cancelled" and "the sandbox failed" in ended.doc["reason"]
        assert f"sp-{ids[2]}" not in subprocess.run(["ip", "netns", "list"], text=True,
                                                    capture_output=True).stdout

        # Tokens stay valid: the sandbox's own and the access token, through the bridge.
        base = second_url(state)
        for token in (before[ids[0]]["token"], link["token"]):
            ws = f"ws{base[4:]}/s/{ids[0]}/ports/vnc/ws?token={token}"
            result = asyncio.run(probe_rfb_ws(ws, password=before[ids[0]]["vnc_password"],
                                              timeout=5.0))
            assert result.ok, result
        assert [t["id"] for t in api.request("GET", f"/api/sandboxes/{ids[0]}/tokens")[
            "tokens"]] == [link["id"]]

        # The session is still open, and the agent (still running) completes it.
        assert api.session(session.id).state == "ready"
        guest = subprocess.run(
            ["ip", "netns", "exec", f"sp-{ids[1]}", sys.executable, "-c",
             "from sandport.client import post_credentials; post_credentials({'k': 'v'})"],
            capture_output=True, text=True, timeout=30, check=False)
        assert guest.returncode == 0, guest.stderr
        assert api.session(session.id).wait_completed(timeout=10) == {"k": "v"}

        # Nothing doubled: one link per adopted sandbox, none of the failed one's, one
        # listener per forward, and no kernel rule (proxy forwards need none).
        text = links()
        for sid in ids[:2]:
            assert text.count(f"sp-{sid}-v") == 1
        assert f"sp-{ids[2]}-v" not in text
        for sid in ids[:2]:
            for f in now[sid]["forwards"]:
                port = f["host"].rsplit(":", 1)[1]
                listening = subprocess.run(["ss", "-Hltn", f"sport = :{port}"], text=True,
                                           capture_output=True, check=True).stdout
                assert len(listening.splitlines()) == 1, listening
        assert nft.rules_of(first.bridge) == []
        # Exactly the guard: host isolation once, anti-spoofing for the adopted two (the
        # failed one's port and rules are gone), no chain of this bridge left over.
        assert nft.guard_rules(first.bridge) == guard
        assert antispoof.guarded(first.bridge) == {
            f"sp-{sid}-v": (antispoof.sandbox_mac(sid), now[sid]["ip"]) for sid in ids[:2]}
        assert sorted(antispoof.own_chains(first.bridge)) == sorted(
            [antispoof.base_chain(first.bridge),
             *(antispoof.port_chain(f"sp-{sid}-v", first.bridge) for sid in ids[:2])])
        kinds = [(e["sandbox"], e["kind"]) for e in api.events()]
        assert (ids[0], "sandbox.adopted") in kinds and (ids[1], "sandbox.adopted") in kinds
        assert (ids[2], "sandbox.adopted") not in kinds

        # A failed sandbox is deleted like any other.
        api.sandbox(ids[2]).delete()
        code, stderr = second.stop()
        assert code == 0, stderr
    assert leftovers(bridge=first.bridge, sandbox_ids=ids, state_dir=state) == []


def second_url(state: Path) -> str:
    """The URL of the gateway running on ``state``."""
    return Client.from_state_dir(state).url
