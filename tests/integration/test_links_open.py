"""Every link sandport prints opens, for the sandbox and token it was printed for, from
where a client would open it (issue 17, point 2).

A link is opened the way a browser does: GET it, follow the redirect into noVNC, then
open the WebSocket the noVNC page would open (host, port and path from the fragment),
with the Origin of that page, and read the VNC server's banner. A WebSocket URL is
opened with the Origin of a page of the gateway. The client runs as a separate process,
on this host or in a "remote host" namespace (:func:`nethelpers.remote_host`).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from attachhelpers import HandMade, hand_made  # noqa: F401 - a fixture
from conftest import require_programs, vm_slot
from nethelpers import free_port, remote_host
from sandport.control.gateway import Gateway
from uphelpers import SANDPORT, up_factory  # noqa: F401 - a fixture

pytestmark = pytest.mark.integration

BANNER = "RFB 003.008\n"

#: A client that opens one printed link as a browser would; prints what it saw as JSON.
OPEN_LINK = r"""
import asyncio, json, sys, urllib.error, urllib.request
from urllib.parse import parse_qsl, urljoin, urlsplit
import websockets

url = sys.argv[1]
seen = {"url": url}

class Stay(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None

def page_origin(u):
    p = urlsplit(u)
    return f"{p.scheme}://{p.netloc}"

if url.startswith(("ws://", "wss://")):
    ws_url = url
    origin = page_origin(url.replace("ws", "http", 1))
else:
    try:
        answer = urllib.request.build_opener(Stay).open(url, timeout=10)
        seen.update(status=answer.status, body=answer.read(300).decode(errors="replace"))
    except urllib.error.HTTPError as e:
        seen.update(status=e.code, body=e.read(300).decode(errors="replace"),
                    location=e.headers.get("Location", ""))
    if seen["status"] != 302:
        print(json.dumps(seen)); sys.exit()
    page = urljoin(url, seen["location"])
    with urllib.request.urlopen(page.split("#")[0], timeout=10) as p:
        seen["page_status"] = p.status
    frag = dict(parse_qsl(urlsplit(page).fragment))
    scheme = "wss" if frag.get("encrypt") == "1" else "ws"
    ws_url = f"{scheme}://{frag['host']}:{frag['port']}/{frag['path']}"
    origin = page_origin(page)

async def banner():
    async with websockets.connect(ws_url, origin=origin, subprotocols=["binary"],
                                  open_timeout=10) as ws:
        return (await asyncio.wait_for(ws.recv(), 10)).decode(errors="replace")

seen.update(ws_url=ws_url, origin=origin)
try:
    seen["banner"] = asyncio.run(banner())
except Exception as e:
    seen["banner"] = f"ERROR {type(e).__name__}: {e}"
print(json.dumps(seen))
"""


def open_link(url: str, netns: str | None = None) -> dict[str, Any]:
    """Open ``url`` as a browser would, from this host or from ``netns``."""
    argv = [sys.executable, "-c", OPEN_LINK, url]
    if netns is not None:
        argv = ["ip", "netns", "exec", netns, *argv]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 0, r.stderr
    return dict(json.loads(r.stdout))


def assert_opens(url: str, netns: str | None = None) -> dict[str, Any]:
    seen = open_link(url, netns)
    assert seen.get("banner") == BANNER, seen
    return seen


def sandport(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*SANDPORT, *args], capture_output=True, text=True, timeout=120,
                          check=False)


def make_token(gw: Gateway, loop_thread: Any, sandbox_id: str) -> dict[str, Any]:
    """An access token of every scope, made on the gateway's loop."""

    async def make() -> dict[str, Any]:
        return gw.create_grant(sandbox_id, 60)

    return dict(loop_thread.run(make()))


def route_source() -> str | None:
    """This host's address on its default route, as `ip route get` tells it."""
    r = subprocess.run(["ip", "-j", "route", "get", "198.51.100.1"], capture_output=True,
                       text=True, check=False)
    return str(json.loads(r.stdout)[0]["prefsrc"]) if r.returncode == 0 else None


@pytest.fixture(scope="module")
def gw(gateway_factory: Any) -> Gateway:
    gateway: Gateway = gateway_factory()
    return gateway


@pytest.fixture(scope="module")
def desktop(gw: Gateway, loop_thread: Any) -> Any:
    return loop_thread.run(gw.create_sandbox())


def test_a_ws_token_prints_websocket_urls_that_open(gw: Gateway, desktop: Any) -> None:
    state = str(gw.config.state_dir)
    ws_only = sandport("token", "create", desktop.id, "--kind", "ws", "--state-dir", state)
    assert ws_only.returncode == 0, ws_only.stderr
    links = ws_only.stdout.split()
    assert links and all(link.startswith("ws://") for link in links), ws_only.stdout
    assert "WebSocket URLs only" in ws_only.stderr
    for link in links:
        assert_opens(link)
    # The default token prints its desktop page, and that opens.
    both = sandport("token", "create", desktop.id, "--port", "vnc", "--state-dir", state)
    assert both.returncode == 0, both.stderr
    [page] = both.stdout.split()
    assert page.startswith(f"{gw.link_base}/s/{desktop.id}/?token="), page
    assert_opens(page)
    # A scope that could open nothing it names is refused, saying why.
    page_only = sandport("token", "create", desktop.id, "--kind", "http", "--state-dir", state)
    assert page_only.returncode == 2 and page_only.stdout == ""
    assert "connects through the WebSocket bridge" in page_only.stderr, page_only.stderr
    unknown = sandport("token", "create", desktop.id, "--port", "nope", "--state-dir", state)
    assert unknown.returncode == 2 and "exposes no port 'nope'" in unknown.stderr


def test_the_gateways_own_page_opens_with_origin_set(gateway_factory: Any,
                                                     loop_thread: Any) -> None:
    """--origin allows other sites; the gateway's own noVNC page (same origin) still
    opens its desktop, and a foreign page is still refused."""
    gw: Gateway = gateway_factory(origins=("https://app.example",))
    info = loop_thread.run(gw.create_sandbox())
    seen = assert_opens(info.desktop_url)
    assert seen["origin"] == gw.link_base  # what the browser sends: the page's origin
    code = (
        "import asyncio, sys, websockets\n"
        "async def m():\n"
        "    try:\n"
        "        async with websockets.connect(sys.argv[1], origin=sys.argv[2]): print('open')\n"
        "    except websockets.InvalidStatus as e: print(e.response.status_code)\n"
        "asyncio.run(m())\n")
    for origin, expect in (("http://evil.example", "403"), ("https://app.example", "open"),
                           ("http://localhost:1", "403")):
        r = subprocess.run([sys.executable, "-c", code, seen["ws_url"], origin],
                           capture_output=True, text=True, timeout=30, check=False)
        assert r.stdout.strip() == expect, (origin, r.stdout, r.stderr)


def test_an_echo_vm_link_opens_its_console(gw: Gateway, loop_thread: Any) -> None:
    """A VM without a desktop: its link opens QEMU's display of it (the console)."""
    require_programs("qemu-system-x86_64", "busybox")
    with vm_slot():
        info = loop_thread.run(gw.create_sandbox(backend="qemu", profile="echo"), timeout=180)
        try:
            assert info.desktop_url.endswith("&port=console"), info.desktop_url
            assert_opens(info.desktop_url)
            # The page without ?port= opens what the sandbox has, too.
            assert_opens(info.desktop_url.removesuffix("&port=console"))
            token = make_token(gw, loop_thread, info.id)
            assert token["desktop_url"].endswith("&port=console")
            assert_opens(token["desktop_url"])
            assert set(token["ws_urls"]) == {"http", "echo", "console"}
            assert_opens(token["ws_urls"]["console"])
        finally:
            loop_thread.run(gw.destroy_sandbox(info.id), timeout=60)


def test_an_attached_target_without_vnc_gets_no_link_and_the_page_says_why(
        gateway_factory: Any, loop_thread: Any, hand_made: HandMade) -> None:
    gw: Gateway = gateway_factory(attach_subnets=(hand_made.network,))
    info = loop_thread.run(gw.attach(ip=hand_made.ip, profile="tcp", port=5901))
    try:
        assert info.desktop_url == ""
        r = httpx.get(f"{gw.base_url}/s/{info.id}/?token={info.token}", timeout=10)
        assert (r.status_code, r.json()["error"]) == (404, "no_desktop"), r.text
        assert "has no desktop to show" in r.json()["message"]
        token = make_token(gw, loop_thread, info.id)
        assert token["desktop_url"] == "" and set(token["ws_urls"]) == {"tcp"}
        assert_opens(token["ws_urls"]["tcp"])  # Xvnc on 5901, as a plain TCP port
    finally:
        loop_thread.run(gw.destroy_sandbox(info.id))


def test_a_wildcard_listen_prints_links_with_an_address_clients_reach(
        up_factory: Any) -> None:
    port = free_port()
    up = up_factory("--listen", f"0.0.0.0:{port}", "--demo")
    doc = up.wait_ready()
    host = route_source() or "127.0.0.1"
    try:
        assert urlsplit(doc["desktop_url"]).netloc == f"{host}:{port}", doc["desktop_url"]
        assert_opens(doc["desktop_url"])
    finally:
        code, stderr = up.stop()
    assert code == 0, stderr
    assert f"Links:    http://{host}:{port}" in stderr and "--public-url" in stderr, stderr


def test_every_link_uses_the_public_url_and_opens_from_a_remote_host(
        up_factory: Any) -> None:
    """`up --listen 0.0.0.0:P --public-url URL --origin ...`: the ready block, the API and
    token links all start with URL, and each opens from another host."""
    port = free_port()
    with remote_host() as remote:
        public = f"http://{remote.host_ip}:{port}"
        up = up_factory("--listen", f"0.0.0.0:{port}", "--public-url", public + "/",
                        "--origin", "https://app.example", "--forward-host", "0.0.0.0",
                        "--forward-mode", "proxy", "--demo")  # a kernel forward on
        # 0.0.0.0 leaves veths such as this stand-in remote host's to their owner (README)
        try:
            doc = up.wait_ready()
            assert doc["desktop_url"].startswith(f"{public}/s/{doc['id']}/?token=")
            assert_opens(doc["desktop_url"], remote.netns)
            # The printed VNC address opens from there too (a wildcard forward is reached
            # at the public host, not at this host's 127.0.0.1).
            assert doc["vnc"]["host"] == remote.host_ip, doc["vnc"]
            assert rfb_banner(remote.netns, remote.host_ip, doc["vnc"]["port"]) == \
                "RFB 003.008"
            state = str(up.state_dir)
            listed = sandport("sandbox", "list", "--json", "--state-dir", state)
            assert listed.returncode == 0, listed.stderr
            assert [sb["desktop_url"] for sb in json.loads(listed.stdout)] == \
                [doc["desktop_url"]]
            for kind in ("http", "ws"):
                made = sandport("token", "create", doc["id"], "--kind", "ws", "--kind", kind,
                                "--state-dir", state)
                assert made.returncode == 0, made.stderr
                for link in made.stdout.split():
                    assert link.split("://", 1)[1].startswith(f"{remote.host_ip}:{port}/")
                    assert_opens(link, remote.netns)
        finally:
            code, stderr = up.stop()
        assert code == 0, stderr
        assert f"Browser:  {public}/s/" in stderr and f"Links:    {public}" in stderr
        assert f"vncviewer {remote.host_ip}::" in stderr


def rfb_banner(netns: str, host: str, port: int) -> str:
    """The first line a VNC server sends, read from inside ``netns``."""
    code = ("import socket, sys; s = socket.create_connection((sys.argv[1], int(sys.argv[2])),"
            " timeout=10); print(s.recv(12).decode().strip())")
    r = subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-c", code, host,
                        str(port)], capture_output=True, text=True, timeout=30, check=False)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def test_a_bad_public_url_is_refused_with_the_syntax(tmp_path: Path) -> None:
    for bad in ("ftp://x", "http://", "https://host/prefix", "host:8700",
                "http://host:99999"):
        r = sandport("up", "--public-url", bad, "--state-dir", str(tmp_path / "s"))
        assert r.returncode == 2, (bad, r.stderr)
        assert "must be http://HOST[:PORT] or https://HOST[:PORT]" in " ".join(
            r.stderr.split()), (bad, r.stderr)
        assert "Traceback" not in r.stderr
