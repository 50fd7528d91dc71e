"""Sorting a request's ``-p`` mappings onto the ports a sandbox exposes (``place``): a spec
for an exposed port sets its host side, as docker does; clashes name the other spec."""

from __future__ import annotations

import pytest

from sandport.cli.up import DEMO_VNC_PORT, _demo_vnc
from sandport.errors import UsageError
from sandport.forward.spec import (
    ExposedPort,
    PortMapping,
    PortSpecError,
    parse_port_spec,
    place,
)

pytestmark = pytest.mark.unit


def m(host: int, guest: int, proto: str = "tcp", ip: str = "127.0.0.1") -> PortMapping:
    return PortMapping(host_ip=ip, host_port=host, guest_port=guest, protocol=proto)


def vnc(host_port: int = 0, *, fixed: bool = False) -> ExposedPort:
    return ExposedPort(name="vnc", guest_port=5901, default=m(host_port, 5901),
                       label=f"vnc_port {host_port}", fixed=fixed)


def specs(*texts: str) -> list[PortMapping]:
    return [x for t in texts for x in parse_port_spec(t)]


def test_a_spec_for_the_exposed_port_sets_its_host_side() -> None:
    got = place(specs("18962:5901"), [vnc()])
    assert got.exposed == (("vnc", m(18962, 5901)),) and got.extra == ()
    assert got.asked == {"vnc"}
    # Its host address too.
    got = place(specs("0.0.0.0:18962:5901"), [vnc()])
    assert got.exposed == (("vnc", m(18962, 5901, ip="0.0.0.0")),)
    # No spec for it: the default; every other spec is an extra forward, in order.
    got = place(specs("18080:8080", "15353:53/udp"), [vnc(15901)])
    assert got.exposed == (("vnc", m(15901, 5901)),) and got.asked == set()
    assert got.extra == (("8080/tcp", m(18080, 8080)), ("53/udp", m(15353, 53, "udp")))


def test_ranges_protocols_and_a_second_spec_for_the_same_port() -> None:
    got = place(specs("15900-15902:5900-5902/tcp+udp"), [vnc()])
    assert got.exposed == (("vnc", m(15901, 5901)),)
    assert [name for name, _ in got.extra] == ["5900/tcp", "5902/tcp", "5900/udp",
                                               "5901/udp", "5902/udp"]
    # A UDP spec alone does not set a TCP service's port.
    got = place(specs("15901:5901/udp"), [vnc(0)])
    assert got.exposed == (("vnc", m(0, 5901)),) and got.extra == (
        ("5901/udp", m(15901, 5901, "udp")),)
    # Two host ports for one guest port (docker allows it): the first sets, the second adds.
    got = place(specs("18962:5901", "18963:5901"), [vnc()])
    assert got.exposed == (("vnc", m(18962, 5901)),)
    assert got.extra == (("5901/tcp", m(18963, 5901)),)
    # "Any free port" for the exposed port: it stays any free port, still one forward.
    got = place(specs(":5901"), [vnc()])
    assert got.exposed == (("vnc", m(0, 5901)),) and got.extra == ()


def test_a_port_forwarded_only_when_named() -> None:
    echo = ExposedPort(name="echo", guest_port=7)
    http = ExposedPort(name="http", guest_port=80, default=m(0, 80))
    assert place([], [http, echo]).exposed == (("http", m(0, 80)),)
    got = place(specs("10007:7/tcp+udp"), [http, echo])
    assert got.exposed == (("http", m(0, 80)), ("echo", m(10007, 7)))
    assert got.extra == (("7/udp", m(10007, 7, "udp")),)


def test_an_option_that_chose_the_port_and_a_spec_that_sets_another() -> None:
    # The same port: one forward.
    got = place(specs("15901:5901"), [vnc(15901, fixed=True)])
    assert got.exposed == (("vnc", m(15901, 5901)),)
    # Another one: refused, naming both (not a port clash: a usage error).
    for spec in ("18962:5901", ":5901"):
        with pytest.raises(UsageError, match=r"vnc_port 15901 and -p 127\.0\.0\.1:\d+:5901/tcp "
                           r"both set the host port of the vnc port \(guest port 5901\)") as e:
            place(specs(spec), [vnc(15901, fixed=True)])
        assert not isinstance(e.value, PortSpecError)
    # A default that was not chosen: the spec sets it.
    assert place(specs("18962:5901"), [vnc(15901)]).exposed == (("vnc", m(18962, 5901)),)


def test_clashes_name_the_other_spec_of_the_request_or_the_owner() -> None:
    with pytest.raises(PortSpecError, match=r"host port 127\.0\.0\.1:18961/tcp is asked for "
                       r"twice: by vnc_port 18961 and by -p 127\.0\.0\.1:18961:8080/tcp"):
        place(specs("18961:8080"), [vnc(18961, fixed=True)])
    with pytest.raises(PortSpecError, match="asked for twice: by --vnc-port 18961 and by "
                       "-p 18961:8080"):
        place(specs("18961:8080"), [ExposedPort(name="vnc", guest_port=5901,
                                                default=m(18961, 5901), label="--vnc-port "
                                                "18961", fixed=True)], labels=["-p 18961:8080"])
    # The spec that sets VNC comes first, whatever the order of the request.
    with pytest.raises(PortSpecError, match=r"by -p 127\.0\.0\.1:18961:5901/tcp and by -p "
                       r"127\.0\.0\.1:18961:8080/tcp"):
        place(specs("18961:8080", "18961:5901"), [vnc()])
    with pytest.raises(PortSpecError, match="already forwarded by sandbox 3fa9c1 \\(vnc\\)"):
        place(specs("18961:5901"), [vnc()], existing={m(18961, 5901): "sandbox 3fa9c1 (vnc)"})


def test_up_demo_vnc_port() -> None:
    def labelled(*texts: str) -> tuple[list[PortMapping], list[str]]:
        got = [(x, f"-p {t}") for t in texts for x in parse_port_spec(t)]
        return [x for x, _ in got], [label for _, label in got]

    assert _demo_vnc(None, *labelled("18080:8080"), "127.0.0.1") == DEMO_VNC_PORT
    assert _demo_vnc(None, *labelled("18962:5901"), "127.0.0.1") == 18962
    assert _demo_vnc(0, *labelled("18962:5901"), "127.0.0.1") == 18962  # 0: not a choice
    assert _demo_vnc(0, *labelled("18080:8080"), "127.0.0.1") == 0
    assert _demo_vnc(18962, *labelled("18962:5901"), "127.0.0.1") == 18962
    with pytest.raises(UsageError, match="--vnc-port 18960 and -p 18962:5901 both set"):
        _demo_vnc(18960, *labelled("18962:5901"), "127.0.0.1")
    with pytest.raises(PortSpecError, match=r"by the desktop's VNC \(--vnc-port, default "
                       r"15901\) and by -p 15901:8080"):
        _demo_vnc(None, *labelled("15901:8080"), "127.0.0.1")
