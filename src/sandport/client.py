"""A Python client for a running gateway's API (standard library only).

::

    from sandport.client import Client

    gw = Client.from_state_dir("/var/lib/sandport")      # or Client(url, admin_token)
    sb = gw.create_sandbox(publish=["18080:8080"])      # returns once it is proven ready
    print(sb.desktop_url, sb.get_host(5901), sb.get_host(8080))
    sb.delete()

Errors are :class:`ApiError` with the HTTP status and the gateway's own message.
"""

from __future__ import annotations

import json
import ssl
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

GATEWAY_FILE = "gateway.json"


class ApiError(Exception):
    """The gateway refused a request (``status``) or did not answer (``status`` 0)."""

    def __init__(self, status: int, error: str, message: str) -> None:
        super().__init__(f"{status} {error}: {message}" if status else message)
        self.status, self.error, self.message = status, error, message


@dataclass(slots=True)
class Sandbox:
    """A sandbox as the API shows it; :meth:`refresh` asks again."""

    client: Client
    doc: dict[str, Any] = field(repr=False)

    @property
    def id(self) -> str:
        """The sandbox id."""
        return str(self.doc["id"])

    @property
    def state(self) -> str:
        """creating, starting, ready, degraded, stopping, stopped or failed."""
        return str(self.doc["state"])

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
        self.doc = self.client.request("GET", f"/api/sandboxes/{quote(self.id, safe='')}")
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
        """Stop and remove it."""
        self.client.request("DELETE", f"/api/sandboxes/{quote(self.id, safe='')}")


class Client:
    """The API of one gateway: its URL and admin token."""

    def __init__(self, url: str, admin_token: str, *, timeout: float = 120.0,
                 verify_tls: bool = True) -> None:
        self.url = url.rstrip("/")
        self.admin_token = admin_token
        self.timeout = timeout
        self._context: ssl.SSLContext | None = None
        if url.startswith("https://") and not verify_tls:
            self._context = ssl._create_unverified_context()  # noqa: S323 - asked for

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
            ApiError: the gateway refused it, or did not answer (status 0).
        """
        if not self.url.startswith(("http://", "https://")):
            raise ApiError(0, "bad_url", f"{self.url!r} is not an http(s):// URL")
        req = urllib.request.Request(  # noqa: S310 - http(s) checked above
            self.url + path, method=method,
            data=json.dumps(body).encode() if body is not None else None,
            headers={"Authorization": f"Bearer {self.admin_token}",
                     "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout,  # noqa: S310
                                        context=self._context) as r:
                raw = r.read()
        except urllib.error.HTTPError as exc:
            text = exc.read().decode(errors="replace")
            try:
                doc = json.loads(text)
            except ValueError:
                doc = {"message": text}
            message = doc.get("message") or json.dumps(doc.get("detail", doc))
            raise ApiError(exc.code, str(doc.get("error", "error")), str(message)) from None
        except OSError as exc:
            raise ApiError(0, "unreachable", f"{self.url} does not answer: {exc}") from None
        return json.loads(raw) if raw else None

    def create_sandbox(self, *, profile: str = "desktop", publish: list[str] | None = None,
                       vnc_port: int = 0) -> Sandbox:
        """Create a sandbox; returns once the gateway has proven it ready.

        Raises:
            ApiError: 409 a port is taken, 422 a bad spec, 503 it did not become ready.
        """
        doc = self.request("POST", "/api/sandboxes", {"profile": profile,
                                                      "publish": publish or [],
                                                      "vnc_port": vnc_port})
        return Sandbox(self, doc)

    def sandboxes(self) -> list[Sandbox]:
        """Every sandbox of the gateway."""
        return [Sandbox(self, d) for d in self.request("GET", "/api/sandboxes")["sandboxes"]]

    def sandbox(self, sandbox_id: str) -> Sandbox:
        """One sandbox by id (ApiError 404 when there is none)."""
        return Sandbox(self, self.request("GET", f"/api/sandboxes/{quote(sandbox_id, safe='')}"))
