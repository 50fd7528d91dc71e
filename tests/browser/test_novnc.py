"""noVNC in a real headless Chromium against a real gateway and desktop sandbox."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from attachhelpers import HandMade, hand_made  # noqa: F401 - a fixture
from conftest import require, require_programs, vm_slot
from nethelpers import RemoteHost, remote_host
from sandport.bridge.tls import TlsConfig
from tlshelpers import make_ca, spki_sha256

pytestmark = pytest.mark.browser

CHROMEDRIVER_PORT = 9515  # inside the browser's own namespace

STATE_JS = """
const c = document.querySelector('#noVNC_container canvas');
const st = document.getElementById('noVNC_status');
let px = [];
if (c && c.width > 20 && c.height > 20) {
  px = Array.from(c.getContext('2d').getImageData(c.width - 8, c.height - 8, 1, 1).data);
}
return {cls: document.documentElement.className, status: st ? st.textContent : '',
        w: c ? c.width : 0, h: c ? c.height : 0, px: px};
"""


@pytest.fixture(scope="module")
def remote() -> Iterator[RemoteHost]:
    with remote_host() as r:
        yield r


@pytest.fixture(scope="module")
def gateway_cert(tmp_path_factory: pytest.TempPathFactory, remote: RemoteHost) -> Path:
    """A certificate for the TLS gateway, for the address the browser connects to."""
    tmp = tmp_path_factory.mktemp("tls")
    return make_ca(tmp).issue(tmp / "gateway.pem", ips=(remote.host_ip,))


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory, remote: RemoteHost,
            gateway_cert: Path) -> Iterator[Any]:
    """Headless Chromium on a "remote host" namespace, as a user's browser would be.

    Chromium aborts in-flight requests with ERR_NETWORK_CHANGED whenever an interface
    of its network namespace changes; on the host, every sandbox another test creates is
    such a change. In its own namespace it sees only its own link.
    """
    require_programs("chromium", "chromedriver")
    try:
        from selenium import webdriver
    except ImportError:
        require(False, "selenium", "pip install selenium (make setup does)")
        raise
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--window-size=1400,1000",
                f"--user-data-dir={tmp_path_factory.mktemp('chromium')}",
                # Trust exactly the test gateway's key (as a user installs their CA).
                f"--ignore-certificate-errors-spki-list={spki_sha256(gateway_cert)}"):
        options.add_argument(arg)
    # Console messages and network events, shown when a test fails (see diagnose()).
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    log = (tmp_path_factory.mktemp("chromedriver") / "chromedriver.log").open("w")
    driver_proc = subprocess.Popen(
        ["ip", "netns", "exec", remote.netns, shutil.which("chromedriver") or "chromedriver",
         f"--port={CHROMEDRIVER_PORT}", f"--allowed-ips={remote.host_ip}"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://{remote.ip}:{CHROMEDRIVER_PORT}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{url}/status", timeout=2).close()
                break
            except OSError:
                if time.monotonic() > deadline or driver_proc.poll() is not None:
                    raise
                time.sleep(0.1)
        driver = webdriver.Remote(command_executor=url, options=options)
        driver.set_page_load_timeout(30)
        try:
            yield driver
        finally:
            driver.quit()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(driver_proc.pid, signal.SIGKILL)
        driver_proc.wait()
        log.close()


@pytest.fixture(scope="module")
def desktop(gateway_factory: Any, loop_thread: Any, remote: RemoteHost) -> Any:
    gw = gateway_factory(listen_host=remote.host_ip)
    return gw, loop_thread.run(gw.create_sandbox())


@pytest.fixture(scope="module")
def tls_desktop(gateway_factory: Any, loop_thread: Any, remote: RemoteHost,
                gateway_cert: Path) -> Any:
    gw = gateway_factory(listen_host=remote.host_ip, tls=TlsConfig(cert=gateway_cert))
    return gw, loop_thread.run(gw.create_sandbox())


def open_desktop(browser: Any, url: str, colour: str) -> dict[str, Any]:
    """Load ``url`` and wait for a connected noVNC showing the sandbox colour."""
    rgb = [int(colour[i : i + 2], 16) for i in (1, 3, 5)]
    browser.get(url)
    state = poll(browser, lambda s: "noVNC_connected" in s["cls"] and s["px"][:3] == rgb)
    if "noVNC_connected" not in state["cls"] or state["px"][:3] != rgb:
        pytest.fail(f"noVNC did not show the desktop: {state}\n{diagnose(browser)}")
    return state


def poll(driver: Any, until: Any, timeout: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    state: dict[str, Any] = {}
    while time.monotonic() < deadline:
        state = driver.execute_script(STATE_JS)
        if until(state):
            return state
        time.sleep(0.1)
    return state


def diagnose(driver: Any) -> str:
    """What the browser logged and which requests failed or stayed open."""
    lines = [f"url {driver.current_url}"]
    lines += [f"console {e['level']}: {e['message']}" for e in driver.get_log("browser")]
    requests: dict[str, str] = {}
    for entry in driver.get_log("performance"):
        msg = json.loads(entry["message"])["message"]
        params = msg.get("params", {})
        rid = params.get("requestId")
        if msg["method"] == "Network.requestWillBeSent":
            requests[rid] = params["request"]["url"]
        elif msg["method"] == "Network.responseReceived" and rid in requests:
            lines.append(f"{params['response']['status']} {requests.pop(rid)}")
        elif msg["method"] == "Network.loadingFailed" and rid in requests:
            lines.append(f"FAILED {requests.pop(rid)}: {params.get('errorText')}")
    lines += [f"NO RESPONSE {url}" for url in requests.values()]
    return "\n".join(lines)


def test_desktop_url_opens_the_desktop(browser: Any, desktop: Any, tmp_path: Path,
                                       record_property: Any) -> None:
    _, info = desktop
    colour = [int(info.colour[i : i + 2], 16) for i in (1, 3, 5)]
    t0 = time.monotonic()
    browser.get(info.desktop_url)
    state = poll(browser, lambda s: "noVNC_connected" in s["cls"] and s["px"][:3] == colour)
    browser.save_screenshot(str(tmp_path / "desktop.png"))
    if "noVNC_connected" not in state["cls"]:
        pytest.fail(f"noVNC did not connect: {state}\n{diagnose(browser)}")
    assert state["status"] == f"Connected (unencrypted) to sandport {info.id}", state
    assert (state["w"], state["h"]) == (1280, 800), state
    assert state["px"][:3] == colour, state
    took = time.monotonic() - t0
    timing = browser.execute_script(
        "const n = performance.getEntriesByType('navigation')[0];"
        "const r = performance.getEntriesByType('resource');"
        "return [n ? n.duration : 0, r.length, Math.max(0, ...r.map(e => e.duration))];")
    line = (f"noVNC in Chromium: desktop URL -> first frame with the sandbox colour "
            f"{took:.2f} s (page {timing[0] / 1000:.2f} s, {timing[1]} resources, slowest "
            f"{timing[2] / 1000:.2f} s)")
    record_property("measured", line)
    print(line)


def test_wrong_token_shows_a_refusal_not_a_hang(browser: Any, desktop: Any) -> None:
    _, info = desktop
    t0 = time.monotonic()
    browser.get(info.desktop_url.replace(f"token={info.token}", "token=not-the-token"))
    text = browser.find_element("id", "reason").text
    assert "not valid" in text
    assert "403" in browser.find_element("tag name", "h1").text
    assert time.monotonic() - t0 < 10


def test_bad_token_in_the_websocket_path_fails_fast_in_novnc(browser: Any, desktop: Any) -> None:
    gw, info = desktop
    url = (f"{gw.base_url}/novnc/vnc.html#autoconnect=1&reconnect=0&host={gw.config.url_host}"
           f"&port={gw.http_port}&path=s/{info.id}/ports/vnc/ws%3Ftoken%3Dbad")
    browser.get("about:blank")
    browser.get(url)
    state = poll(browser, lambda s: "noVNC_connected" not in s["cls"]
                 and ("Failed" in s["status"] or "disconnect" in s["status"].lower()),
                 timeout=15)
    assert "noVNC_connected" not in state["cls"]
    assert "Failed" in state["status"] or "isconnect" in state["status"], state


def test_desktop_over_https_and_wss(browser: Any, tls_desktop: Any) -> None:
    gw, info = tls_desktop
    assert info.desktop_url.startswith("https://")
    state = open_desktop(browser, info.desktop_url, info.colour)
    assert state["status"] == f"Connected (encrypted) to sandport {info.id}", state
    assert browser.current_url.startswith(f"https://{gw.config.url_host}:")


def test_three_viewers_of_one_sandbox_at_once(browser: Any, desktop: Any) -> None:
    gw, info = desktop
    first = browser.current_window_handle
    handles = [first]
    try:
        for _ in range(2):
            browser.switch_to.new_window("tab")
            handles.append(browser.current_window_handle)
        for handle in handles:
            browser.switch_to.window(handle)
            open_desktop(browser, info.desktop_url, info.colour)
        # All three still connected once the last one is.
        for handle in handles:
            browser.switch_to.window(handle)
            state = browser.execute_script(STATE_JS)
            assert "noVNC_connected" in state["cls"], state
        stats = gw.bridge_stats.routes[(info.id, "vnc")]
        assert stats.sessions_active >= 3, stats
    finally:
        for handle in handles[1:]:
            browser.switch_to.window(handle)
            browser.close()
        browser.switch_to.window(first)
        browser.get("about:blank")


def test_wrong_vnc_password_shows_the_servers_reason(browser: Any, desktop: Any) -> None:
    _, info = desktop
    url = info.desktop_url
    browser.get("about:blank")
    browser.get(url)  # follows the redirect into noVNC with the right password
    poll(browser, lambda s: "noVNC_connected" in s["cls"])
    wrong = browser.current_url.replace(f"password={info.vnc_password}", "password=wrongpw1")
    assert wrong != browser.current_url
    browser.get("about:blank")
    browser.get(wrong)
    state = poll(browser, lambda s: "Authentication failure" in s["status"], timeout=15)
    assert "Authentication failure" in state["status"], (state, diagnose(browser))


def test_sdk_full_lifecycle_desktop_link_credentials_session_delete(
        browser: Any, desktop: Any, leftovers: Any) -> None:
    """Through the Python client, as a backend runs a login flow: create a desktop sandbox
    with a session, open an expiring link in Chromium, the guest posts what it captured
    through its agent, the session completes, the database holds no plaintext, delete."""
    from sandport.client import Client

    gw, _ = desktop
    api = Client(gw.base_url, gw.admin_token)
    sb = api.create_sandbox(session_ttl=120).wait_ready(timeout=30)
    (session,) = sb.sessions()
    assert session.state == "ready"  # waiting until the sandbox was proven ready
    link = sb.create_token(ttl=60)
    state = open_desktop(browser, link["desktop_url"], sb.doc["colour"])
    assert state["status"] == f"Connected (unencrypted) to sandport {sb.id}", state
    # Inside the sandbox, a guest program hands over what it captured: through the
    # agent on 127.0.0.1 (the agent adds the token), to the gateway on the bridge.
    secret = f"sessionid-{os.urandom(12).hex()}"
    guest = subprocess.run(
        ["ip", "netns", "exec", f"sp-{sb.id}", sys.executable, "-c",
         "import json, sys; from sandport.client import post_credentials; "
         "print(json.dumps(post_credentials({'cookie': sys.argv[1], 'user': 'alice'})))",
         secret], capture_output=True, text=True, timeout=30, check=False)
    assert guest.returncode == 0, guest.stderr
    receipt = json.loads(guest.stdout)
    assert receipt["session"]["id"] == session.id
    assert receipt["session"]["state"] == "completed"
    assert session.wait_completed(timeout=10) == {"cookie": secret, "user": "alice"}
    kinds = [e["kind"] for e in api.events(sandbox=sb.id)]
    assert kinds.count("credentials.received") == 1 and "agent.connected" in kinds
    # Encrypted at rest: neither the database nor its WAL holds the plaintext.
    for db in gw.config.state_dir.glob("sandport.db*"):
        raw = db.read_bytes()
        assert secret.encode() not in raw and b"alice" not in raw, db
    # Revoking the link closes the browser's session at once.
    sb.revoke_token(link["id"])
    state = poll(browser, lambda s: "noVNC_connected" not in s["cls"], timeout=10)
    assert "noVNC_connected" not in state["cls"], state
    browser.get("about:blank")
    sb.delete()
    assert sb.id not in gw.sandbox_ids()
    left = leftovers(bridge=None, sandbox_ids=[sb.id], state_dir=gw.config.state_dir)
    assert left == [], left


def test_a_desktop_inside_a_vm_and_its_console_in_chromium(browser: Any, desktop: Any,
                                                            loop_thread: Any,
                                                            leftovers: Any) -> None:
    """A qemu desktop sandbox: noVNC shows the Xvnc desktop running inside the microVM
    (its colour, its name) through the same bridge as a netns desktop; ``?port=console``
    shows QEMU's own display of the VM (its serial console) through that bridge too."""
    require_programs("qemu-system-x86_64")
    gw, _ = desktop
    with vm_slot():
        _vm_desktop_in_chromium(browser, gw, loop_thread, leftovers)


