"""Sessions, credentials, the guest agent, access-token scopes and the event stream, on a
real gateway with real desktop sandboxes."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from typing import Any

import httpx
import pytest

from conftest import eventually_sync
from sandport.control.gateway import Gateway
from sandport.sandbox.base import AGENT_PORT

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def gw(gateway_factory: Any) -> Gateway:
    gateway: Gateway = gateway_factory(probe_interval=0.5)
    return gateway


@pytest.fixture(scope="module")
def sandbox(gw: Gateway) -> dict[str, Any]:
    with api(gw) as c:
        r = c.post("/api/sandboxes", json={})
        assert r.status_code == 201, r.text
        return dict(r.json())


def api(gw: Gateway, token: str | None = None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    if token is None:
        headers = {"Authorization": f"Bearer {gw.admin_token}"}
    return httpx.Client(base_url=gw.base_url, headers=headers, timeout=30)


def agent_token(gw: Gateway, sandbox_id: str) -> str:
    return gw.roster[sandbox_id].spec.secrets["agent_token"]


def in_sandbox(sandbox_id: str, code: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run Python ``code`` inside the sandbox's network namespace, as a guest program."""
    return subprocess.run(["ip", "netns", "exec", f"sp-{sandbox_id}", sys.executable, "-c",
                           code, *args], capture_output=True, text=True, timeout=30,
                          check=False)


POST = ("import json, sys; from sandport.client import post_credentials, ApiError\n"
        "try: print(json.dumps(post_credentials(json.loads(sys.argv[1]), "
        "session=sys.argv[2] or None)))\n"
        "except ApiError as e: print(json.dumps({'status': e.status, 'error': e.error}))")


def test_the_agent_reports_and_answers_health(gw: Gateway, sandbox: dict[str, Any]) -> None:
    health = httpx.get(f"http://{sandbox['ip']}:{AGENT_PORT}/health", timeout=10).json()
    assert health["sandbox"] == sandbox["id"]
    assert {"proto": "tcp", "address": "0.0.0.0", "port": 5901} in health["listening"]
    assert "Xvnc" in {p["name"] for p in health["processes"]}

    def reported() -> bool:
        with api(gw) as c:
            doc = c.get(f"/api/sandboxes/{sandbox['id']}").json()["agent"]
        return doc["report"] is not None and doc["reported_at"] is not None

    eventually_sync(reported, within=15)


def test_an_agent_that_exits_is_started_again(gw: Gateway, sandbox: dict[str, Any]) -> None:
    import os
    import signal
    from pathlib import Path

    url = f"http://{sandbox['ip']}:{AGENT_PORT}/health"
    before = httpx.get(url, timeout=10).json()["pid"]  # in the sandbox's PID namespace
    host_pid = next(int(d["pid"]) for d in json.loads(
        (gw.roster[sandbox["id"]].spec.workdir / "pids.json").read_text())
        if d["name"] == "agent")
    assert "agent.py" in Path(f"/proc/{host_pid}/cmdline").read_text()
    os.kill(host_pid, signal.SIGKILL)

    def back() -> bool:
        try:
            return bool(httpx.get(url, timeout=1).json()["pid"] != before)
        except httpx.HTTPError:
            return False

    eventually_sync(back, within=10)
    with api(gw) as c:
        doc = c.get(f"/api/sandboxes/{sandbox['id']}").json()
        kinds = [e["kind"] for e in c.get("/api/events",
                                          params={"sandbox": sandbox["id"]}).json()["events"]]
    assert doc["state"] == "ready" and "agent.restarted" in kinds  # the desktop stayed


