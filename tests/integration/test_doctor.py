"""``sandport doctor`` against real faults: each is injected into an otherwise healthy
desktop sandbox (real namespace, Xvnc, bridge, nft), and the doctor must name the right
hop and cause within 5 s.

The gateways here probe readiness only every 10 minutes, so the monitor does not repair
a fault (restart Xvnc) before the doctor looks at it. Faults that change shared state (the
bridge's address) get a gateway of their own.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from conftest import eventually_sync, free_test_subnet, record
from nethelpers import RemoteHost, free_port, remote_host
from sandport.control.forwards import ForwardOptions
from sandport.control.gateway import Gateway
from sandport.doctor import HOPS, Report
from sandport.forward.spec import parse_port_spec
from sandport.net import nft
from sandport.proto.rfb import obfuscate_password

pytestmark = pytest.mark.integration

SCHEMA = json.loads((Path(__file__).resolve().parents[2] / "docs" /
                     "doctor.schema.json").read_text())
QUIET = {"probe_interval": 600.0, "forward_mode": "proxy"}


@pytest.fixture(scope="module")
def gw(gateway_factory: Any) -> Gateway:
    gateway: Gateway = gateway_factory(**QUIET)
    return gateway


@pytest.fixture(scope="module")
def remote() -> Iterator[RemoteHost]:
    with remote_host() as r:
        yield r


@pytest.fixture
def sandbox(gw: Gateway, loop_thread: Any) -> Iterator[Any]:
    info = loop_thread.run(gw.create_sandbox())
    try:
        yield info
    finally:
        if info.id in gw.sandbox_ids():
            loop_thread.run(gw.destroy_sandbox(info.id))


def on_loop(loop_thread: Any, fn: Any, *args: Any, **kw: Any) -> Any:
    """Call a gateway method on the gateway's loop (its store and timers live there)."""
    async def call() -> Any:
        return fn(*args, **kw)
    return loop_thread.run(call())


WALKS: list[float] = []


@pytest.fixture(scope="module", autouse=True)
def _record_walk_times() -> Iterator[None]:
    yield
    if WALKS:
        record(f"sandport doctor: {len(WALKS)} walks (healthy and faulty), slowest "
               f"{max(WALKS):.2f} s, median {sorted(WALKS)[len(WALKS) // 2]:.2f} s")


def walk(gw: Gateway, loop_thread: Any, sandbox_id: str, **kw: Any) -> Report:
    report: Report = loop_thread.run(gw.doctor(sandbox_id, **kw))
    WALKS.append(report.took)
    assert report.took < 5.0, f"the walk took {report.took:.1f} s"
    jsonschema.validate(report.as_json(), SCHEMA["$defs"]["report"] | {"$defs": SCHEMA["$defs"]})
    return report


def broken(report: Report, hop: str, *words: str) -> None:
    """The first failing row is in ``hop`` and says each of ``words`` (evidence or fix);
    every later row of that port is skipped, every earlier one passed."""
    failed = report.failed
    table = "\n".join(f"{r.status:4} {r.hop:18} {r.check}: {r.evidence} | {r.fix}"
                      for r in report.rows)
    assert failed is not None, table
    assert failed.hop == hop, table
    text = f"{failed.check} {failed.evidence} {failed.fix}".lower()
    for word in words:
        assert word.lower() in text, f"{word!r} not in {text!r}\n{table}"
    index = report.rows.index(failed)
    assert all(r.status in ("ok", "warn") for r in report.rows[:index]), table
    later = [r for r in report.rows[index + 1:] if r.port == failed.port or not failed.port]
    assert later and all(r.status == "skip" for r in later
                         if HOPS.index(r.hop) > HOPS.index(failed.hop)), table


def test_a_healthy_sandbox_passes_every_hop(gw: Gateway, loop_thread: Any,
                                             sandbox: Any) -> None:
    report = walk(gw, loop_thread, sandbox.id)
    assert report.healthy and report.failed is None
    assert {r.hop for r in report.rows} == set(HOPS)
    assert all(r.status == "ok" for r in report.rows), [r for r in report.rows
                                                         if r.status != "ok"]
    vnc = [r for r in report.rows if r.hop == "guest service" and r.port == "vnc"]
    assert vnc and "RFB 3.8" in vnc[0].evidence and sandbox.ip in vnc[0].check