def _vm_desktop_in_chromium(browser: Any, gw: Any, loop_thread: Any, leftovers: Any) -> None:
    info = loop_thread.run(gw.create_sandbox(backend="qemu", profile="desktop"), timeout=180)
    try:
        state = open_desktop(browser, info.desktop_url, info.colour)
        assert state["status"] == f"Connected (unencrypted) to sandport {info.id}", state
        # The guest agent runs inside the VM: its /health (from the host) and its report.
        health = json.loads(urllib.request.urlopen(
            f"http://{info.ip}:7412/health", timeout=10).read())
        assert health["sandbox"] == info.id and "Xvnc" in {p["name"] for p in health["processes"]}
        assert {"proto": "tcp", "address": "0.0.0.0", "port": 5901} in health["listening"]
        assert [p.hop for p in gw.roster[info.id].probes][-1].startswith("guest agent")
        browser.get(info.desktop_url + "&port=console")
        state = poll(browser, lambda s: "noVNC_connected" in s["cls"] and s["w"] > 20)
        assert "noVNC_connected" in state["cls"], f"{state}\n{diagnose(browser)}"
        assert state["status"] == f"Connected (unencrypted) to QEMU (sandport-{info.id})"
    finally:
        browser.get("about:blank")
        loop_thread.run(gw.destroy_sandbox(info.id), timeout=60)
    assert leftovers(bridge=None, sandbox_ids=[info.id], state_dir=gw.config.state_dir) == []


