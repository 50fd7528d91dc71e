"""Links and origins, without sockets: what a link opens and which Origin is the
gateway's own (issue 17, point 2)."""

from __future__ import annotations

import pytest

from sandport.bridge.model import origin_allowed
from sandport.config import GatewayConfig
from sandport.control.app import Grant, LiveSandbox, check_grant_scope, grant_links
from sandport.errors import UsageError
from sandport.sandbox.base import GuestPort
from sandport.sandbox.state import SandboxState

pytestmark = pytest.mark.unit

ALLOWED = ("https://app.example",)


@pytest.mark.parametrize(("origin", "scheme", "host", "ok"), [
    ("https://app.example", "http", "127.0.0.1:8700", True),        # --origin
    ("HTTPS://App.Example:443", "http", "127.0.0.1:8700", True),    # same origin, spelled
    ("http://127.0.0.1:8700", "http", "127.0.0.1:8700", True),      # the gateway's own page
    ("http://gw.example", "http", "gw.example:80", True),           # default port either way
    ("http://gw.example:80", "http", "gw.example", True),
    ("https://gw.example", "https", "gw.example", True),
    ("http://[::1]:8700", "http", "[::1]:8700", True),
    ("http://127.0.0.1:8700", "https", "127.0.0.1:8700", False),    # another scheme
    ("http://127.0.0.1:8701", "http", "127.0.0.1:8700", False),     # another port
    ("http://evil.example", "http", "127.0.0.1:8700", False),
    ("http://evil.example", "http", "", False),                     # no Host
    ("null", "http", "null", False),
    ("http://x:99999", "http", "x:99999", False),
    ("", "http", "127.0.0.1:8700", False),
])
def test_origins_the_gateway_allows(origin: str, scheme: str, host: str, ok: bool) -> None:
    assert origin_allowed(origin, ALLOWED, scheme=scheme, host=host) is ok


@pytest.mark.parametrize(("given", "kept"), [
    ("http://sp.example", "http://sp.example"),
    ("https://sp.example:8443/", "https://sp.example:8443"),
    ("http://192.0.2.10:8700", "http://192.0.2.10:8700"),
    ("http://[2001:db8::1]:8700", "http://[2001:db8::1]:8700"),
])
def test_a_public_url_is_kept_without_its_slash(given: str, kept: str) -> None:
    assert GatewayConfig(public_url=given).public_url == kept


@pytest.mark.parametrize("bad", ["ftp://x", "http://", "sp.example:8700", "http://x:0",
                                 "http://x:99999", "https://x/prefix", "http://x/?a=1",
                                 "http://u:p@x"])
def test_a_bad_public_url_is_refused(bad: str) -> None:
    with pytest.raises(UsageError, match="must be http://HOST"):
        GatewayConfig(public_url=bad)


def sandbox(*ports: GuestPort) -> LiveSandbox:
    return LiveSandbox(id="abc123", ip="10.0.0.2", state=SandboxState.READY,
                       token_hash="", ports=ports)


DESKTOP = sandbox(GuestPort(name="vnc", port=5901, protocol="rfb"))
ECHO_VM = sandbox(GuestPort(name="http", port=80), GuestPort(name="echo", port=7),
                  GuestPort(name="console", port=0, protocol="rfb", path="/run/c.sock"))
BASE = "https://sp.example"


def links(sb: LiveSandbox, ports: tuple[str, ...] = (), kinds: tuple[str, ...] = ()
          ) -> tuple[str, dict[str, str]]:
    doc = grant_links(BASE, sb, "T", Grant(id="g1", token_hash="", expires_at=0.0,
                                            ports=ports, kinds=kinds))
    return doc["desktop_url"], doc["ws_urls"]


def test_a_token_links_to_what_it_opens() -> None:
    page, ws = "https://sp.example/s/abc123/?token=T", "wss://sp.example/s/abc123/ports/"
    assert links(DESKTOP) == (page, {"vnc": ws + "vnc/ws?token=T"})
    assert links(DESKTOP, kinds=("ws",)) == ("", {"vnc": ws + "vnc/ws?token=T"})
    assert links(DESKTOP, kinds=("ws", "http")) == links(DESKTOP)
    assert links(DESKTOP, ports=("8080",)) == ("", {"8080": ws + "8080/ws?token=T"})
    assert links(DESKTOP, ports=("5901",))[0] == page
    assert links(ECHO_VM)[0] == page + "&port=console"
    assert set(links(ECHO_VM)[1]) == {"http", "echo", "console"}
    assert links(ECHO_VM, ports=("echo",)) == ("", {"echo": ws + "echo/ws?token=T"})


def test_a_scope_that_opens_nothing_it_names_is_refused() -> None:
    with pytest.raises(UsageError, match="connects through the WebSocket bridge"):
        check_grant_scope(DESKTOP, (), ("http",))
    with pytest.raises(UsageError, match="exposes no port 'nope'; it exposes vnc"):
        check_grant_scope(DESKTOP, ("nope",), ())
    check_grant_scope(DESKTOP, ("vnc", "8080"), ("ws",))