def test_no_process_listens_on_the_forwards_host_port(gw: Gateway, loop_thread: Any,
                                                       sandbox: Any) -> None:
    [fwd] = [f for f in gw.forwards.of(sandbox.id) if f.name == "vnc"]
    assert fwd.relay is not None
    loop_thread.run(fwd.relay.stop())  # the listener is gone; the store still has it
    broken(walk(gw, loop_thread, sandbox.id), "gateway", "nothing listens",
           f"127.0.0.1:{fwd.host_port}", "sandport sandbox rm")


def test_a_kernel_forward_whose_dnat_rule_is_only_in_prerouting(
        gw: Gateway, loop_thread: Any, remote: RemoteHost) -> None:
    port = free_port()
    info = loop_thread.run(gw.create_sandbox(
        publish=list(parse_port_spec(f"{remote.host_ip}:{port}:5901")),
        options=ForwardOptions(mode="kernel")))
    try:
        [fwd] = [f for f in gw.forwards.of(info.id) if f.mode == "kernel"]
        out_chain = nft.chain_names(gw.config.net.bridge)[1]
        listing = subprocess.run(["nft", "-a", "list", "chain", "ip", "sandport", out_chain],
                                 capture_output=True, text=True, check=True).stdout
        [line] = [x for x in listing.splitlines() if fwd.rule().comment in x]
        handle = line.rsplit("# handle ", 1)[1].strip()
        subprocess.run(["nft", "delete", "rule", "ip", "sandport", out_chain, "handle",
                        handle], check=True)
        report = walk(gw, loop_thread, info.id)
        broken(report, "host network", "only in prerouting", "local clients",
               "output-chain rule")
        assert report.failed is not None and report.failed.port == "vnc"  # guest port 5901
    finally:
        loop_thread.run(gw.destroy_sandbox(info.id))


def test_xvnc_killed_inside_the_sandbox(gw: Gateway, loop_thread: Any,
                                        sandbox: Any) -> None:
    backend = gw.roster[sandbox.id].backend
    [xvnc] = [p for p in backend._procs[sandbox.id] if p.name == "Xvnc"]  # type: ignore[attr-defined]
    os.kill(xvnc.pid, signal.SIGKILL)
    report = walk(gw, loop_thread, sandbox.id, port="vnc")
    broken(report, "guest service", "refused", "xvnc", "not running")


def test_the_bridge_readdressed_to_another_subnet(gateway_factory: Any,
                                                   loop_thread: Any) -> None:
    own: Gateway = gateway_factory(**QUIET)
    info = loop_thread.run(own.create_sandbox())
    bridge = own.config.net.bridge
    right = f"{own.config.net.gateway_ip}/{own.config.net.subnet.prefixlen}"
    other = free_test_subnet()
    wrong = f"{other.network_address + 1}/{other.prefixlen}"
    subprocess.run(["ip", "addr", "flush", "dev", bridge], check=True)
    subprocess.run(["ip", "addr", "add", wrong, "dev", bridge], check=True)
    try:
        report = walk(own, loop_thread, info.id)
        broken(report, "host network", "bridge address", wrong, right, "re-address")
    finally:
        subprocess.run(["ip", "addr", "flush", "dev", bridge], check=True)
        subprocess.run(["ip", "addr", "add", right, "dev", bridge], check=True)
    assert walk(own, loop_thread, info.id).healthy  # and back once it is put right
    loop_thread.run(own.destroy_sandbox(info.id))


def test_the_sandbox_veth_detached_from_the_bridge(gw: Gateway, loop_thread: Any,
                                                   sandbox: Any) -> None:
    link = f"sp-{sandbox.id}-v"
    subprocess.run(["ip", "link", "set", link, "nomaster"], check=True)
    report = walk(gw, loop_thread, sandbox.id)
    broken(report, "host network", "sandbox link", f"not a port of {gw.config.net.bridge}",
           f"ip link set {link} master {gw.config.net.bridge}")


