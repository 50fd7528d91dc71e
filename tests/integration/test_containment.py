"""Guests that are not host root (issue 16, point 1): what a program inside a netns
sandbox can and cannot do.

Programs run the way the guest's own do: ``crun exec`` into the sandbox's container with
the backend's crun root (as the gateway starts Xvnc and the agent). One gateway, two
desktop sandboxes A and B; A tries to reach the host's and B's secrets.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from conftest import require_programs
from sandport.control.gateway import ADMIN_TOKEN_FILE, Gateway, SandboxInfo
from sandport.sandbox import container, crun
from sandport.sandbox.netns import netns_name

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def pair(gateway_factory: Any, loop_thread: Any) -> tuple[Gateway, SandboxInfo, SandboxInfo]:
    require_programs("crun")
    gw = gateway_factory()
    a = loop_thread.run(gw.create_sandbox())
    b = loop_thread.run(gw.create_sandbox())
    return gw, a, b


def inside(gw: Gateway, sandbox_id: str, script: str) -> subprocess.CompletedProcess[str]:
    """Run ``sh -c script`` in the sandbox's container, as the backend runs its guests
    (the same OCI process document; in the foreground, to read its output)."""
    runtime = crun.Crun("crun", crun.state_root(gw.config.state_dir))
    doc = gw.config.state_dir / "sandboxes" / sandbox_id / "container" / "test.json"
    doc.write_text(json.dumps(container.process_config(
        argv=["/bin/sh", "-c", script], env={"PATH": "/usr/bin:/bin"})))
    return subprocess.run(runtime.command("exec", "--process", str(doc),
                                          netns_name(sandbox_id)),
                          capture_output=True, text=True, timeout=20, check=False)


def guest_pids(gw: Gateway, sandbox_id: str) -> dict[str, int]:
    docs = json.loads((gw.config.state_dir / "sandboxes" / sandbox_id / "pids.json")
                      .read_text())
    return {d["name"]: int(d["pid"]) for d in docs}


def test_the_gateways_admin_token_is_out_of_reach(pair: Any) -> None:
    gw, a, _ = pair
    token_file = gw.config.state_dir / ADMIN_TOKEN_FILE
    assert token_file.read_text().strip()  # there is one to steal
    for path in (token_file, Path(f"/proc/{os.getpid()}/root{token_file}"),
                 Path(f"/proc/{os.getpid()}/environ"), gw.config.state_dir / "sandport.db"):
        got = inside(gw, a.id, f"cat {path}")
        assert got.returncode != 0 and not got.stdout, (path, got)


def test_etc_shadow_is_masked(pair: Any) -> None:
    gw, a, _ = pair
    assert "root:" in Path("/etc/shadow").read_text()
    got = inside(gw, a.id, "cat /etc/shadow /etc/gshadow; ls /etc/ssh")
    assert "root:" not in got.stdout, got


def test_another_sandboxs_files_and_environment_are_out_of_reach(pair: Any) -> None:
    gw, a, b = pair
    b_dir = gw.config.state_dir / "sandboxes" / b.id
    b_token = gw.roster[b.id].spec.secrets["agent_token"]
    b_agent = guest_pids(gw, b.id)["agent"]
    assert b_token.encode() in Path(f"/proc/{b_agent}/environ").read_bytes()  # host sees it
    got = inside(gw, a.id, f"ls {b_dir}/tmp; cat {b_dir}/guest/vncpasswd "
                 f"{b_dir}/container/agent.json; cat /proc/{b_agent}/environ; "
                 "cat /proc/*/environ")
    assert b_token not in got.stdout and b.id not in got.stdout, got
    # A sees only its own processes, in a PID namespace of its own.
    pids = inside(gw, a.id, "ls /proc | grep -c '^[0-9]'")
    assert int(pids.stdout) < 10, pids


def test_guests_are_an_unprivileged_uid_range_without_capabilities(pair: Any) -> None:
    gw, a, b = pair
    got = inside(gw, a.id, "id -u; cat /proc/self/uid_map /proc/self/gid_map; "
                 "grep -E '^(Cap|NoNewPrivs|Seccomp:)' /proc/self/status")
    lines = got.stdout.split("\n")
    assert lines[0] == "0", got  # root inside ...
    inner, host, size = (int(x) for x in lines[1].split())
    assert inner == 0 and host >= container.ID_BASE and size == container.ID_SIZE, got
    status = dict(line.split(":\t") for line in lines[3:] if ":\t" in line)
    for cap in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(status[cap], 16) == 0, got
    assert status["NoNewPrivs"] == "1" and status["Seccomp"] == "2", got
    # ... which is an unprivileged host uid, different per sandbox: so are its services.
    hosts = []
    for sid in (a.id, b.id):
        for name, pid in guest_pids(gw, sid).items():
            text = Path(f"/proc/{pid}/status").read_text()
            uid = text.split("Uid:\t")[1].split()[0]
            assert int(uid) >= container.ID_BASE, (sid, name, uid)
            assert "NoNewPrivs:\t1" in text and "Seccomp:\t2" in text, (sid, name)
            assert "CapEff:\t0000000000000000" in text, (sid, name)
            hosts.append(int(uid))
    assert len(set(hosts)) == 2, hosts
    # the seccomp filter answers what no desktop program needs
    denied = inside(gw, a.id, "unshare -U true; echo status $?")
    assert "status 0" not in denied.stdout, denied


def test_destroy_leaves_no_container_state(gateway_factory: Any, loop_thread: Any) -> None:
    require_programs("crun")
    gw = gateway_factory()
    sb = loop_thread.run(gw.create_sandbox())
    root = crun.state_root(gw.config.state_dir)
    assert (root / netns_name(sb.id)).is_dir()
    held = [p for p in crun.IDMAP_DIR.iterdir() if p.read_text() == netns_name(sb.id)]
    assert len(held) == 1
    loop_thread.run(gw.destroy_sandbox(sb.id))
    assert not (root / netns_name(sb.id)).exists()
    assert not held[0].exists() or held[0].read_text() != netns_name(sb.id)


def test_host_root_only_when_asked_for_by_its_loud_name(gateway_factory: Any,
                                                       loop_thread: Any) -> None:
    gw = gateway_factory(guest_privileges="host-root-UNSAFE")
    sb = loop_thread.run(gw.create_sandbox())
    assert sb.state == "ready"
    for name, pid in guest_pids(gw, sb.id).items():  # what the opt-in means: host root
        uid = Path(f"/proc/{pid}/status").read_text().split("Uid:\t")[1].split()[0]
        assert uid == "0", name
    assert not (crun.state_root(gw.config.state_dir) / netns_name(sb.id)).exists()
    loop_thread.run(gw.destroy_sandbox(sb.id))
