"""`-p` spec parsing: the docker/podman syntax, ranges, protocols, overlaps."""

from __future__ import annotations

import pytest

from sandport.forward.spec import PortMapping, PortSpecError, check_overlaps, parse_port_spec

pytestmark = pytest.mark.unit


def m(ip: str, host: int, guest: int, proto: str = "tcp") -> PortMapping:
    return PortMapping(host_ip=ip, host_port=host, guest_port=guest, protocol=proto)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("15901:5901", [m("127.0.0.1", 15901, 5901)]),
        ("0.0.0.0:8080:80/tcp", [m("0.0.0.0", 8080, 80)]),
        ("5353:53/udp", [m("127.0.0.1", 5353, 53, "udp")]),
        ("5353:53/TCP+UDP", [m("127.0.0.1", 5353, 53), m("127.0.0.1", 5353, 53, "udp")]),
        ("15900-15902:5900-5902",
         [m("127.0.0.1", 15900, 5900), m("127.0.0.1", 15901, 5901), m("127.0.0.1", 15902, 5902)]),
        (":5901", [m("127.0.0.1", 0, 5901)]),
        ("0:5901", [m("127.0.0.1", 0, 5901)]),
        (":5900-5901", [m("127.0.0.1", 0, 5900), m("127.0.0.1", 0, 5901)]),
        ("[::1]:8080:80", [m("::1", 8080, 80)]),
        ("[::]:8080:80/udp", [m("::", 8080, 80, "udp")]),
        (" 10.1.2.3:1:65535 ", [m("10.1.2.3", 1, 65535)]),
    ],
)
def test_valid_specs(spec: str, expected: list[PortMapping]) -> None:
    assert parse_port_spec(spec) == expected


@pytest.mark.parametrize(
    ("spec", "why"),
    [
        ("", "empty"),
        ("5901", "expected HOSTPORT:GUESTPORT"),
        ("a:b", "not a port number"),
        ("1:2:3:4", "expected HOSTPORT:GUESTPORT"),
        ("localhost:80:80", "not an IP address"),
        ("80:70000", "outside 1-65535"),
        ("80:0", "outside 1-65535"),
        ("15900-15909:5900-5901", "they map port by port"),
        ("15909-15900:5909-5900", "runs backwards"),
        ("1-2000:1-2000", "more than 1024 ports"),
        ("80:80/sctp", "not tcp, udp or tcp+udp"),
        ("80:80/tcp+tcp", "not tcp, udp or tcp+udp"),
        ("80:80/", "not tcp, udp or tcp+udp"),
        ("[::1:80:80", "IPv6 host address"),
        ("[::1]:80", "expected [ADDR]:HOSTPORT:GUESTPORT"),
        ("-1:80", "not a port number"),
        ("1\u00b2:80", "not a port number"),  # '²'.isdigit(), int('²') fails
        ("80:\u0663", "not a port number"),  # an Arabic-Indic 3
    ],
)
def test_invalid_specs_say_why_and_show_the_syntax(spec: str, why: str) -> None:
    with pytest.raises(PortSpecError) as info:
        parse_port_spec(spec)
    text = str(info.value)
    assert why in text
    assert "HOSTPORT:GUESTPORT[/tcp|/udp|/tcp+udp]" in text  # the syntax, in the hint
    assert info.value.exit_code == 2


def test_overlaps_name_the_owner() -> None:
    existing = {m("127.0.0.1", 15901, 5901): "sandbox abc123 (vnc)"}
    with pytest.raises(PortSpecError, match="already forwarded by sandbox abc123"):
        check_overlaps(parse_port_spec("15901:22"), existing)
    with pytest.raises(PortSpecError, match="already forwarded by sandbox abc123"):
        check_overlaps(parse_port_spec("0.0.0.0:15901:22"), existing)  # wildcard covers all
    with pytest.raises(PortSpecError, match=r"asked for twice: by -p 127\.0\.0\.1:9000:1/tcp"):
        check_overlaps(parse_port_spec("9000:1") + parse_port_spec("9000:2"), {})
    # Different protocol, different address or "any port" do not clash.
    check_overlaps(parse_port_spec("15901:5901/udp"), existing)
    check_overlaps(parse_port_spec("10.9.9.9:15901:5901"), existing)
    check_overlaps(parse_port_spec(":5901") + parse_port_spec(":5901"), existing)