def test_a_session_completes_with_credentials_from_the_guest(gw: Gateway,
                                                              sandbox: dict[str, Any]) -> None:
    sid = sandbox["id"]
    with api(gw) as c:
        s = c.post(f"/api/sandboxes/{sid}/sessions", json={"ttl_seconds": 60}).json()
        assert s["state"] == "ready" and s["credential_id"] is None

        # A long poll answers as soon as the session ends.
        answer: dict[str, Any] = {}

        def wait() -> None:
            t0 = time.monotonic()
            answer["doc"] = c.get(f"/api/sessions/{s['id']}", params={"wait": 20}).json()
            answer["after"] = time.monotonic() - t0

        waiter = threading.Thread(target=wait)
        waiter.start()
        time.sleep(0.3)
        out = in_sandbox(sid, POST, json.dumps({"password": "pw-1"}), s["id"])
        assert out.returncode == 0, out.stderr
        receipt = json.loads(out.stdout)
        assert receipt["session"]["state"] == "completed"
        waiter.join(25)
        assert answer["doc"]["state"] == "completed" and answer["after"] < 5, answer
        creds = c.get(f"/api/sandboxes/{sid}/credentials").json()["credentials"]
        assert [(x["id"], x["data"]) for x in creds if x["session"] == s["id"]] == [
            (receipt["id"], {"password": "pw-1"})]
        # Posting to an ended session is a conflict; to an unknown one, 404; both say so.
        again = json.loads(in_sandbox(sid, POST, "{}", s["id"]).stdout)
        assert again == {"status": 409, "error": "session_ended"}
        unknown = json.loads(in_sandbox(sid, POST, "{}", "w-nope").stdout)
        assert unknown == {"status": 404, "error": "not_found"}


def test_sessions_expire_and_are_cancelled_with_their_sandbox(gw: Gateway) -> None:
    with api(gw) as c:
        sb = c.post("/api/sandboxes", json={"session_ttl_seconds": 0.5}).json()
        (first,) = c.get(f"/api/sandboxes/{sb['id']}/sessions").json()["sessions"]
        done = c.get(f"/api/sessions/{first['id']}", params={"wait": 10}).json()
        assert done["state"] == "expired" and "TTL" in done["reason"], done
        other = c.post(f"/api/sandboxes/{sb['id']}/sessions", json={}).json()
        assert c.delete(f"/api/sandboxes/{sb['id']}").status_code == 204
        # The sandbox and its sessions are gone; the event log says how they ended.
        assert c.get(f"/api/sessions/{other['id']}").status_code == 404
        events = c.get("/api/events", params={"sandbox": sb["id"]}).json()["events"]
        ends = [(e["data"]["id"], e["data"]["state"]) for e in events
                if e["kind"] == "session.state"]
        assert (first["id"], "expired") in ends and (other["id"], "cancelled") in ends
        states = [e["data"]["state"] for e in events if e["kind"] == "sandbox.state"]
        assert states == ["creating", "starting", "ready", "stopping", "stopped"]


def test_agent_routes_take_the_agent_token_only(gw: Gateway, sandbox: dict[str, Any]) -> None:
    sid = sandbox["id"]
    path = f"/api/sandboxes/{sid}/credentials"
    body = {"data": {"x": 1}}
    for token, status in (("", 401), ("wrong", 403), (gw.admin_token, 403)):
        with api(gw, token or "") as c:
            r = c.post(path, json=body) if token else httpx.post(gw.base_url + path, json=body)
        assert r.status_code == status, r.text
    with api(gw, agent_token(gw, sid)) as c:
        # Not a JSON object, or a field too many: 422 naming it, never a 5xx.
        r = c.post(path, json={"data": "x"})
        assert r.status_code == 422 and "data" in r.text
        r = c.post(path, json={"data": {}, "extra": 1})
        assert r.status_code == 422 and "extra" in r.text
        # Another sandbox's id with this token: as wrong as any token.
        assert c.post("/api/sandboxes/nope/credentials", json=body).status_code == 403
        # The agent token opens nothing else.
        assert c.get(f"/api/sandboxes/{sid}/credentials").status_code == 403
    # The agent port, on the bridge address: agent routes only, from the sandbox only.
    agent_base = f"http://{gw.config.net.gateway_ip}:{gw.config.agent_port}"
    headers = {"Authorization": f"Bearer {agent_token(gw, sid)}"}
    r = httpx.post(agent_base + path, json=body, headers=headers, timeout=10)
    assert r.status_code == 403 and "calls from" in r.json()["message"], r.text
    assert httpx.get(agent_base + "/api/sandboxes", headers=headers,
                     timeout=10).status_code in (404, 405)
    assert httpx.get(agent_base + "/openapi.json", timeout=10).status_code == 404


