"""The sandbox API on a real gateway: lifecycle, auth, errors, the OpenAPI document."""

from __future__ import annotations

import socket
from typing import Any

import httpx
import pytest

from nethelpers import free_port
from sandport.control.gateway import Gateway

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def gw(gateway_factory: Any) -> Gateway:
    gateway: Gateway = gateway_factory()
    return gateway


def client(gw: Gateway, token: str | None = None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {token or gw.admin_token}"} if token != "" else {}
    return httpx.Client(base_url=gw.base_url, headers=headers, timeout=60)


def test_create_get_list_delete(gw: Gateway) -> None:
    with client(gw) as api:
        r = api.post("/api/sandboxes", json={"publish": [f"{free_port()}:7"]})
        assert r.status_code == 201, r.text
        sb = r.json()
        assert sb["state"] == "ready" and sb["reason"] == ""
        hops = [p["hop"] for p in sb["readiness"]["probes"]]
        assert any(h.startswith("tcp 127.0.0.1:") for h in hops)
        assert any(h.startswith("websocket ws://") for h in hops), hops
        assert all(p["ok"] and p["stage"] for p in sb["readiness"]["probes"])
        assert sb["desktop_url"].startswith(f"{gw.base_url}/s/{sb['id']}/?token=")
        assert [f["name"] for f in sb["forwards"]] == ["vnc", "7/tcp"]
        # The desktop link it returned works (the token opens the desktop route).
        assert httpx.get(sb["desktop_url"], timeout=10).status_code == 302
        assert api.get(f"/api/sandboxes/{sb['id']}").json()["id"] == sb["id"]
        assert [s["id"] for s in api.get("/api/sandboxes").json()["sandboxes"]] == [sb["id"]]
        r = api.delete(f"/api/sandboxes/{sb['id']}")
        assert r.status_code == 204 and r.content == b""
        r = api.get(f"/api/sandboxes/{sb['id']}")
        assert (r.status_code, r.json()["error"]) == (404, "unknown_sandbox")
        assert api.delete(f"/api/sandboxes/{sb['id']}").status_code == 404
        assert api.get("/api/sandboxes").json() == {"sandboxes": []}


def test_the_admin_token_is_required(gw: Gateway) -> None:
    for token, status, error in (("", 401, "unauthorized"), ("nope", 403, "forbidden")):
        with client(gw, token) as api:
            for method, path in (("GET", "/api/sandboxes"), ("POST", "/api/sandboxes"),
                                 ("GET", "/api/sandboxes/abc"),
                                 ("DELETE", "/api/sandboxes/abc")):
                r = api.request(method, path, json={})
                assert (r.status_code, r.json()["error"]) == (status, error), (method, path)
    assert gw.sandbox_ids() == []


@pytest.mark.parametrize(
    ("body", "field"),
    [({"profile": "windows"}, "profile"), ({"vnc_port": 70000}, "vnc_port"),
     ({"colour": "red"}, "colour"), ({"publish": "80:80"}, "publish")],
)
def test_schema_errors_are_422_naming_the_field(gw: Gateway, body: dict[str, Any],
                                                field: str) -> None:
    with client(gw) as api:
        r = api.post("/api/sandboxes", json=body)
    assert r.status_code == 422
    assert any(field in map(str, e["loc"]) for e in r.json()["detail"]), r.json()
    assert f"body.{field}:" in r.json()["message"], r.json()  # people read the message
    assert gw.sandbox_ids() == []


def test_bad_and_conflicting_ports(gw: Gateway) -> None:
    with client(gw) as api:
        r = api.post("/api/sandboxes", json={"publish": ["80:8080:x"]})
        assert (r.status_code, r.json()["error"]) == (422, "invalid_port_spec")
        assert "HOSTPORT:GUESTPORT" in r.json()["message"]
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen(1)
            port = taken.getsockname()[1]
            r = api.post("/api/sandboxes", json={"publish": [f"{port}:7"]})
        assert (r.status_code, r.json()["error"]) == (409, "port_conflict"), r.text
        assert str(port) in r.json()["message"]
    assert gw.sandbox_ids() == []  # nothing left of the refused attempts


def test_openapi_document_and_docs(gw: Gateway) -> None:
    with client(gw, "") as anyone:
        spec = anyone.get("/openapi.json").json()
        assert {"/api/sandboxes", "/api/sandboxes/{sandbox_id}"} <= set(spec["paths"])
        assert anyone.get("/docs").status_code == 200


def test_python_client(gw: Gateway, tmp_path: Any) -> None:
    """The SDK: from the state dir, create, get_host, wait_ready, errors, delete."""
    from sandport.client import ApiError, Client

    api = Client.from_state_dir(gw.config.state_dir)
    port = free_port()
    sb = api.create_sandbox(publish=[f"{port}:7"])
    assert sb.state == "ready" and sb.wait_ready(timeout=5).state == "ready"
    assert sb.get_host(7) == f"127.0.0.1:{port}"
    assert sb.get_host(5901).startswith("127.0.0.1:")
    with pytest.raises(KeyError, match="not forwarded"):
        sb.get_host(8080)
    assert [s.id for s in api.sandboxes()] == [sb.id]
    assert httpx.get(sb.desktop_url, timeout=10).status_code == 302
    with pytest.raises(ApiError) as bad:
        api.create_sandbox(publish=["80:x"])
    assert bad.value.status == 422 and "invalid port spec" in bad.value.message
    sb.delete()
    with pytest.raises(ApiError) as gone:
        api.sandbox(sb.id)
    assert (gone.value.status, gone.value.error) == (404, "unknown_sandbox")
    with pytest.raises(ApiError) as wrong:
        Client(gw.base_url, "not-the-token").sandboxes()
    assert wrong.value.status == 403


def test_forwards_added_and_removed_at_runtime(gw: Gateway, tmp_path: Any) -> None:
    from nethelpers import ECHO_SERVER, guest_server
    from sandport.net import nft

    with client(gw) as api:
        sb = api.post("/api/sandboxes", json={}).json()
        base = f"/api/sandboxes/{sb['id']}/forwards"
        port = free_port()
        r = api.post(base, json={"publish": [f"{port}:7"]})
        assert r.status_code == 201, r.text
        (fwd,) = r.json()["forwards"]
        assert (fwd["name"], fwd["host"], fwd["mode"]) == ("7/tcp", f"127.0.0.1:{port}",
                                                           "kernel")
        rules = len(nft.rules_of(gw.config.net.bridge))
        with guest_server(f"sp-{sb['id']}", ECHO_SERVER, str(tmp_path / "echo.log")):
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.sendall(b"runtime")
                assert s.recv(100) == b"runtime"
            # The same port again, from this sandbox: a conflict naming the owner.
            r = api.post(base, json={"publish": [f"{port}:8"]})
            assert (r.status_code, r.json()["error"]) == (409, "port_conflict")
            assert f"sandbox {sb['id']}" in r.json()["message"]
            assert api.delete(f"{base}/{fwd['id']}").status_code == 204
            assert len(nft.rules_of(gw.config.net.bridge)) == rules - 1
            with pytest.raises(OSError):  # the kernel rule and the reservation are gone
                socket.create_connection(("127.0.0.1", port), timeout=2).close()
        r = api.delete(f"{base}/{fwd['id']}")
        assert (r.status_code, r.json()["error"]) == (404, "not_found")
        assert api.post(base, json={"publish": ["1:x"]}).status_code == 422
        assert api.post(base, json={"publish": []}).status_code == 422
        r = api.post("/api/sandboxes/nope/forwards", json={"publish": [f"{free_port()}:7"]})
        assert (r.status_code, r.json()["error"]) == (404, "unknown_sandbox")
        assert [f["name"] for f in api.get(f"/api/sandboxes/{sb['id']}").json()["forwards"]] \
            == ["vnc"]
        assert api.delete(f"/api/sandboxes/{sb['id']}").status_code == 204


async def _open_session(url: str) -> Any:
    from websockets.asyncio.client import connect

    ws = await connect(url, subprotocols=["binary"], open_timeout=10)
    assert (await ws.recv())[:4] == b"RFB "
    return ws


async def _closed_with(ws: Any, within: float) -> tuple[int, str]:
    import asyncio

    from websockets.exceptions import ConnectionClosed

    async def read_forever() -> None:
        while True:
            await ws.recv()

    with pytest.raises(ConnectionClosed) as closed:
        await asyncio.wait_for(read_forever(), within)
    frame = closed.value.rcvd
    assert frame is not None, "closed without a close frame (1006)"
    return frame.code, frame.reason


def test_access_tokens_expire_and_are_revoked_for_new_and_live_sessions(gw: Gateway) -> None:
    import asyncio
    import time

    with client(gw) as api:
        sb = api.post("/api/sandboxes", json={}).json()
        base = f"/api/sandboxes/{sb['id']}/tokens"
        ws_base = gw.base_url.replace("http", "ws") + f"/s/{sb['id']}/ports/vnc/ws?token="

        # Expiry: a live session is closed within 1 s of it, a new one is refused.
        short = api.post(base, json={"ttl_seconds": 1.5}).json()
        assert httpx.get(short["desktop_url"], timeout=10).status_code == 302

        async def expiry() -> tuple[float, tuple[int, str]]:
            ws = await _open_session(ws_base + short["token"])
            result = await _closed_with(ws, within=5)
            return time.time() - short["expires_at"], result

        late, result = asyncio.run(expiry())
        assert result == (1008, "the access token expired") and late < 1.0, (late, result)
        r = httpx.get(short["desktop_url"], timeout=10)
        assert (r.status_code, r.json()["error"]) == (403, "token_expired")
        listed = api.get(base).json()["tokens"]
        assert [(t["id"], t["expired"]) for t in listed] == [(short["id"], True)]
        assert "token" not in listed[0]

        # Revocation: the live session closes at once, the token no longer opens anything.
        long = api.post(base, json={"ttl_seconds": 600}).json()

        async def revocation() -> tuple[float, tuple[int, str]]:
            ws = await _open_session(ws_base + long["token"])
            own = await _open_session(ws_base + sb["token"])  # the sandbox's own token
            t0 = time.monotonic()
            await asyncio.to_thread(api.delete, f"{base}/{long['id']}")
            result = await _closed_with(ws, within=5)
            took = time.monotonic() - t0
            await own.send(b"RFB 003.008\n")  # untouched: still talking to the desktop
            assert len(await own.recv()) > 0
            await own.close()
            return took, result

        took, result = asyncio.run(revocation())
        assert result == (1008, "the access token was revoked") and took < 1.0, (took, result)
        r = httpx.get(long["desktop_url"], timeout=10)
        assert (r.status_code, r.json()["error"]) == (403, "invalid_token")
        assert api.delete(f"{base}/{long['id']}").status_code == 404
        assert api.post(base, json={"ttl_seconds": 0}).status_code == 422
        assert api.post("/api/sandboxes/nope/tokens", json={"ttl_seconds": 5}).status_code == 404
        # A port as `forward list` names it (5901/tcp) is its number; UDP opens nothing.
        scoped = api.post(base, json={"ttl_seconds": 60, "ports": ["5901/tcp"]})
        assert scoped.status_code == 201 and scoped.json()["ports"] == ["5901"], scoped.text
        assert httpx.get(scoped.json()["desktop_url"], timeout=10).status_code == 302
        udp = api.post(base, json={"ttl_seconds": 60, "ports": ["5901/udp"]})
        assert udp.status_code == 422 and "a token opens TCP ports only" in udp.text, udp.text
        assert api.delete(f"/api/sandboxes/{sb['id']}").status_code == 204