def test_an_attached_desktop_in_chromium_and_after_it_moved(
        browser: Any, gateway_factory: Any, loop_thread: Any, remote: RemoteHost,
        hand_made: HandMade) -> None:
    """A desktop sandport did not create (a namespace with Xvnc made by hand), attached:
    noVNC shows it; its owner re-addresses it and tells sandport; the same URL shows it
    again."""
    gw = gateway_factory(listen_host=remote.host_ip, attach_subnets=(hand_made.network,))
    info = loop_thread.run(gw.attach(ip=hand_made.ip, name="by-hand",
                                     vnc_password=hand_made.password))

    def shows_it() -> None:
        browser.get(info.desktop_url)
        state = poll(browser, lambda s: "noVNC_connected" in s["cls"] and s["w"] == 640)
        if "noVNC_connected" not in state["cls"]:
            pytest.fail(f"noVNC did not connect: {state}\n{diagnose(browser)}")
        assert state["status"] == "Connected (unencrypted) to by-hand", state
        assert (state["w"], state["h"]) == (640, 480), state

    shows_it()
    new_ip = str(hand_made.network.network_address + 3)
    prefix = hand_made.network.prefixlen
    hand_made.sh("ip", "addr", "del", f"{hand_made.ip}/{prefix}", "dev", "eth0")
    hand_made.sh("ip", "addr", "add", f"{new_ip}/{prefix}", "dev", "eth0")
    loop_thread.run(gw.retarget(info.id, ip=new_ip, reason="migrated"))
    shows_it()
    loop_thread.run(gw.destroy_sandbox(info.id))


def test_the_desktop_link_opens_with_origin_and_public_url(
        browser: Any, gateway_factory: Any, loop_thread: Any, remote: RemoteHost,
        tmp_path: Path) -> None:
    """A gateway listening on every address with --origin (other sites' pages) and
    --public-url (the address the remote browser uses): the printed link opens the
    desktop in Chromium; the gateway's own noVNC page is same-origin (issue 17)."""
    from nethelpers import free_port

    port = free_port()
    public = f"http://{remote.host_ip}:{port}"
    gw = gateway_factory(listen_host="0.0.0.0", listen_port=port, public_url=public,
                         origins=("https://app.example",))
    info = loop_thread.run(gw.create_sandbox())
    assert info.desktop_url.startswith(f"{public}/s/{info.id}/?token=")
    try:
        state = open_desktop(browser, info.desktop_url, info.colour)
        browser.save_screenshot(str(tmp_path / "desktop-public-url.png"))
        assert state["status"] == f"Connected (unencrypted) to sandport {info.id}", state
    finally:
        browser.get("about:blank")
        loop_thread.run(gw.destroy_sandbox(info.id))
