"""Host port forwards through a real gateway: modes, remote clients, PROXY protocol, errors.

Every sandbox here is a real desktop sandbox; the extra guest services (an echo server on
TCP and UDP port 7, a PROXY v1 reader on port 8) run inside its namespace.
"""

from __future__ import annotations

import json
import socket
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nethelpers import (
    ECHO_SERVER,
    PROXY_V1_SERVER,
    RemoteHost,
    client,
    free_port,
    guest_server,
    remote_host,
    run_in_netns,
)
from sandport.control.forwards import ForwardOptions
from sandport.control.gateway import Gateway
from sandport.errors import PortInUseError, UsageError
from sandport.forward.spec import PortSpecError, parse_port_spec
from sandport.net import nft

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def remote() -> Iterator[RemoteHost]:
    with remote_host() as r:
        yield r


def api(gw: Gateway, path: str, token: str | None = None) -> Any:
    req = urllib.request.Request(f"{gw.base_url}{path}", headers={
        "Authorization": f"Bearer {token or gw.admin_token}"})
    with urllib.request.urlopen(req, timeout=5) as r:
        body = r.read().decode()
        return json.loads(body) if path.startswith("/api") else body


def test_kernel_forwards_serve_local_and_remote_clients(
    gateway_factory: Any, loop_thread: Any, remote: RemoteHost, tmp_path: Path
) -> None:
    gw: Gateway = gateway_factory()
    tport, uport = free_port(), free_port(socket.SOCK_DGRAM)
    publish = [*parse_port_spec(f"127.0.0.1:{tport}:7"),
               *parse_port_spec(f"{remote.host_ip}:{tport}:7"),  # same port, another address
               *parse_port_spec(f"127.0.0.1:{uport}:7/udp"),
               *parse_port_spec(f"{remote.host_ip}:{uport}:7/udp")]
    info = loop_thread.run(gw.create_sandbox(publish=publish))
    modes = {(f["name"], f["host"]): (f["mode"], f["why"]) for f in info.forwards}
    assert all(mode == "kernel" for mode, _ in modes.values()), modes
    assert modes[("vnc", f"127.0.0.1:{info.vnc_port}")][0] == "kernel"
    log = tmp_path / "echo.log"
    with guest_server(f"sp-{info.id}", ECHO_SERVER, str(log)):
        for proto, port in (("tcp", tport), ("udp", uport)):
            # A client on the host, to 127.0.0.1 (output hook, route_localnet, masquerade).
            assert client(None, tmp_path, "127.0.0.1", port, proto) == "OK", proto
            # A remote host, to the host's address on its link (prerouting; the gateway
            # turned forwarding on for exactly the interfaces holding forwarded addresses).
            assert client(remote.netns, tmp_path, remote.host_ip, port, proto) == "OK", proto
    seen = log.read_text().splitlines()
    # Kernel forwards keep a remote client's address: the guest sees it.
    assert f"tcp {remote.ip}" in seen and f"udp {remote.ip}" in seen
    assert Path(f"/proc/sys/net/ipv4/conf/{remote.link}/forwarding").read_text() == "1\n"
    # The table holds exactly these forwards (two hooks each, 127.0.0.1 only in output).
    rules = nft.rules_of(gw.config.net.bridge)
    assert len([r for r in rules if r[0].startswith("out-")]) == 5  # vnc + 4
    assert len([r for r in rules if r[0].startswith("pre-")]) == 2  # the remote address
    # Forward list and metrics: kernel forwards count the connections they translated.
    listing = {(f["name"], f["host"]): f for f in api(gw, "/api/forwards")["forwards"]}
    tcp_local = listing[("7/tcp", f"127.0.0.1:{tport}")]
    assert (tcp_local["mode"], tcp_local["data_path"], tcp_local["total"]) == (
        "kernel", "kernel", 1)
    assert listing[("vnc", f"127.0.0.1:{info.vnc_port}")]["total"] >= 1  # the readiness probe
    metrics = api(gw, "/metrics")
    assert (f'sandport_forward_connections_total{{forward="{tcp_local["id"]}",'
            f'sandbox="{info.id}",name="7/tcp"') in metrics
    loop_thread.run(gw.destroy_sandbox(info.id))
    assert nft.rules_of(gw.config.net.bridge) == []


