"""The gateway's HTTP app (noVNC, the desktop link, /api) and its WebSocket route.

Routes of the app (behind the bridge's front door, on a Unix socket):
    GET  /healthz                     liveness and a sandbox count
    GET  /novnc/...                   the noVNC client (Debian's /usr/share/novnc)
    GET  /s/{id}/?token=T             the desktop: checks T, redirects into noVNC
    GET  /api/forwards                every host port forward: mode, why, counters (admin)
    GET  /metrics                     Prometheus text format (admin)

WebSocket upgrades never reach the app: the front door
(:class:`~sandport.bridge.server.WsBridge`) takes every one of them, the first request
of a connection or a later one, and asks :class:`GatewayRouter` where it goes:
    WS   /s/{id}/ports/{port}/ws?token=T   WebSocket <-> TCP to a guest port (name or number)

Admin routes take the gateway's admin token (``Authorization: Bearer T``); the gateway
writes it to ``<state dir>/gateway.json`` (mode 0600), where ``sandport forward list``
reads it.

Access is refused *before* any upgrade, with a status and a JSON body (HTML for
browsers) saying why: 401 no token, 403 wrong token, 404 unknown sandbox or port,
503 with Retry-After while the sandbox is not ready, 502 when the guest refuses.
"""

from __future__ import annotations

import contextlib
import html
import logging
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import parse_qs, quote, unquote, urlsplit

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import HTTPConnection, Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from websockets.http11 import Request as WsRequest

from sandport import __version__
from sandport.bridge.model import BridgeRoute, BridgeStats, UpgradeRefusal
from sandport.bridge.targets import Target
from sandport.control.agent_api import agent_router
from sandport.control.api import (
    ApiGate,
    ApiRefusal,
    SandboxApi,
    admin_error,
    api_error_response,
    api_router,
    http_error_response,
    validation_error_response,
)
from sandport.control.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from sandport.control.metrics import render as render_metrics
from sandport.control.tokens import TokenCheck, bearer_token, check_token
from sandport.errors import SandboxNotFound, UsageError
from sandport.sandbox.base import GuestPort
from sandport.sandbox.state import SandboxState

log = logging.getLogger(__name__)

#: What a desktop link opens, the first a sandbox has: its VNC desktop, else a VM's
#: console (QEMU's own display of the VM: its serial console). Neither: no desktop link.
DESKTOP_PORTS = ("vnc", "console")

#: Seconds the front door gives a guest port to accept a bridged connection (504 beyond).
CONNECT_TIMEOUT = 5.0
NOT_READY_RETRY_AFTER = 2  # seconds


@dataclass(slots=True, kw_only=True)
class LiveSandbox:
    """What the HTTP app needs to know about a sandbox the gateway runs."""

    id: str
    ip: str
    state: SandboxState
    token_hash: str
    ports: tuple[GuestPort, ...]
    secrets: dict[str, str] = field(default_factory=dict)
    reason: str = ""
    #: Extra access tokens (links that expire), by id: see :class:`Grant`.
    grants: dict[str, Grant] = field(default_factory=dict)
    #: What ``sandport doctor`` found broken when the sandbox degraded (hop: evidence;
    #: fix), "" while healthy: refusals carry it so a browser shows the reason.
    diagnosis: str = ""
    #: The network namespace (its file) an attached target lives in, "" for ours.
    netns: str = ""

    def check(self, presented: str | None) -> tuple[TokenCheck, str, bool]:
        """``(verdict, grant id, expired)`` for a presented token: the sandbox's own token
        (grant id ""), or a grant that is neither expired nor revoked."""
        verdict = check_token(presented, self.token_hash)
        if verdict is not TokenCheck.INVALID:
            return verdict, "", False
        for grant in self.grants.values():
            if check_token(presented, grant.token_hash) is TokenCheck.OK:
                if grant.expires_at <= time.time():
                    return TokenCheck.INVALID, grant.id, True
                return TokenCheck.OK, grant.id, False
        return TokenCheck.INVALID, "", False

    def port(self, key: str) -> GuestPort | None:
        """The guest port named ``key`` or numbered ``key``.

        A number the profile does not declare is any TCP port of the guest (an app's
        own service): the sandbox's token already grants the whole sandbox.
        """
        for p in self.ports:
            if key in (p.name, str(p.port)):
                return p
        # ASCII digits only: str.isdigit() also takes '²' and other digits int() refuses.
        if key.isascii() and key.isdigit() and 0 < int(key) < 65536 and key == str(int(key)):
            return GuestPort(name=key, port=int(key))
        return None


