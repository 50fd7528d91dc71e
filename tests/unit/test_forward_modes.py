"""Forward mode choice, ingress interfaces and the Prometheus text (no network needed)."""

from __future__ import annotations

import pytest

from sandport.control.forwards import ForwardOptions, choose_mode
from sandport.control.metrics import render
from sandport.errors import UsageError
from sandport.forward.spec import PortMapping
from sandport.net import nft

pytestmark = pytest.mark.unit

V4 = PortMapping(host_ip="127.0.0.1", host_port=8080, guest_port=80)
V6 = PortMapping(host_ip="::1", host_port=8080, guest_port=80)


@pytest.mark.parametrize(
    ("mapping", "options", "nft_ok", "mode", "why"),
    [
        (V4, ForwardOptions(), True, "kernel", "auto: nft DNAT"),
        (V4, ForwardOptions(proxy_protocol=2), True, "proxy", "PROXY protocol"),
        (V4, ForwardOptions(max_connections=5), True, "proxy", "connection limit"),
        (V4, ForwardOptions(idle_timeout=30), True, "proxy", "idle timeout"),
        (V6, ForwardOptions(), True, "proxy", "IPv4 only"),
        (V4, ForwardOptions(), False, "proxy", "apt-get install nftables"),
        (V4, ForwardOptions(mode="proxy"), True, "proxy", "asked for"),
        (V4, ForwardOptions(mode="kernel"), True, "kernel", "asked for"),
    ],
)
def test_auto_picks_kernel_where_it_can_and_says_why_not(
    mapping: PortMapping, options: ForwardOptions, nft_ok: bool, mode: str, why: str
) -> None:
    got_mode, got_why = choose_mode(mapping, options, nft_available=nft_ok)
    assert got_mode == mode
    assert why in got_why


def test_kernel_mode_refuses_what_it_cannot_serve() -> None:
    with pytest.raises(UsageError, match="kernel mode: an idle timeout"):
        choose_mode(V4, ForwardOptions(mode="kernel", idle_timeout=3), nft_available=True)
    with pytest.raises(UsageError, match="IPv4 only"):
        choose_mode(V6, ForwardOptions(mode="kernel"), nft_available=True)
    with pytest.raises(UsageError, match="not one of auto, kernel, proxy"):
        ForwardOptions(mode="fast")


def test_ingress_interfaces_are_exactly_those_holding_forwarded_addresses() -> None:
    ifaces = {"lo": ["127.0.0.1"], "eth0": ["192.0.2.5"], "eth1": ["198.51.100.7"],
              "sp-br0": ["10.201.0.1"]}

    def rule(host_ip: str) -> nft.DnatRule:
        return nft.DnatRule(host_ip=host_ip, host_port=1, guest_ip="10.201.0.2", guest_port=1)

    assert nft.ingress_interfaces([rule("127.0.0.1")], ifaces) == []
    assert nft.ingress_interfaces([rule("198.51.100.7")], ifaces) == ["eth1"]
    assert nft.ingress_interfaces([rule("0.0.0.0")], ifaces) == ["eth0", "eth1", "sp-br0"]


def test_metrics_text_has_help_type_and_escaped_labels() -> None:
    text = render([
        {"id": "f1", "sandbox": "abc", "name": 'we"ird', "protocol": "tcp",
         "host": "127.0.0.1:1", "mode": "proxy", "active": 2, "total": 5, "bytes_up": 10,
         "bytes_down": 20, "failures": {"refused": 1, "limit": 0}},
        {"id": "f2", "sandbox": "abc", "name": "vnc", "protocol": "tcp",
         "host": "127.0.0.1:2", "mode": "kernel", "active": None, "total": 3,
         "bytes_up": None, "bytes_down": None, "failures": {}},
    ], sandboxes=1)
    lines = text.splitlines()
    assert "# TYPE sandport_forward_bytes_total counter" in lines
    labels = ('forward="f1",sandbox="abc",name="we\\"ird",protocol="tcp",'
              'host="127.0.0.1:1",mode="proxy"')
    assert f'sandport_forward_bytes_total{{{labels},direction="down"}} 20' in lines
    assert f'sandport_forward_failures_total{{{labels},reason="refused"}} 1' in lines
    assert f"sandport_forward_connections_active{{{labels}}} 2" in lines
    # Kernel forwards: connections counted, bytes and active unknown (absent, not 0).
    assert any(line.startswith('sandport_forward_connections_total{forward="f2"')
               and line.endswith(" 3") for line in lines)
    assert not any('forward="f2"' in line and "bytes" in line for line in lines)
    assert "sandport_sandboxes 1" in lines