def test_proxy_protocol_gives_the_guest_the_real_client(
    gateway_factory: Any, loop_thread: Any, remote: RemoteHost
) -> None:
    gw: Gateway = gateway_factory()
    port = free_port()
    info = loop_thread.run(gw.create_sandbox(
        publish=parse_port_spec(f"0.0.0.0:{port}:8"), options=ForwardOptions(proxy_protocol=1)))
    fwd = next(f for f in info.forwards if f["name"] == "8/tcp")
    assert fwd["mode"] == "proxy" and "PROXY protocol" in fwd["why"]  # auto says why
    with guest_server(f"sp-{info.id}", PROXY_V1_SERVER):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            me = s.getsockname()
            line = s.makefile("rb").readline().decode()
        assert line == f"PROXY TCP4 127.0.0.1 127.0.0.1 {me[1]} {port}\r\n"
        # A remote client: the guest reads the remote host's address, not the gateway's.
        code = ("import socket, sys; s = socket.create_connection((sys.argv[1], int(sys.argv[2]))"
                ", timeout=5); print(s.makefile('rb').readline().decode().strip())")
        got = run_in_netns(remote.netns, code, remote.host_ip, str(port))
        assert got.startswith(f"PROXY TCP4 {remote.ip} {remote.host_ip} "), got
    listing = {f["name"]: f for f in api(gw, "/api/forwards")["forwards"]}
    fwd = listing["8/tcp"]
    assert (fwd["total"], fwd["active"], fwd["data_path"]) == (2, 0, "splice")
    # The guest sent two PROXY lines back: the relay counted them, and /metrics shows it.
    assert fwd["bytes_down"] >= 2 * len("PROXY TCP4 127.0.0.1 127.0.0.1 1 1\r\n")
    assert (f'direction="down"}} {fwd["bytes_down"]}') in api(gw, "/metrics")
    loop_thread.run(gw.destroy_sandbox(info.id))


def test_overlaps_and_taken_ports_are_refused_naming_the_owner(
    gateway_factory: Any, loop_thread: Any
) -> None:
    gw: Gateway = gateway_factory(forward_mode="proxy")
    port = free_port()
    a = loop_thread.run(gw.create_sandbox(publish=parse_port_spec(f"{port}:7")))
    # Another sandbox asking for the same host port: refused, naming sandbox a.
    with pytest.raises(PortSpecError, match=f"already forwarded by sandbox {a.id}"):
        loop_thread.run(gw.create_sandbox(publish=parse_port_spec(f"{port}:7")))
    # The same port twice in one request.
    other = free_port()
    with pytest.raises(PortSpecError, match=f"127.0.0.1:{other}/tcp is asked for twice"):
        loop_thread.run(gw.create_sandbox(publish=[*parse_port_spec(f"{other}:7"),
                                                   *parse_port_spec(f"{other}:8")]))
    # A port another program holds.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        with pytest.raises(PortInUseError, match=str(taken.getsockname()[1])):
            loop_thread.run(gw.create_sandbox(
                publish=parse_port_spec(f"{taken.getsockname()[1]}:7")))
    # Kernel mode cannot add PROXY headers: a clear refusal, not a silent downgrade.
    with pytest.raises(UsageError, match="kernel mode: PROXY protocol"):
        loop_thread.run(gw.create_sandbox(publish=parse_port_spec(f"{free_port()}:7"),
                                          options=ForwardOptions(mode="kernel",
                                                                 proxy_protocol=2)))
    # Nothing of the failed attempts stayed: only sandbox a and its two forwards.
    assert gw.sandbox_ids() == [a.id]
    assert [f["sandbox"] for f in api(gw, "/api/forwards")["forwards"]] == [a.id, a.id]


def test_admin_routes_need_the_admin_token(gateway_factory: Any) -> None:
    gw: Gateway = gateway_factory()
    for path in ("/api/forwards", "/metrics"):
        for headers, status in (({}, 401), ({"Authorization": "Bearer nope"}, 403)):
            req = urllib.request.Request(f"{gw.base_url}{path}", headers=headers)
            with pytest.raises(urllib.error.HTTPError) as info:
                urllib.request.urlopen(req, timeout=5)
            assert info.value.code == status
            assert "admin token" in json.loads(info.value.read())["message"]
    doc = json.loads(gw.gateway_file.read_text())
    assert doc["admin_token"] == gw.admin_token
    assert gw.gateway_file.stat().st_mode & 0o777 == 0o600