@dataclass(frozen=True, slots=True, kw_only=True)
class Grant:
    """An extra access token of one sandbox, valid until ``expires_at`` (Unix time).

    ``ports`` (names or numbers) and ``kinds`` (``ws``: the WebSocket bridge, ``http``:
    the desktop page) limit it; empty: all.
    """

    id: str
    token_hash: str
    expires_at: float
    ports: tuple[str, ...] = ()
    kinds: tuple[str, ...] = ()

    def allows(self, port: GuestPort | None, kind: str) -> bool:
        """True if this token may open ``port`` (None: no port asked) as ``kind``."""
        if self.kinds and kind not in self.kinds:
            return False
        return not self.ports or port is None or any(
            p in (port.name, str(port.port)) for p in self.ports)


class Registry(Protocol):
    """Where the app looks sandboxes up; the gateway implements it."""

    def lookup(self, sandbox_id: str) -> LiveSandbox | None:
        """The live sandbox with that id, or None."""
        ...

    def count(self) -> int:
        """How many sandboxes the gateway runs."""
        ...

    @property
    def admin_token_hash(self) -> str:
        """Stored form of the admin token (see :mod:`sandport.control.tokens`)."""
        ...

    async def forward_listing(self) -> list[dict[str, Any]]:
        """Every forward with its counters."""
        ...

    @property
    def bridge_stats(self) -> BridgeStats | None:
        """The WebSocket bridge's counters (None before it runs)."""
        ...

    @property
    def link_base(self) -> str:
        """``http(s)://host:port`` that the links handed out start with."""
        ...


@dataclass(frozen=True, slots=True, kw_only=True)
class Refusal:
    """Why a request is refused, as an HTTP status and words."""

    status: int
    error: str
    message: str
    sandbox: str = ""
    retry_after: int | None = None
    hop: str = ""  # where on the path it broke: sandport doctor's hop names

    def response(self, *, wants_html: bool = False) -> Response:
        """A JSON (or, for browsers, HTML) response carrying the reason."""
        headers = {"Retry-After": str(self.retry_after)} if self.retry_after else None
        body: dict[str, Any] = {"error": self.error, "message": self.message}
        if self.sandbox:
            body["sandbox"] = self.sandbox
        if self.hop:
            body["hop"] = self.hop
        if wants_html:
            hop = f"<p id=hop>broken hop: {html.escape(self.hop)}</p>" if self.hop else ""
            page = (
                "<!doctype html><meta charset=utf-8><title>sandport: refused</title>"
                f"<h1>{self.status} {html.escape(self.error.replace('_', ' '))}</h1>"
                f"<p id=reason>{html.escape(self.message)}</p>{hop}"
            )
            return HTMLResponse(page, status_code=self.status, headers=headers)
        return JSONResponse(body, status_code=self.status, headers=headers)


def presented_token(conn: HTTPConnection) -> str | None:
    """The token from ``?token=`` or ``Authorization: Bearer``."""
    return conn.query_params.get("token") or bearer_token(conn.headers.get("authorization"))