def test_an_nft_drop_rule_for_the_sandbox_address(gw: Gateway, loop_thread: Any,
                                                  sandbox: Any) -> None:
    table = f"sp_doctor_{secrets.token_hex(3)}"
    rules = (f"add table inet {table}\n"
             f"add chain inet {table} out {{ type filter hook output priority 0; }}\n"
             f"add rule inet {table} out ip daddr {sandbox.ip} drop\n")
    subprocess.run(["nft", "-f", "-"], input=rules, text=True, check=True)
    try:
        report = walk(gw, loop_thread, sandbox.id)
        broken(report, "host network", "firewall", table, sandbox.ip, "drop",
               f"nft delete rule inet {table} out handle")
    finally:
        subprocess.run(["nft", "delete", "table", "inet", table], check=True)


def test_the_stored_vnc_password_differs_from_the_servers(gw: Gateway, loop_thread: Any,
                                                          sandbox: Any) -> None:
    spec = gw.roster[sandbox.id].spec
    server_file = spec.workdir / "guest" / "vncpasswd"  # what the guest sees, read-only
    server_file.write_bytes(obfuscate_password("changed!"))  # Xvnc reads it per login
    report = walk(gw, loop_thread, sandbox.id, port="vnc")
    broken(report, "guest service", "authentication", "password", "not the server's")


def test_a_token_for_a_deleted_sandbox(gw: Gateway, loop_thread: Any) -> None:
    info = loop_thread.run(gw.create_sandbox())
    link = on_loop(loop_thread, gw.create_grant, info.id, 600, ports=("vnc",))
    loop_thread.run(gw.destroy_sandbox(info.id))
    for token in (link["token"], info.token):
        report = walk(gw, loop_thread, info.id, token=token)
        broken(report, "route", f"sandbox {info.id}", "deleted at", "new sandbox")
    report = walk(gw, loop_thread, "000000")
    broken(report, "route", "no sandbox '000000'")


def test_tokens_are_checked_for_validity_and_scope(gw: Gateway, loop_thread: Any,
                                                   sandbox: Any) -> None:
    link = on_loop(loop_thread, gw.create_grant, sandbox.id, 600, ports=("vnc",))
    ok = walk(gw, loop_thread, sandbox.id, token=link["token"], port="vnc")
    assert ok.healthy and any(r.check == "token" and r.status == "ok" for r in ok.rows)
    on_loop(loop_thread, gw.revoke_grant, sandbox.id, link["id"])
    broken(walk(gw, loop_thread, sandbox.id, token=link["token"]), "route", "revoked")
    broken(walk(gw, loop_thread, sandbox.id, token="not-a-token"), "route", "token",
           "no sandbox of this gateway")
    broken(walk(gw, loop_thread, sandbox.id, port="nope"), "route", "exposes no port")


