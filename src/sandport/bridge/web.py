"""The bridge's plain HTTP answers: JSON refusals and static files (``--web``).

Owns the responses a bridge writes itself, before or instead of an upgrade: a JSON
body with a status (:func:`json_response`) and a file of the ``--web`` directory, e.g.
the noVNC client (:func:`static_response`). Every answer closes its connection. Must
not touch sockets or sessions: callers write the response.
"""

from __future__ import annotations

import json
import mimetypes
from collections.abc import Sequence
from http import HTTPStatus
from pathlib import Path
from typing import Any, Final
from urllib.parse import unquote, urlsplit

from websockets.datastructures import Headers
from websockets.http11 import Request, Response

__all__ = ["WEB_FILE_MAX", "json_response", "static_response"]

#: Largest file served from ``--web``.
WEB_FILE_MAX: Final = 64 * 1024 * 1024


def json_response(status: int, doc: dict[str, Any],
                  headers: Sequence[tuple[str, str]] = ()) -> Response:
    """A complete HTTP response with a JSON body; the connection closes after it."""
    body = (json.dumps(doc) + "\n").encode()
    h = Headers([("Content-Type", "application/json"), ("Content-Length", str(len(body))),
                 ("Connection", "close"), ("Cache-Control", "no-store"), *headers])
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "Error"
    return Response(status, phrase, h, body)


def static_response(web_dir: Path | None, request: Request) -> Response:
    """A plain GET: a file of ``web_dir`` (never outside it), or why not.

    Without a ``web_dir`` the answer is 426: this port takes WebSocket clients only.
    """
    if web_dir is None:
        return json_response(426, {
            "error": "upgrade_required",
            "message": "this is a WebSocket bridge: connect with a WebSocket client "
                       "(or start it with --web DIR to serve files)"},
            [("Upgrade", "websocket")])
    rel = unquote(urlsplit(request.path).path).lstrip("/")
    path = (web_dir / rel).resolve()
    base = web_dir.resolve()
    if path != base and base not in path.parents:
        return json_response(404, {"error": "not_found", "message": "no such file"})
    if path.is_dir():
        path = path / "index.html"
    try:
        size = path.stat().st_size
        if size > WEB_FILE_MAX or not path.is_file():
            raise FileNotFoundError
        body = path.read_bytes()
    except OSError:
        return json_response(404, {"error": "not_found",
                                   "message": f"no file {'/' + rel!r} here"})
    ctype = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    if ctype.startswith("text/") or ctype in ("application/javascript", "application/json"):
        ctype += "; charset=utf-8"
    headers = Headers([("Content-Type", ctype), ("Content-Length", str(len(body))),
                       ("Connection", "close"), ("Cache-Control", "no-cache")])
    return Response(200, "OK", headers, body)
