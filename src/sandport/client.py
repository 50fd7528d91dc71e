"""A Python client for a running gateway's API (standard library only).

::

    from sandport.client import Client

    gw = Client.from_state_dir("/var/lib/sandport")      # or Client(url, admin_token)
    sb = gw.create_sandbox(publish=["18080:8080"])      # returns once it is proven ready
    print(sb.desktop_url, sb.get_host(5901), sb.get_host(8080))
    link = sb.create_token(ttl=600)["desktop_url"]      # a link that expires
    session = sb.create_session(ttl=900)                # hand `link` to a user ...
    creds = session.wait_completed(timeout=900)         # ... the guest posts what it captured
    sb.delete()

What ``sandport`` does from the shell, a program does with the same calls::

    gw.forwards()                                       # sandport forward list --json
    sb = gw.sandbox("3fa9c1", fetch=False)              # a handle by id, no request
    sb.doctor(port="vnc")["failed"]                     # sandport doctor 3fa9c1 --port vnc
    for chunk in sb.follow_logs("serial"):              # sandport sandbox logs -f
        print(chunk.text, end="")

Inside a sandbox, a guest program hands what it captured to the gateway through the
guest agent (no token needed: the agent holds it)::

    from sandport.client import post_credentials
    post_credentials({"cookie": "..."})

Errors are :class:`ApiError` with the HTTP status and the gateway's own message.

Calls go straight to the URL given: no proxy from the environment (``http_proxy``,
``HTTPS_PROXY``, ``ALL_PROXY`` ...) ever sees the admin token, and a redirect is an
:class:`ApiError` with its 3xx status, not followed.

This module is the one client of the gateway's API: the ``sandport`` command talks to a
gateway through it too. It owns the HTTP calls and their errors, and never prints or
exits (that is :mod:`sandport.cli`'s job); it imports nothing from sandport, so a guest
program can use it with the standard library alone.
"""

from __future__ import annotations

import http.client
import json
import os
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

GATEWAY_FILE = "gateway.json"
DEFAULT_AGENT_URL = "http://127.0.0.1:7412"  # the guest agent, from inside a sandbox
FINAL_SESSION_STATES = ("completed", "expired", "cancelled")
ERROR_BODY_CAP = 64 * 1024  # bytes of a refusal's body read for its message
ERROR_TEXT_CAP = 2000  # characters of a refusal that is not JSON kept as its message
LOG_TAIL = -65536  # a log from this offset: its last 64 KiB


class ApiError(Exception):
    """The gateway refused a request (``status``) or did not answer (``status`` 0)."""

    def __init__(self, status: int, error: str, message: str) -> None:
        super().__init__(f"{status} {error}: {message}" if status else message)
        self.status, self.error, self.message = status, error, message


@dataclass(slots=True)
class _Resource:
    """An API document (``doc``) and the client that fetched it."""

    client: Client
    doc: dict[str, Any] = field(repr=False)

    @property
    def id(self) -> str:
        """Its id."""
        return str(self.doc["id"])

    @property
    def state(self) -> str:
        """Where it is in its life (see :mod:`sandport.sandbox.state`)."""
        return str(self.doc["state"])