def test_token_scopes_limit_ports_and_kinds(gw: Gateway, sandbox: dict[str, Any]) -> None:
    import asyncio

    from sandport.probe import probe_rfb_ws

    sid = sandbox["id"]
    with api(gw) as c:
        ws_only = c.post(f"/api/sandboxes/{sid}/tokens",
                         json={"ttl_seconds": 60, "ports": ["vnc"], "kinds": ["ws"]}).json()
        assert (ws_only["ports"], ws_only["kinds"]) == (["vnc"], ["ws"])
        r = c.post(f"/api/sandboxes/{sid}/tokens", json={"ttl_seconds": 60, "kinds": ["tcp"]})
        assert r.status_code == 422
    # It cannot open the desktop page, so it hands out no page link: its WebSocket URL.
    assert ws_only["desktop_url"] == ""
    page = httpx.get(f"{gw.base_url}/s/{sid}/?token={ws_only['token']}", timeout=10)
    assert (page.status_code, page.json()["error"]) == (403, "out_of_scope")
    ws = gw.base_url.replace("http", "ws") + f"/s/{sid}/ports/%s/ws?token={ws_only['token']}"
    assert ws_only["ws_urls"] == {"vnc": ws % "vnc"}
    ok = asyncio.run(probe_rfb_ws(ws % "vnc", password=sandbox["vnc_password"], timeout=5))
    assert ok.ok, ok
    other = asyncio.run(probe_rfb_ws(ws % "7412", password="", timeout=5))
    assert not other.ok and "403" in other.detail, other


def test_events_stream_live_and_replay_from_last_event_id(gw: Gateway,
                                                         sandbox: dict[str, Any]) -> None:
    sid = sandbox["id"]
    got: list[dict[str, Any]] = []
    with api(gw) as c:
        last = c.get("/api/events").json()["last"]
        headers = {"Accept": "text/event-stream"}
        with c.stream("GET", "/api/events", params={"after": last, "sandbox": sid},
                      headers=headers, timeout=15) as stream:
            assert stream.headers["content-type"].startswith("text/event-stream")
            made = c.post(f"/api/sandboxes/{sid}/sessions", json={"ttl_seconds": 60}).json()
            frame: dict[str, str] = {}
            for line in stream.iter_lines():
                if line.startswith(("id:", "event:", "data:")):
                    key, _, value = line.partition(":")
                    frame[key] = value.strip()
                elif not line and "data" in frame:
                    got.append({"id": int(frame["id"]), "event": frame["event"],
                                **json.loads(frame["data"])})
                    frame = {}
                    if got[-1]["event"] == "session.state":
                        break
        assert got[-1]["data"] == {"id": made["id"], "state": "ready", "from": "",
                                   "reason": ""}
        assert got[-1]["sandbox"] == sid and got[-1]["seq"] == got[-1]["id"] > last
        # Reconnecting with Last-Event-ID replays what came after it, nothing before.
        with c.stream("GET", "/api/events", params={"sandbox": sid}, timeout=15,
                      headers={**headers, "Last-Event-ID": str(last)}) as stream:
            lines = []
            for line in stream.iter_lines():
                lines.append(line)
                if line.startswith("data:") and made["id"] in line:
                    break
        ids = [int(x[3:]) for x in lines if x.startswith("id:")]
        assert ids and min(ids) > last


def test_metrics_count_sessions_agents_and_watchers(gw: Gateway,
                                                    sandbox: dict[str, Any]) -> None:
    import re

    with api(gw) as c:
        c.post(f"/api/sandboxes/{sandbox['id']}/sessions", json={"ttl_seconds": 60})
        text = c.get("/metrics").text
    counts = dict(re.findall(r'^sandport_sessions\{state="(\w+)"\} (\d+)$', text, re.M))
    assert int(counts["ready"]) >= 1 and set(counts) >= {"waiting", "completed", "expired"}
    age = re.search(rf'^sandport_sandbox_agent_report_age_seconds\{{sandbox="{sandbox["id"]}"'
                    r'\} ([0-9.]+)$', text, re.M)
    assert age is not None and float(age.group(1)) < 60, text
    assert re.search(r"^sandport_event_watchers 0$", text, re.M)
