"""`sandport up` as a user runs it: a subprocess, signals, crashes and bad input."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import require_programs, require_root, test_net_names
from nethelpers import expected_guard_rules, free_port
from sandport.net import antispoof, nft
from sandport.probe import probe_rfb_tcp, probe_rfb_ws
from uphelpers import SANDPORT, up_factory  # noqa: F401 - a fixture

pytestmark = pytest.mark.integration

def test_up_demo_then_sigint_leaves_nothing(up_factory: Any, leftovers: Any) -> None:
    up = up_factory("--demo")
    ready = up.wait_ready()
    for key in ("id", "ip", "state", "desktop_url", "vnc", "vnc_password"):
        assert key in ready
    assert ready["state"] == "ready"
    assert ready["desktop_url"].startswith("http://127.0.0.1:"), ready["desktop_url"]
    assert httpx.get(ready["desktop_url"], timeout=10).status_code == 302
    print(f"demo sandbox ready in {ready['ready_seconds']:.2f} s")
    # The printed addresses work: VNC through the host port, and the bridge.
    vnc = ready["vnc"]
    r = asyncio.run(probe_rfb_tcp(vnc["host"], vnc["port"], password=ready["vnc_password"]))
    assert r.ok and r.desktop == f"sandport {ready['id']}", r.detail
    base = ready["desktop_url"].split("/s/")[0].replace("http://", "ws://")
    r = asyncio.run(probe_rfb_ws(f"{base}/s/{ready['id']}/ports/vnc/ws?token={ready['token']}",
                                 password=ready["vnc_password"]))
    assert r.ok, r.detail
    assert leftovers(bridge=None, sandbox_ids=[ready["id"]], state_dir=up.state_dir) != []
    code, stderr = up.stop(signal.SIGINT)
    assert code == 0, stderr
    assert "Traceback" not in stderr
    assert leftovers(bridge=up.bridge, sandbox_ids=[ready["id"]], state_dir=up.state_dir) == []
    with socket.socket() as s:
        assert s.connect_ex((vnc["host"], vnc["port"])) != 0


def test_wildcard_binds_print_addresses_that_connect(up_factory: Any, leftovers: Any) -> None:
    # The last --listen wins (the factory's own is 127.0.0.1:0). Proxy mode: a wildcard
    # kernel forward would turn forwarding on for this machine's own eth0.
    up = up_factory("--demo", "--forward-host", "0.0.0.0", "--listen", "0.0.0.0:0",
                    "--forward-mode", "proxy")
    ready = up.wait_ready()
    # Links and the VNC address name an address remote clients reach: the default
    # route's (issue 17); both connect.
    route = subprocess.run(["ip", "-j", "route", "get", "198.51.100.1"], capture_output=True,
                           text=True, check=False)
    host = json.loads(route.stdout)[0]["prefsrc"] if route.returncode == 0 else "127.0.0.1"
    assert ready["desktop_url"].startswith(f"http://{host}:"), ready["desktop_url"]
    assert ready["vnc"]["host"] == host, ready["vnc"]
    assert httpx.get(ready["desktop_url"], timeout=10).status_code == 302
    for vnc_host in (host, "127.0.0.1"):
        r = asyncio.run(probe_rfb_tcp(vnc_host, ready["vnc"]["port"],
                                      password=ready["vnc_password"]))
        assert r.ok, (vnc_host, r.detail)
    code, stderr = up.stop()
    assert code == 0, stderr
    # The first line says it listens on every address, and where this host reaches it.
    assert re.search(r"gateway on 0\.0\.0\.0 port \d+ \(http://127\.0\.0\.1:\d+ from here\)",
                     stderr), stderr
    assert leftovers(bridge=up.bridge, sandbox_ids=[ready["id"]], state_dir=up.state_dir) == []


def test_sigterm_also_stops_cleanly(up_factory: Any, leftovers: Any) -> None:
    up = up_factory("--demo")
    ready = up.wait_ready()
    code, stderr = up.stop(signal.SIGTERM)
    assert code == 0, stderr
    assert leftovers(bridge=up.bridge, sandbox_ids=[ready["id"]], state_dir=up.state_dir) == []


def test_kill_9_then_restart_leaves_exactly_the_new_kernel_rules(
    up_factory: Any, tmp_path: Path
) -> None:
    """The restart reconciles nft: the adopted sandbox's rules and the new one's, each once."""
    state = tmp_path / "nft-state"
    p1, p2 = free_port(), free_port(socket.SOCK_DGRAM)
    first = up_factory("--demo", "-p", f"{p1}:7", "-p", f"{p2}:7/udp", state_dir=state)
    adopted = first.wait_ready()
    token = json.loads((state / "gateway.json").read_text())["admin_token"]
    assert (state / "admin-token").stat().st_mode & 0o777 == 0o600
    bridge = first.bridge
    assert len(nft.rules_of(bridge)) == 4  # vnc, tcp, udp (output hook) + masquerade
    first.proc.kill()  # SIGKILL: the rules stay behind
    first.proc.communicate(timeout=10)
    assert len(nft.rules_of(bridge)) == 4
    p3 = free_port()
    second = up_factory("--demo", "-p", f"{p3}:7", state_dir=state, bridge=bridge,
                        subnet=first.subnet)
    ready = second.wait_ready()
    # The admin token survives the restart: scripts and SDK clients keep working.
    assert json.loads((state / "gateway.json").read_text())["admin_token"] == token
    vnc, old_vnc, old_ip = ready["vnc"]["port"], adopted["vnc"]["port"], adopted["ip"]
    assert sorted(nft.rules_of(bridge)) == sorted([
        (f"out-{bridge}", f"sandport tcp 127.0.0.1:{old_vnc} -> {old_ip}:5901"),
        (f"out-{bridge}", f"sandport tcp 127.0.0.1:{p1} -> {old_ip}:7"),
        (f"out-{bridge}", f"sandport udp 127.0.0.1:{p2} -> {old_ip}:7"),
        (f"out-{bridge}", f"sandport tcp 127.0.0.1:{vnc} -> {ready['ip']}:5901"),
        (f"out-{bridge}", f"sandport tcp 127.0.0.1:{p3} -> {ready['ip']}:7"),
        (f"post-{bridge}", "sandport: replies to 127.0.0.1"),
    ])
    # The guard too: host isolation once, anti-spoofing on exactly the two ports.
    assert sorted(nft.own_chains(bridge)) == sorted([*nft.chain_names(bridge),
                                                     *nft.guard_chain_names(bridge)])
    assert nft.guard_rules(bridge) == expected_guard_rules(bridge)
    assert antispoof.guarded(bridge) == {
        f"sp-{sb['id']}-v": (antispoof.sandbox_mac(sb["id"]), sb["ip"]) for sb in (adopted, ready)}
    # `sandport forward list` asks the running gateway: mode, why, counters.
    table = _run_cli("forward", "list", "--state-dir", str(state))
    assert table.returncode == 0, table.stderr
    assert f"127.0.0.1:{p3}" in table.stdout and "kernel (DNAT)" in table.stdout
    listed = json.loads(_run_cli("forward", "list", "--state-dir", str(state), "--json").stdout)
    assert [(f["sandbox"], f["name"], f["mode"]) for f in listed] == [
        (adopted["id"], "vnc", "kernel"), (adopted["id"], "7/tcp", "kernel"),
        (adopted["id"], "7/udp", "kernel"), (ready["id"], "vnc", "kernel"),
        (ready["id"], "7/tcp", "kernel")]
    assert listed[3]["total"] >= 1  # the readiness probe went through the DNAT rule
    code, stderr = second.stop()
    assert code == 0, stderr
    assert nft.own_chains(bridge) == []
    # The bridge's lock and the app's socket in /run/sandport are gone with it.
    assert not list(Path("/run/sandport").glob(f"bridge-{bridge}.*"))
    gone = _run_cli("forward", "list", "--state-dir", str(state))
    assert gone.returncode == 2 and "no gateway runs" in gone.stderr


def test_publish_needs_a_sandbox_and_a_valid_spec(tmp_path: Path) -> None:
    r = _run_cli("up", "-p", "8080:80", "--state-dir", str(tmp_path))
    assert r.returncode == 2 and "add --demo" in r.stderr
    r = _run_cli("up", "--demo", "-p", "80:8080:x", "--state-dir", str(tmp_path))
    assert r.returncode == 2 and "invalid port spec" in r.stderr
    assert "HOSTPORT:GUESTPORT" in r.stderr
    r = _run_cli("up", "--demo", "-p", "9000:80", "-p", "9000:81", "--state-dir", str(tmp_path))
    assert r.returncode == 2 and "asked for twice: by -p 9000:80 and by -p 9000:81" in r.stderr
    r = _run_cli("up", "--demo", "--forward-mode", "fast", "--state-dir", str(tmp_path))
    assert r.returncode == 2 and "not one of auto, kernel, proxy" in r.stderr


def test_a_bad_secret_key_file_is_named(up_factory: Any, tmp_path: Path) -> None:
    missing = tmp_path / "nope.key"
    up = up_factory("--secret-key-file", str(missing), state_dir=tmp_path / "k-state")
    _, stderr = up.proc.communicate(timeout=30)
    assert up.proc.returncode == 2, stderr
    assert f"secret key file {missing} does not exist" in stderr and "openssl rand" in stderr
    (tmp_path / "short.key").write_text("abcd\n")
    up = up_factory("--secret-key-file", str(tmp_path / "short.key"),
                    state_dir=tmp_path / "k-state")
    _, stderr = up.proc.communicate(timeout=30)
    assert up.proc.returncode == 2 and "must hold 64 hex digits" in stderr, stderr
    assert not (tmp_path / "k-state" / "secret.key").exists()  # the named key, none other


def test_second_gateway_on_the_same_state_dir_is_refused(up_factory: Any) -> None:
    first = up_factory()
    first.wait_http()
    second = up_factory(bridge=first.bridge, subnet=first.subnet)
    second.proc.wait(timeout=30)
    stderr = second.proc.stderr.read() if second.proc.stderr else ""
    assert second.proc.returncode == 2, stderr
    assert "in use by gateway pid" in stderr and str(first.proc.pid) in stderr
    code, _ = first.stop()
    assert code == 0


def test_second_gateway_on_the_same_bridge_is_refused(up_factory: Any, tmp_path: Path) -> None:
    first = up_factory()
    first.wait_http()
    second = up_factory(state_dir=tmp_path / "other-state", bridge=first.bridge,
                        subnet=str(test_net_names()[1]))
    second.proc.wait(timeout=30)
    stderr = second.proc.stderr.read() if second.proc.stderr else ""
    assert second.proc.returncode == 2, stderr
    assert f"bridge {first.bridge} is in use by gateway pid {first.proc.pid}" in stderr
    # The first gateway's bridge was neither re-addressed nor deleted.
    out = subprocess.run(["ip", "-br", "addr", "show", "dev", first.bridge],
                         capture_output=True, text=True, check=False).stdout
    assert first.subnet.rsplit(".", 1)[0] in out, out
    code, _ = first.stop()
    assert code == 0


def _run_cli(*args: str, env: dict[str, str] | None = None,
             drop_caps: bool = False) -> subprocess.CompletedProcess[str]:
    cmd = [*SANDPORT, *args]
    if drop_caps:  # root without CAP_NET_ADMIN/CAP_SYS_ADMIN, as in an unprivileged container
        cmd = ["setpriv", "--bounding-set=-net_admin,-sys_admin", "--inh-caps=-all", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env,
                          check=False)


def test_gateway_port_in_use_exits_2_naming_the_port(tmp_path: Path) -> None:
    require_root()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        bridge, subnet = test_net_names()
        r = _run_cli("up", "--listen", f"127.0.0.1:{port}", "--state-dir", str(tmp_path),
                     "--bridge", bridge, "--subnet", str(subnet))
    assert r.returncode == 2, r.stderr
    assert f"127.0.0.1:{port} is already in use" in r.stderr
    assert "Traceback" not in r.stderr
    assert "stopping" not in r.stderr  # nothing started, so nothing is said to stop
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert bridge not in links  # the bridge made before the bind failed is gone again


def test_vnc_port_in_use_exits_2_and_leaves_nothing(tmp_path: Path, leftovers: Any) -> None:
    require_root()
    require_programs("Xvnc")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        bridge, subnet = test_net_names()
        r = _run_cli("up", "--demo", "--listen", "127.0.0.1:0", "--vnc-port", str(port),
                     "--state-dir", str(tmp_path), "--bridge", bridge, "--subnet", str(subnet))
    assert r.returncode == 2, r.stderr
    assert f"VNC port 127.0.0.1:{port} is already in use" in r.stderr
    assert leftovers(bridge=bridge, sandbox_ids=[], state_dir=tmp_path) == []
    assert not list((tmp_path / "sandboxes").iterdir())


def test_missing_capabilities_are_named(tmp_path: Path) -> None:
    require_root()  # to drop capabilities one must have them
    require_programs("setpriv")
    r = _run_cli("up", "--state-dir", str(tmp_path / "s"), drop_caps=True)
    assert r.returncode == 2, r.stderr
    assert "without CAP_NET_ADMIN and CAP_SYS_ADMIN" in r.stderr
    assert "--privileged" in r.stderr  # the hint fits root in a container
    assert "Traceback" not in r.stderr


def test_missing_package_is_named(tmp_path: Path) -> None:
    require_root()
    empty = tmp_path / "bin"
    empty.mkdir()
    r = _run_cli("up", "--state-dir", str(tmp_path / "s"),
                 env={**os.environ, "PATH": str(empty)})
    assert r.returncode == 2, r.stderr
    assert "tigervnc-standalone-server" in r.stderr and "openbox" in r.stderr
    assert "apt-get install" in r.stderr


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--subnet", "10.201.0.0/33"], "--subnet"),
        (["--subnet", "10.201.0.7/24"], "--subnet"),
        (["--bridge", "br0"], "must start with 'sp-'"),
        (["--listen", "localhost:http"], "is not an address"),
        (["--listen", "127.0.0.1:70000"], "outside 0-65535"),
        (["--log-level", "loud"], "unknown log level"),
        (["--vnc-port", "-1"], "vnc-port"),
        (["--cert", "/nonexistent.pem"], "no such file"),
        (["--ssl-only"], "need --cert"),
        (["--trusted-proxy", "lan"], "is not an address or network"),
    ],
)
def test_bad_flags_exit_2_with_a_message(args: list[str], needle: str) -> None:
    r = _run_cli("up", *args)
    assert r.returncode == 2, r.stderr
    assert needle in r.stderr
    assert "Traceback" not in r.stderr


def test_help_teaches() -> None:
    r = _run_cli("up", "--help")
    assert r.returncode == 0
    for word in ("--demo", "--listen", "--state-dir", "SANDPORT-READY", "Examples"):
        assert word in r.stdout


def test_sandbox_commands_talk_to_the_running_gateway(up_factory: Any, tmp_path: Path) -> None:
    state = tmp_path / "api-state"
    up = up_factory(state_dir=state)
    up.wait_http()
    port = free_port()
    made = _run_cli("sandbox", "create", "-p", f"{port}:7", "--state-dir", str(state))
    assert made.returncode == 0, made.stderr
    sb = json.loads(made.stdout)
    assert sb["state"] == "ready" and f"127.0.0.1:{port}" in [f["host"] for f in sb["forwards"]]
    listed = _run_cli("sandbox", "list", "--state-dir", str(state))
    assert listed.returncode == 0, listed
    assert listed.stdout.splitlines()[1].split()[0] == sb["id"] and "ready" in listed.stdout
    # Access tokens: a desktop link limited to the VNC port, listed, revoked.
    made = _run_cli("token", "create", sb["id"], "--ttl", "600", "--port", "vnc", "--json",
                    "--state-dir", str(state))
    assert made.returncode == 0, made.stderr
    token = json.loads(made.stdout)
    assert token["ports"] == ["vnc"] and f"/s/{sb['id']}/?token=" in token["desktop_url"]
    tokens = _run_cli("token", "list", sb["id"], "--state-dir", str(state))
    row = tokens.stdout.splitlines()[1].split()  # ID STATE EXPIRES (2 words) PORTS KINDS
    assert row[:2] == [token["id"], "valid"] and row[4:] == ["vnc", "all"], tokens.stdout
    assert token["token"] not in tokens.stdout  # shown once, at creation
    bad = _run_cli("token", "create", sb["id"], "--kind", "tcp", "--state-dir", str(state))
    assert bad.returncode == 2 and "not one of ws, http" in bad.stderr
    revoked = _run_cli("token", "revoke", sb["id"], token["id"], "--state-dir", str(state))
    assert revoked.returncode == 0 and f"revoked {token['id']}" in revoked.stderr
    assert "no access tokens" in _run_cli("token", "list", sb["id"], "--state-dir",
                                          str(state)).stderr
    gone = _run_cli("sandbox", "rm", sb["id"], "--state-dir", str(state))
    assert gone.returncode == 0 and f"removed {sb['id']}" in gone.stderr
    assert "no sandboxes" in _run_cli("sandbox", "list", "--state-dir", str(state)).stderr
    again = _run_cli("sandbox", "rm", sb["id"], "--state-dir", str(state))
    assert again.returncode == 2 and "answered 404: no sandbox" in again.stderr
    bad = _run_cli("sandbox", "create", "-p", "80:x", "--state-dir", str(state))
    assert bad.returncode == 2 and "invalid port spec" in bad.stderr, bad.stderr
    code, stderr = up.stop()
    assert code == 0, stderr
    after = _run_cli("sandbox", "list", "--state-dir", str(state))
    assert after.returncode == 2 and "no gateway runs" in after.stderr