@dataclass(slots=True)
class Sandbox(_Resource):
    """A sandbox as the API shows it (state: creating, starting, ready, degraded,
    stopping, stopped or failed); :meth:`refresh` asks again."""

    @property
    def reason(self) -> str:
        """Why it is degraded or failed ("" otherwise)."""
        return str(self.doc["reason"])

    @property
    def desktop_url(self) -> str:
        """The browser link (noVNC), token included."""
        return str(self.doc["desktop_url"])

    @property
    def vnc_password(self) -> str:
        """The VNC password of its desktop."""
        return str(self.doc["vnc_password"])

    def get_host(self, guest_port: int, protocol: str = "tcp") -> str:
        """``host:port`` on the gateway's machine that reaches ``guest_port`` of the sandbox.

        Raises:
            KeyError: the port is not forwarded (publish it when creating the sandbox).
        """
        for f in self.doc["forwards"]:
            if f["protocol"] == protocol and f["guest"].rsplit(":", 1)[1] == str(guest_port):
                return str(f["host"])
        raise KeyError(f"guest port {guest_port}/{protocol} of sandbox {self.id} is not "
                       "forwarded; publish it when creating the sandbox")

    def refresh(self) -> Sandbox:
        """Ask the gateway for the current state."""
        self.doc = self.client.request("GET", self._path)
        return self

    def wait_ready(self, timeout: float = 60.0, interval: float = 0.5) -> Sandbox:
        """Wait until it is ``ready``.

        Raises:
            ApiError: it failed (the reason says why) or is not ready after ``timeout``.
        """
        deadline = time.monotonic() + timeout
        while self.refresh().state != "ready":
            if self.state in ("failed", "stopped", "stopping"):
                raise ApiError(0, self.state, f"sandbox {self.id} is {self.state}: "
                                              f"{self.reason}")
            if time.monotonic() > deadline:
                raise ApiError(0, "timeout", f"sandbox {self.id} is still {self.state} after "
                                             f"{timeout:g} s: {self.reason}")
            time.sleep(interval)
        return self

    def delete(self) -> None:
        """Stop and remove it (an attached target: detach; the target stays as it is)."""
        self.client.request("DELETE", self._path)

    detach = delete

    def moved(self, ip: str, reason: str = "") -> Sandbox:
        """An attached target moved to ``ip``: live connections close with ``reason``,
        links and tokens stay valid; returns once it answers at the new address."""
        self.doc = self.client.request("POST", f"{self._path}/target",
                                       {"ip": ip, "reason": reason})
        return self

    def gone(self, reason: str = "") -> Sandbox:
        """An attached target is gone (its VM or container stopped): failed, closed."""
        self.doc = self.client.request("POST", f"{self._path}/target",
                                       {"gone": True, "reason": reason})
        return self

    @property
    def _path(self) -> str:
        return f"/api/sandboxes/{quote(self.id, safe='')}"

    def create_token(self, ttl: float, *, ports: list[str] | None = None,
                     kinds: list[str] | None = None) -> dict[str, Any]:
        """An access token valid ``ttl`` seconds: ``id``, ``token``, ``desktop_url``...

        ``ports`` (names or numbers) and ``kinds`` (``ws``, ``http``) limit it.
        """
        return dict(self.client.request("POST", f"{self._path}/tokens", {
            "ttl_seconds": ttl, "ports": ports or [], "kinds": kinds or []}))

    def tokens(self) -> list[dict[str, Any]]:
        """Its access tokens: ``id``, ``expires_at``, ``expired``, ``ports``, ``kinds``
        (never the tokens themselves)."""
        return list(self.client.request("GET", f"{self._path}/tokens")["tokens"])

    def revoke_token(self, token_id: str) -> None:
        """Revoke an access token: sessions opened with it close at once."""
        self.client.request("DELETE", f"{self._path}/tokens/{quote(token_id, safe='')}")

    def logs(self, name: str = "", offset: int = LOG_TAIL) -> LogChunk:
        """A guest log from ``offset`` (negative: that many bytes before its end).

        ``name`` picks the log: ``serial`` (a VM's console, its default), ``qemu``,
        ``Xvnc``, ``openbox``, ``agent``...; an unknown name is refused with the names.
        Read on from :attr:`LogChunk.next_offset`.
        """
        query = urlencode({"name": name, "offset": offset})
        data, headers = self.client.call("GET", f"{self._path}/logs?{query}")
        return LogChunk(data=data, next_offset=int(headers.get("x-next-offset") or 0),
                        names=tuple(n for n in headers.get("x-logs", "").split(",") if n))

    def follow_logs(self, name: str = "", offset: int = LOG_TAIL,
                    interval: float = 0.5) -> Iterator[LogChunk]:
        """:meth:`logs`, then what is added, every ``interval`` seconds, for ever."""
        while True:
            chunk = self.logs(name, offset)
            yield chunk
            offset = chunk.next_offset
            time.sleep(interval)

    def doctor(self, *, port: str | None = None, token: str | None = None) -> dict[str, Any]:
        """Walk the path to it hop by hop (``sandport doctor``): the report as JSON
        (``docs/doctor.schema.json``), its ``failed`` row naming the broken hop.

        ``port`` (a name or number) limits the walk; ``token`` is checked too.
        """
        query = urlencode({k: v for k, v in (("port", port), ("token", token)) if v})
        return dict(self.client.request("GET", f"{self._path}/doctor"
                                        + (f"?{query}" if query else "")))

    def create_session(self, ttl: float = 900.0) -> Session:
        """A session that completes when the guest posts credentials (or expires)."""
        return Session(self.client, self.client.request("POST", f"{self._path}/sessions",
                                                        {"ttl_seconds": ttl}))

    def sessions(self) -> list[Session]:
        """Its sessions, oldest first."""
        return [Session(self.client, d)
                for d in self.client.request("GET", f"{self._path}/sessions")["sessions"]]

    def credentials(self) -> list[dict[str, Any]]:
        """What its guest posted, decrypted: ``id``, ``session``, ``created_at``, ``data``."""
        return list(self.client.request("GET", f"{self._path}/credentials")["credentials"])