def test_the_cli_and_the_api_give_the_same_walk(gw: Gateway, loop_thread: Any,
                                                sandbox: Any) -> None:
    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "sandport", "doctor", *args,
                               "--state-dir", str(gw.config.state_dir)],
                              capture_output=True, text=True, timeout=60, check=False)

    r = cli(sandbox.id, "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    doc = json.loads(r.stdout)
    jsonschema.validate(doc, SCHEMA)
    assert doc["healthy"] and [x["status"] for x in doc["gateway"]] == ["ok", "ok"]
    [report] = doc["reports"]
    assert report["sandbox"] == sandbox.id and report["failed"] is None
    table = cli(sandbox.id)
    assert table.returncode == 0 and "healthy" in table.stderr and "guest service" in table.stdout
    # The API gives the same rows.
    req = urllib.request.Request(f"{gw.base_url}/api/sandboxes/{sandbox.id}/doctor?port=vnc",
                                 headers={"Authorization": f"Bearer {gw.admin_token}"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        api = json.loads(resp.read())
    jsonschema.validate(api, SCHEMA["$defs"]["report"] | {"$defs": SCHEMA["$defs"]})
    assert api["healthy"] and all(r["port"] in ("vnc", "") for r in api["rows"])
    # A fault: exit 1, the broken hop on stderr, the fix too.
    subprocess.run(["ip", "link", "set", f"sp-{sandbox.id}-v", "nomaster"], check=True)
    bad = cli(sandbox.id)
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert "broken hop: host network" in bad.stderr and "fix:" in bad.stderr
    # No gateway: the gateway hop fails, exit 1; bad usage exits 2.
    missing = subprocess.run([sys.executable, "-m", "sandport", "doctor", "--json",
                              "--state-dir", "/nonexistent-sandport"], capture_output=True,
                             text=True, timeout=60, check=False)
    assert missing.returncode == 1
    doc = json.loads(missing.stdout)
    jsonschema.validate(doc, SCHEMA)
    assert doc["gateway"][0]["status"] == "fail" and "sandport up" in doc["gateway"][0]["fix"]
    usage = subprocess.run([sys.executable, "-m", "sandport", "doctor", "--json", "--port"],
                           capture_output=True, text=True, timeout=60, check=False)
    assert usage.returncode == 2 and "Traceback" not in usage.stderr


def test_a_degraded_sandbox_carries_the_doctors_finding(gateway_factory: Any,
                                                        loop_thread: Any) -> None:
    """The monitor finds the sandbox degraded, the gateway walks it at once: the readiness
    details, the event log and the bridge's refusal name the broken hop; repaired, it is
    ready again and the finding is gone."""
    own: Gateway = gateway_factory(probe_interval=0.5, forward_mode="proxy")
    info = loop_thread.run(own.create_sandbox())
    link, bridge = f"sp-{info.id}-v", own.config.net.bridge
    subprocess.run(["ip", "link", "set", link, "nomaster"], check=True)

    def api() -> Any:
        req = urllib.request.Request(f"{own.base_url}/api/sandboxes/{info.id}",
                                     headers={"Authorization": f"Bearer {own.admin_token}"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())

    eventually_sync(lambda: api()["readiness"]["diagnosis"] is not None, within=15)
    doc = api()
    assert doc["state"] == "degraded"
    finding = doc["readiness"]["diagnosis"]
    assert finding["hop"] == "host network" and finding["check"] == "sandbox link", finding
    events = on_loop(loop_thread, own.event_log, sandbox_id=info.id)
    assert any(e.kind == "sandbox.diagnosis" and e.data["hop"] == "host network"
               for e in events)

    async def refusal() -> tuple[int, dict[str, Any]]:
        url = f"ws://127.0.0.1:{own.http_port}/s/{info.id}/ports/vnc/ws?token={info.token}"
        try:
            async with connect(url, open_timeout=20, subprotocols=["binary"]):  # type: ignore[list-item]
                return 101, {}
        except InvalidStatus as exc:
            return exc.response.status_code, json.loads(exc.response.body or b"{}")

    status, body = asyncio.run(refusal())
    assert status in (502, 504), body
    assert body["hop"] == "guest reachability", body
    assert "sandport doctor: host network hop, sandbox link" in body["message"], body
    subprocess.run(["ip", "link", "set", link, "master", bridge], check=True)
    subprocess.run(["bridge", "link", "set", "dev", link, "isolated", "on"], check=True)
    eventually_sync(lambda: api()["state"] == "ready", within=15)
    assert api()["readiness"]["diagnosis"] is None
    loop_thread.run(own.destroy_sandbox(info.id))


def test_a_sandbox_link_that_lost_its_isolation_is_a_warning(gw: Gateway, loop_thread: Any,
                                                            sandbox: Any) -> None:
    link = f"sp-{sandbox.id}-v"
    subprocess.run(["bridge", "link", "set", "dev", link, "isolated", "off"], check=True)
    report = walk(gw, loop_thread, sandbox.id)
    [row] = [r for r in report.rows if r.check == "sandbox link"]
    assert report.healthy and row.status == "warn", row
    assert "not isolated" in row.evidence and f"bridge link set dev {link} isolated on" in row.fix