def authorise(
    registry: Registry, token: str | None, sandbox_id: str, port_key: str | None,
    kind: str = "ws",
) -> tuple[LiveSandbox, GuestPort | None, str] | Refusal:
    """Check sandbox, token, port, the token's scope and readiness, in that order.

    Returns the sandbox, the port (when asked for one) and the id of the access token
    that opened it ("" for the sandbox's own). ``kind`` is what is opened (ws, http).
    """
    sb = registry.lookup(sandbox_id)
    if sb is None:
        return Refusal(status=404, error="unknown_sandbox",
                       message=f"no sandbox {sandbox_id!r} on this gateway", sandbox=sandbox_id,
                       hop="route")
    verdict, grant, expired = sb.check(token)
    if verdict is TokenCheck.MISSING:
        return Refusal(status=401, error="missing_token",
                       message="this sandbox needs an access token: add ?token=... to the URL",
                       sandbox=sandbox_id, hop="route")
    if verdict is TokenCheck.INVALID and expired:
        return Refusal(status=403, error="token_expired", message="the access token expired",
                       sandbox=sandbox_id, hop="route")
    if verdict is TokenCheck.INVALID:
        return Refusal(status=403, error="invalid_token",
                       message="the access token is not valid for this sandbox",
                       sandbox=sandbox_id, hop="route")
    port = None
    if port_key is not None:
        port = sb.port(port_key)
        if port is None:
            known = ", ".join(f"{p.name} ({p.port})" for p in sb.ports)
            return Refusal(status=404, error="unknown_port",
                           message=f"sandbox {sandbox_id} exposes no port {port_key!r}; "
                           f"it exposes {known}", sandbox=sandbox_id, hop="route")
    scope = sb.grants.get(grant) if grant else None
    if scope is not None and not scope.allows(port, kind):
        what = f"port {port.name}" if port is not None else "this"
        return Refusal(status=403, error="out_of_scope",
                       message=f"the access token does not open {what} as {kind} (it opens "
                       f"ports {', '.join(scope.ports) or 'all'}, as "
                       f"{', '.join(scope.kinds) or 'any kind'})", sandbox=sandbox_id,
                       hop="route")
    if sb.state not in (SandboxState.READY, SandboxState.STARTING, SandboxState.DEGRADED):
        detail = f": {sb.reason}" if sb.reason else ""
        return Refusal(status=503, error="not_ready",
                       message=f"sandbox {sandbox_id} is {sb.state.value}{detail}",
                       sandbox=sandbox_id, hop="route",
                       retry_after=NOT_READY_RETRY_AFTER
                       if sb.state is SandboxState.CREATING else None)
    return sb, port, grant


def desktop_port(ports: Iterable[GuestPort]) -> str | None:
    """The port a sandbox's desktop link opens (:data:`DESKTOP_PORTS`), None: none."""
    names = {p.name for p in ports}
    return next((name for name in DESKTOP_PORTS if name in names), None)


def desktop_link(base: str, sandbox_id: str, token: str, port_key: str | None) -> str:
    """The desktop link of a sandbox (its page, ``/s/ID/``) opening ``port_key``; "" for
    None (a sandbox without a desktop gets no link)."""
    if port_key is None:
        return ""
    which = "" if port_key == DESKTOP_PORTS[0] else f"&port={quote(port_key, safe='')}"
    return f"{base}/s/{sandbox_id}/?token={token}{which}"


def ws_link(base: str, sandbox_id: str, port_key: str, token: str) -> str:
    """The WebSocket URL of a guest port (``ws(s)://.../s/ID/ports/PORT/ws?token=T``) for
    a link base ``http(s)://host:port``."""
    scheme, rest = base.split(":", 1)
    return (f"{'wss' if scheme == 'https' else 'ws'}:{rest}/s/{sandbox_id}/ports/"
            f"{quote(port_key, safe='')}/ws?token={token}")


def grant_links(base: str, sb: LiveSandbox, token: str, grant: Grant) -> dict[str, Any]:
    """What a new access token opens, as links that open: ``desktop_url`` (the desktop
    page, which connects through the bridge: "" unless the token opens both for the
    desktop's port) and ``ws_urls`` (port name: WebSocket URL, for every port the token
    opens through the bridge)."""
    desk = desktop_port(sb.ports)
    page = desk is not None and all(grant.allows(sb.port(desk), kind) for kind in ("http", "ws"))
    ws_urls: dict[str, str] = {}
    if not grant.kinds or "ws" in grant.kinds:
        for key in grant.ports or tuple(p.name for p in sb.ports):
            port = sb.port(key)
            if port is not None:
                ws_urls[port.name] = ws_link(base, sb.id, port.name, token)
    return {"desktop_url": desktop_link(base, sb.id, token, desk if page else None),
            "ws_urls": ws_urls}