@dataclass(slots=True)
class Session(_Resource):
    """A session on a sandbox: ``waiting``, ``ready``, then ``completed``, ``expired`` or
    ``cancelled``."""

    def refresh(self, wait: float = 0) -> Session:
        """Ask again; ``wait`` > 0 lets the gateway answer as soon as it ends."""
        query = f"?{urlencode({'wait': round(wait, 3)})}" if wait > 0 else ""
        self.doc = self.client.request("GET", f"/api/sessions/{quote(self.id, safe='')}"
                                              f"{query}")
        return self

    def wait(self, timeout: float = 900.0) -> Session:
        """Wait until it ends (long polls, no busy loop); returns it as it is then."""
        deadline = time.monotonic() + timeout
        while self.state not in FINAL_SESSION_STATES:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self.refresh(wait=min(left, 60.0))
        return self

    def wait_completed(self, timeout: float = 900.0) -> dict[str, Any]:
        """The credentials that completed it.

        Raises:
            ApiError: it expired or was cancelled (the reason says why), or ``timeout``.
        """
        self.wait(timeout)
        if self.state != "completed":
            why = self.doc.get("reason") or f"still {self.state} after {timeout:g} s"
            raise ApiError(0, self.state, f"session {self.id}: {why}")
        sandbox = Sandbox(self.client, {"id": self.doc["sandbox"]})
        for cred in sandbox.credentials():
            if cred["id"] == self.doc["credential_id"]:
                return dict(cred["data"])
        raise ApiError(0, "missing", f"session {self.id}: its credentials are gone")


@dataclass(frozen=True, slots=True, kw_only=True)
class LogChunk:
    """A piece of a guest log (:meth:`Sandbox.logs`)."""

    data: bytes
    next_offset: int  # where the next read goes on
    names: tuple[str, ...] = ()  # the logs the sandbox has

    @property
    def text(self) -> str:
        """The bytes as text (undecodable bytes replaced)."""
        return self.data.decode(errors="replace")


