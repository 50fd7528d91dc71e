"""The doctor's fix texts fit the port and the backend they are shown for (issue 17,
point 4), table-driven over the pure parts: which ``--port`` forms are taken, which port
each names, and the fix for a guest service that refuses, by backend and by who started
the service. The same cases through real gateways: tests/integration/test_true_words.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from sandport.bridge.model import BridgeConfig, Target
from sandport.bridge.tls import TlsConfig
from sandport.cli.ws import served
from sandport.doctor import PortFacts, Subject, check_port
from sandport.doctor.walk import _service_fix
from sandport.errors import UsageError
from sandport.probe import ProbeResult

REFUSED = ProbeResult(ok=False, hop="tcp 10.0.0.2:8080", stage="connect", elapsed=0.0,
                      detail="10.0.0.2:8080 refused the connection: nothing listens there")


@pytest.mark.parametrize("text", ["vnc", "agent", "console", "8080", "8080/tcp", "53/udp",
                                  "http", "tcp"])
def test_the_forms_forward_list_shows_are_taken(text: str) -> None:
    assert check_port(text) == text


@pytest.mark.parametrize("text", ["8080/sctp", "8080/", "/tcp", "a b", "x" * 40, "80:80",
                                  "", "vnc\n"])
def test_other_forms_are_refused_naming_the_accepted_ones(text: str) -> None:
    with pytest.raises(UsageError, match="8080/tcp, 53/udp") as caught:
        check_port(text)
    assert "\n" not in str(caught.value).splitlines()[0]


@pytest.mark.parametrize(("asked", "names"), [
    ("8080/tcp", ["http"]), ("8080", ["http", "8080/udp"]), ("8080/udp", ["8080/udp"]),
    ("vnc", ["vnc"]), ("5901/tcp", ["vnc"]), ("0", []), ("7412/tcp", ["agent"]),
])
def test_a_port_is_named_by_name_number_or_number_and_protocol(asked: str,
                                                                names: list[str]) -> None:
    ports = [PortFacts(name="vnc", guest_port=5901, protocol="rfb"),
             PortFacts(name="console", guest_port=0, protocol="rfb", path="/run/x.sock"),
             PortFacts(name="http", guest_port=8080, protocol="http"),
             PortFacts(name="8080/udp", guest_port=8080, protocol="udp"),
             PortFacts(name="agent", guest_port=7412, protocol="agent")]
    assert [p.name for p in ports if p.matches(asked)] == names


def subject(backend: str, **kw: object) -> Subject:
    return Subject(sandbox="abc123", known=True, state="ready", ip="10.0.0.2",
                   backend=backend, restarts_services=backend == "netns",
                   external=backend == "external", **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(("port", "s", "says", "never"), [
    # A namespace desktop's Xvnc: sandport started it and restarts it.
    (PortFacts(name="vnc", guest_port=5901, protocol="rfb", managed=True),
     subject("netns"), ["sandport restarts it", "sandport sandbox logs abc123 --name Xvnc"],
     ["start your service"]),
    # A VM image's service: sandport started the VM, but restarts nothing inside it.
    (PortFacts(name="http", guest_port=80, protocol="http", managed=True), subject("qemu"),
     ["does not restart services inside a VM", "sandport sandbox logs abc123`"],
     ["sandport restarts"]),
    # The user's own port of a sandbox (-p 18080:8080).
    (PortFacts(name="8080/tcp", guest_port=8080, protocol="tcp"), subject("netns"),
     ["start your service there", "0.0.0.0:8080", "never yours",
      "as host root outside its container"], ["sandport restarts"]),
    (PortFacts(name="8080/tcp", guest_port=8080, protocol="tcp"), subject("qemu"),
     ["its image serves only its profile's ports"], ["sandport restarts"]),
    # ... that listens on the guest's loopback only (the agent saw it).
    (PortFacts(name="8080/tcp", guest_port=8080, protocol="tcp"),
     subject("netns", agent_report={"listening": [
         {"proto": "tcp", "address": "127.0.0.1", "port": 8080}]}),
     ["listens on 127.0.0.1:8080 only", "0.0.0.0:8080"], ["sandport restarts"]),
    # An attached target's port: sandport runs nothing there, keeps no log of it.
    (PortFacts(name="http", guest_port=8080, protocol="http"), subject("external"),
     ["start the service on the target", "10.0.0.2"], ["sandport restarts", "log"]),
    (PortFacts(name="http", guest_port=8080, protocol="http"),
     subject("external", netns="/run/netns/web"), ["inside /run/netns/web"],
     ["sandport restarts", "log"]),
])
def test_the_fix_for_a_refused_port_fits_who_runs_it(port: PortFacts, s: Subject,
                                                     says: list[str],
                                                     never: list[str]) -> None:
    fix = _service_fix(port, REFUSED, s)
    for words in says:
        assert words in fix, fix
    for words in never:
        assert words not in fix, fix


def test_a_wrong_vnc_password_of_an_attached_target_is_fixed_by_attaching_again() -> None:
    auth = ProbeResult(ok=False, hop="tcp", stage="auth", elapsed=0.0,
                       detail="authentication failed")
    fix = _service_fix(PortFacts(name="vnc", guest_port=5901, protocol="rfb"), auth,
                       subject("external"))
    assert "sandport detach abc123" in fix and "--vnc-password-file" in fix
    assert "recreate" not in fix


def test_the_ws_startup_line_says_what_is_served(tmp_path: Path) -> None:
    pem, to = tmp_path / "self.pem", Target(host="127.0.0.1", port=5901)
    only = TlsConfig(cert=pem, ssl_only=True)
    assert served(BridgeConfig(target=to)) == "ws"
    assert served(BridgeConfig(target=to, web_dir=tmp_path)) == "ws and http"
    assert served(BridgeConfig(target=to, tls=TlsConfig(cert=pem))) == "ws and wss"
    assert served(BridgeConfig(target=to, tls=only)).startswith("wss only")
    assert served(BridgeConfig(target=to, tls=only, web_dir=tmp_path)) \
        .startswith("wss and https only")