def check_grant_scope(sb: LiveSandbox, ports: tuple[str, ...], kinds: tuple[str, ...]) -> None:
    """Refuse a scope whose token could open nothing it names.

    Raises:
        UsageError: a port the sandbox does not expose, or ``http`` without ``ws`` (the
            desktop page connects through the WebSocket bridge: alone it opens nothing).
    """
    for key in ports:
        if sb.port(key) is None:
            known = ", ".join(f"{p.name} ({p.port})" for p in sb.ports)
            raise UsageError(f"sandbox {sb.id} exposes no port {key!r}; it exposes {known} "
                             "(or give a port number)")
    if "http" in kinds and "ws" not in kinds:
        raise UsageError("a token for the desktop page alone opens nothing: the page "
                         "connects through the WebSocket bridge; give kinds http and ws "
                         "(or none: both), or ws alone for WebSocket clients")


def _wants_html(request: Request) -> bool:
    return "text/html" in request.headers.get("accept", "")


def desktop_redirect_target(
    request: Request, sandbox_id: str, token: str, password: str, port_key: str = "vnc",
    link_base: str = "",
) -> str:
    """The noVNC URL that opens a sandbox's desktop.

    Settings go in the fragment, which noVNC reads first and browsers never send to a
    server, so the VNC password stays out of logs and Referer headers. Host and port
    are given explicitly: noVNC would otherwise fall back to values an earlier session
    left in the browser's localStorage. They are where the page was asked for (its Host);
    when that names the host of ``link_base`` (the public URL), its scheme and port: a
    TLS proxy in front may have handed the request on as plain http on another port.
    """
    ws_path = f"s/{sandbox_id}/ports/{port_key}/ws?token={token}"
    url = request.url
    public = urlsplit(link_base)
    if public.hostname and url.hostname and public.hostname.lower() == url.hostname.lower():
        url = url.replace(scheme=public.scheme, netloc=public.netloc)
    secure = url.scheme == "https"
    port = url.port or (443 if secure else 80)
    params = {
        "autoconnect": "1",
        "resize": "scale",
        "reconnect": "0",
        "host": url.hostname or "127.0.0.1",
        "port": str(port),
        "encrypt": "1" if secure else "0",
        "path": ws_path,
        "password": password,
    }
    fragment = "&".join(f"{k}={quote(v, safe='')}" for k, v in params.items())
    return f"/novnc/vnc.html#{fragment}"