class Client:
    """The API of one gateway: its URL and admin token.

    ``timeout`` bounds each call in seconds (creating a sandbox waits until it is ready).
    """

    def __init__(self, url: str, admin_token: str, *, timeout: float = 120.0,
                 verify_tls: bool = True) -> None:
        self.url = url.rstrip("/")
        self.admin_token = admin_token
        self.timeout = timeout
        context: ssl.SSLContext | None = None
        if url.startswith("https://") and not verify_tls:
            context = ssl._create_unverified_context()  # noqa: S323 - asked for
        # Straight to the gateway, never elsewhere with the admin token: no proxy from the
        # environment (http_proxy, HTTPS_PROXY, ALL_PROXY ...) and no redirects (urllib
        # would send the Authorization header on to wherever a 3xx points).
        self._opener = urllib.request.build_opener(
            urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context),
            _NoRedirects())

    @classmethod
    def from_state_dir(cls, state_dir: str | Path = "/var/lib/sandport") -> Client:
        """The gateway running with ``state_dir`` (reads its ``gateway.json``, root only).

        Its certificate is not verified: the file names our own gateway.
        """
        doc = json.loads((Path(state_dir) / GATEWAY_FILE).read_text())
        return cls(doc["url"], doc["admin_token"], verify_tls=False)

    def request(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        """One API call; the JSON answer (None when empty).

        Raises:
            ApiError: the gateway refused it, or did not answer (status 0), or answered
                with something that is not JSON (status 0).
        """
        raw, _ = self.call(method, path, body)
        try:
            return json.loads(raw) if raw else None
        except ValueError as exc:
            raise ApiError(0, "bad_answer", f"{self.url} answered {method} {path} with "
                                            f"something that is not JSON: {exc}") from None

    def call(self, method: str, path: str,
             body: dict[str, Any] | None = None) -> tuple[bytes, dict[str, str]]:
        """One API call: the raw body of the answer and its headers, names in lower case
        (for the routes that answer text, such as logs; :meth:`request` for JSON).

        Raises:
            ApiError: the gateway refused it, or did not answer (status 0).
        """
        if not self.url.startswith(("http://", "https://")):
            raise ApiError(0, "bad_url", f"{self.url!r} is not an http(s):// URL")
        req = urllib.request.Request(  # noqa: S310 - http(s) checked above
            self.url + path, method=method,
            data=json.dumps(body).encode() if body is not None else None,
            headers={"Content-Type": "application/json",
                     **({"Authorization": f"Bearer {self.admin_token}"}
                        if self.admin_token else {})})
        try:
            with self._opener.open(req, timeout=self.timeout) as r:
                return r.read(), {k.lower(): v for k, v in r.headers.items()}
        except urllib.error.HTTPError as exc:
            raise _refusal(exc.code, exc.read(ERROR_BODY_CAP)) from None
        except (OSError, http.client.HTTPException) as exc:
            raise ApiError(0, "unreachable", f"{self.url} does not answer: {exc}") from None

    def create_sandbox(self, *, profile: str = "desktop", publish: list[str] | None = None,
                       vnc_port: int = 0, session_ttl: float | None = None,
                       backend: str = "netns") -> Sandbox:
        """Create a sandbox; returns once the gateway has proven it ready.

        ``session_ttl`` also opens a session (``sb.sessions()[0]``) from the start;
        ``backend="qemu"`` makes it a microVM (profiles ``desktop`` and ``echo``).

        Raises:
            ApiError: 409 a port is taken, 422 a bad spec, 503 it did not become ready.
        """
        doc = self.request("POST", "/api/sandboxes", {"profile": profile,
                                                      "publish": publish or [],
                                                      "vnc_port": vnc_port,
                                                      "session_ttl_seconds": session_ttl,
                                                      "backend": backend})
        return Sandbox(self, doc)

    def attach(self, ip: str, *, name: str = "", profile: str = "desktop", port: int = 0,
               publish: list[str] | None = None, vnc_password: str | None = None,
               interface: str = "", netns: str = "",
               forward_mode: str = "proxy") -> Sandbox:
        """Front a VM or container sandport did not create (``sandport attach``); returns
        once it answers its protocol. Detach with :meth:`Sandbox.detach`.

        Raises:
            ApiError: 403 the address is outside the gateway's --attach-subnet networks,
                409 already attached or a port taken, 422 no route or a bad spec, 503 it
                does not answer.
        """
        return Sandbox(self, self.request("POST", "/api/attach", {
            "ip": ip, "name": name, "profile": profile, "port": port,
            "publish": publish or [], "vnc_password": vnc_password, "interface": interface,
            "netns": netns, "forward_mode": forward_mode}))

    def sandboxes(self) -> list[Sandbox]:
        """Every sandbox of the gateway."""
        return [Sandbox(self, d) for d in self.request("GET", "/api/sandboxes")["sandboxes"]]

    def sandbox(self, sandbox_id: str, *, fetch: bool = True) -> Sandbox:
        """One sandbox by id (ApiError 404 when there is none).

        ``fetch=False`` asks nothing: a handle that knows only the id, for calls that need
        no state (:meth:`Sandbox.delete`, tokens, logs, doctor...; a 404 comes from them).
        """
        if not fetch:
            return Sandbox(self, {"id": sandbox_id})
        return Sandbox(self, self.request("GET", f"/api/sandboxes/{quote(sandbox_id, safe='')}"))

    def forwards(self) -> list[dict[str, Any]]:
        """Every host port forward of the gateway: mode and why, state, counters."""
        return list(self.request("GET", "/api/forwards")["forwards"])

    def session(self, session_id: str) -> Session:
        """One session by id (ApiError 404 when there is none)."""
        return Session(self, self.request("GET", f"/api/sessions/{quote(session_id, safe='')}"))

    def events(self, after: int = 0, sandbox: str | None = None) -> list[dict[str, Any]]:
        """Recorded events with ``seq > after``, oldest first."""
        query = {"after": after, **({"sandbox": sandbox} if sandbox else {})}
        return list(self.request("GET", f"/api/events?{urlencode(query)}")["events"])


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """A redirect is answered as it is (an :class:`ApiError` with its 3xx), not followed."""

    def redirect_request(self, req: urllib.request.Request, fp: Any, code: int, msg: str,
                         headers: Any, newurl: str) -> urllib.request.Request | None:
        return None


def _refusal(status: int, body: bytes) -> ApiError:
    """The :class:`ApiError` of a refusal: the gateway's JSON ``error`` and ``message``
    (a validation error's ``detail`` when there is no message), else the body's text."""
    text = body.decode(errors="replace")
    try:
        doc = json.loads(text)
    except ValueError:
        doc = None
    if not isinstance(doc, dict):
        return ApiError(status, "error", text[:ERROR_TEXT_CAP])
    message = doc.get("message") or json.dumps(doc.get("detail", doc))
    return ApiError(status, str(doc.get("error", "error")), str(message))


def post_credentials(data: dict[str, Any], *, session: str | None = None,
                     agent_url: str | None = None, timeout: float = 15.0) -> dict[str, Any]:
    """From inside a sandbox: hand captured credentials to the gateway via the guest agent.

    The agent (``$SANDPORT_AGENT_URL``, default ``http://127.0.0.1:7412``) adds the
    sandbox's agent token; the gateway stores them encrypted and completes ``session``
    (default: the sandbox's oldest open one). Returns the receipt: ``id``, ``session``.

    Raises:
        ApiError: the agent or the gateway refused them, or the agent does not answer.
    """
    url = (agent_url or os.environ.get("SANDPORT_AGENT_URL") or DEFAULT_AGENT_URL).rstrip("/")
    agent = Client(url, "", timeout=timeout)
    body: dict[str, Any] = {"data": data}
    if session is not None:
        body["session"] = session
    return dict(agent.request("POST", "/credentials", body))