def build_app(registry: Registry, *, novnc_dir: Path,
              api: SandboxApi | None = None) -> Starlette:
    """The app for the gateway's HTTP port: the sandbox API (``api``, FastAPI, with its
    OpenAPI document at ``/openapi.json`` and ``/docs``) and the routes below."""

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok", "version": __version__,
                             "sandboxes": registry.count()})

    async def index(request: Request) -> Response:
        return JSONResponse({"name": "sandport", "version": __version__,
                             "desktop": "/s/{id}/?token=...",
                             "websocket": "/s/{id}/ports/{port}/ws?token=..."})

    async def desktop(request: Request) -> Response:
        sandbox_id = request.path_params["sandbox"]
        # ?port=console opens a VM's console (QEMU's display) instead of its desktop;
        # without ?port= the page opens what the sandbox has (desktop_port).
        asked = request.query_params.get("port")
        found = registry.lookup(sandbox_id)
        port_key = asked if asked in DESKTOP_PORTS else \
            desktop_port(found.ports) if found is not None else DESKTOP_PORTS[0]
        verdict = authorise(registry, presented_token(request), sandbox_id, port_key, "http")
        if isinstance(verdict, Refusal):
            return verdict.response(wants_html=_wants_html(request))
        sb, _, _ = verdict
        if port_key is None:
            known = ", ".join(f"{p.name} ({p.port})" for p in sb.ports)
            return Refusal(status=404, error="no_desktop", sandbox=sandbox_id, hop="route",
                           message=f"sandbox {sandbox_id} has no desktop to show (no VNC "
                           f"port): it exposes {known}; reach them through its forwards "
                           f"or a WebSocket on /s/{sandbox_id}/ports/PORT/ws"
                           ).response(wants_html=_wants_html(request))
        token = presented_token(request) or ""
        password = sb.secrets.get("vnc_password", "") if port_key == "vnc" else ""
        target = desktop_redirect_target(request, sb.id, token, password, port_key,
                                         registry.link_base)
        return RedirectResponse(target, status_code=302, headers={"Cache-Control": "no-store"})

    def admin_refusal(request: Request) -> Response | None:
        error = admin_error(request.headers.get("authorization"), registry.admin_token_hash)
        return None if error is None else api_error_response(request, error)

    async def api_forwards(request: Request) -> Response:
        refusal = admin_refusal(request)
        if refusal is not None:
            return refusal
        return JSONResponse({"forwards": await registry.forward_listing()})

    async def metrics(request: Request) -> Response:
        refusal = admin_refusal(request)
        if refusal is not None:
            return refusal
        docs = []
        if api is not None:
            for sandbox_id in api.sandbox_ids():
                with contextlib.suppress(SandboxNotFound):  # removed meanwhile
                    docs.append(api.info(sandbox_id).as_json())
        text = render_metrics(
            await registry.forward_listing(), sandboxes=registry.count(),
            bridge=registry.bridge_stats, sandbox_docs=docs,
            sessions=api.session_counts() if api is not None else None,
            watchers=api.events.watchers if api is not None else None, now=time.time())
        return Response(text, media_type=METRICS_CONTENT_TYPE)

    routes = [
        Route("/", index),
        Route("/api/forwards", api_forwards),
        Route("/metrics", metrics),
        Route("/healthz", healthz),
        Route("/s/{sandbox}/", desktop),
        Route("/s/{sandbox}", desktop),
        Mount("/novnc", app=StaticFiles(directory=novnc_dir, html=True, follow_symlink=True)),
    ]
    app = FastAPI(title="sandport", version=__version__, redoc_url=None,
                  description="Sandboxes, their desktops and ports. Every /api route takes "
                              "the admin token: Authorization: Bearer <token>.")
    app.add_exception_handler(ApiRefusal, api_error_response)
    app.add_exception_handler(RequestValidationError, validation_error_response)
    app.add_exception_handler(StarletteHTTPException, http_error_response)
    if api is not None:
        app.include_router(api_router(api))
        app.include_router(agent_router(api))
        app.add_middleware(ApiGate, gateway=api)
    app.router.routes.extend(routes)
    return app


class GatewayRouter:
    """The gateway's WebSocket routes for the bridge's front door (:mod:`sandport.bridge`).

    The front door asks it about every WebSocket upgrade, whatever its path and wherever
    it comes on a connection: ``/s/{sandbox}/ports/{port}/ws`` (port by name or number)
    is routed to the guest port, any other path is a 404. The checks are
    :func:`authorise`'s, so the desktop page and the bridge answer alike.
    """

    PATH = re.compile(r"^/s/(?P<sandbox>[^/]+)/ports/(?P<port>[^/]+)/ws/?$")

    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    def route(self, request: WsRequest) -> BridgeRoute:
        """The guest port of a bridge request.

        Raises:
            UpgradeRefusal: 401, 403, 404 or 503, as :func:`authorise` decides.
        """
        parts = urlsplit(request.path)
        m = self.PATH.match(unquote(parts.path))
        if m is None:
            raise UpgradeRefusal(404, "not_found", f"no route {parts.path!r}")
        token = (parse_qs(parts.query).get("token") or [""])[0] or \
            bearer_token(request.headers.get("Authorization"))
        verdict = authorise(self.registry, token, m["sandbox"], m["port"])
        if isinstance(verdict, Refusal):
            headers = [("Retry-After", str(verdict.retry_after))] if verdict.retry_after else []
            raise UpgradeRefusal(verdict.status, verdict.error, verdict.message, headers,
                                hop=verdict.hop)
        sb, port, grant = verdict
        if port is None:  # authorise() returns a port whenever it is asked for one
            raise RuntimeError("authorise() returned no port")
        target = Target(path=port.path) if port.path else Target(host=sb.ip, port=port.port,
                                                                 netns=sb.netns)
        return BridgeRoute(target=target,
                           labels=(sb.id, port.name),
                           starting=sb.state is SandboxState.STARTING,
                           grant=grant, diagnosis=sb.diagnosis)
