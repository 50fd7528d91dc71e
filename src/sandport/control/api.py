"""The gateway's HTTP API for sandboxes (FastAPI; OpenAPI at ``/openapi.json``, ``/docs``).

Every route but the agent's takes the admin token (``Authorization: Bearer T``; the
gateway keeps it in ``<state dir>/admin-token`` and ``gateway.json``, mode 0600). Errors
are JSON: ``{"error", "message"}`` with 401 (no token), 403 (wrong token), 404 (unknown
sandbox, session, forward or token), 409 (a host port taken or already forwarded, a
session that already ended, a sandbox that failed), 503 (the sandbox did not become
ready: the reason names the hop); a body that does not fit the schema is FastAPI's 422,
which names the field.

::

    POST   /api/sandboxes           create one and wait until it is proven ready (201)
    GET    /api/sandboxes           every sandbox
    GET    /api/sandboxes/{id}      one: state, reason, readiness probes, URLs, forwards
    DELETE /api/sandboxes/{id}      stop and remove it (204)
    POST   /api/sandboxes/{id}/forwards         forward more ports at runtime (201)
    DELETE /api/sandboxes/{id}/forwards/{fid}   stop one forward (204)
    POST   /api/sandboxes/{id}/tokens           an access token with a TTL and a scope (201)
    GET    /api/sandboxes/{id}/tokens           its tokens (ids, expiry, scope)
    DELETE /api/sandboxes/{id}/tokens/{tid}     revoke one: live sessions close (204)
    POST   /api/sandboxes/{id}/sessions         a session: waiting -> ready -> completed (201)
    GET    /api/sandboxes/{id}/sessions         its sessions
    GET    /api/sessions/{sid}?wait=S           one session; waits up to S s for its end
    GET    /api/sandboxes/{id}/credentials      what its guest posted, decrypted
    GET    /api/events?after=N                  the event log; SSE with Accept: text/event-stream

The guest agent's routes take the sandbox's *agent token* instead (handed to the agent at
start); on the agent port (:func:`sandport.control.agent_api.agent_app`, the bridge
address) only these exist, and only the sandbox's own address may call them::

    POST   /api/sandboxes/{id}/credentials      credentials the guest captured (201)
    POST   /api/sandboxes/{id}/agent/report     the agent's /health document (204)

Owns: the admin routes (:func:`api_router`), what the API needs of the gateway
(:class:`SandboxApi`), the refusals and their JSON (:class:`ApiRefusal`), and the token
check before any body is read (:class:`ApiGate`, for the agent's routes too).

Must not touch: the gateway's state (every route is one call on the :class:`SandboxApi`),
the models (:mod:`sandport.control.api_models`) and the agent's routes
(:mod:`sandport.control.agent_api`).
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Annotated, Any, Protocol
from urllib.parse import unquote

from fastapi import APIRouter, Query, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPBearer
from pydantic import StringConstraints
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from sandport.control.api_models import (
    CONFLICT,
    ERRORS,
    AttachIn,
    CredentialList,
    DoctorOut,
    ErrorOut,
    Event,
    EventList,
    ForwardList,
    ForwardsCreate,
    SandboxCreate,
    SandboxList,
    SandboxOut,
    SessionCreate,
    SessionList,
    SessionOut,
    TargetIn,
    TokenCreate,
    TokenList,
    TokenOut,
)
from sandport.control.events import EventHub, sse_stream
from sandport.control.forwards import ForwardOptions
from sandport.control.store import EventRecord, SessionRecord
from sandport.control.tokens import TokenCheck, bearer_token, check_token
from sandport.doctor import PORT_FORMS, check_port
from sandport.doctor import Report as DoctorReport
from sandport.errors import (
    Conflict,
    Forbidden,
    PortInUseError,
    SandboxFailed,
    SandboxNotFound,
    Unauthorized,
    UsageError,
)
from sandport.forward.spec import (
    PortMapping,
    PortSpecError,
    PortTaken,
    check_overlaps,
    parse_port_spec,
)

#: OpenAPI security schemes (the check itself is :class:`ApiGate`'s, before the body).
ADMIN_BEARER = HTTPBearer(scheme_name="admin token", auto_error=False,
                          description="the gateway's admin token (<state dir>/admin-token)")
AGENT_BEARER = HTTPBearer(scheme_name="agent token", auto_error=False,
                          description="the sandbox's agent token (the guest agent has it)")
MAX_AGENT_BODY = 64 * 1024  # credentials and reports are small; more is refused (413)
MAX_WAIT_SECONDS = 60.0


class ApiRefusal(Exception):
    """An API refusal: HTTP status, a short error name and a message for people.

    The gateway's side of a refused request; a Python caller of the API sees it as
    :class:`sandport.client.ApiError`.
    """

    def __init__(self, status: int, error: str, message: str) -> None:
        super().__init__(message)
        self.status, self.error, self.message = status, error, message


def api_error_response(_: Request | None, exc: Exception) -> Response:
    """The JSON body of an :class:`ApiRefusal` (registered as an exception handler)."""
    assert isinstance(exc, ApiRefusal)
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
    return JSONResponse({"error": exc.error, "message": exc.message},
                        status_code=exc.status, headers=headers)


def words(exc: Exception) -> str:
    """An error's message with its hint, on one line."""
    return "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())


def admin_error(authorization: str | None, admin_hash: str) -> ApiRefusal | None:
    """Why an ``Authorization`` header does not carry the admin token (None: it does)."""
    check = check_token(bearer_token(authorization), admin_hash)
    if check is TokenCheck.MISSING:
        return ApiRefusal(401, "unauthorized", "admin routes need 'Authorization: Bearer <admin "
                        "token>' (the token is in the gateway's state dir, gateway.json)")
    if check is TokenCheck.INVALID:
        return ApiRefusal(403, "forbidden", "the admin token is not valid")
    return None


def _mappings(specs: list[str]) -> list[PortMapping]:
    """``-p`` specs to mappings.

    Raises:
        ApiRefusal: 422 with the syntax, for a spec that does not parse or overlaps another.
    """
    try:
        mappings = [m for spec in specs for m in parse_port_spec(spec)]
        check_overlaps(mappings, {})
    except PortSpecError as exc:
        raise ApiRefusal(422, "invalid_port_spec", words(exc)) from None
    return mappings


def _port_conflict(exc: Exception) -> ApiRefusal:
    """A port taken by another program or another sandbox's forward: 409; other bad input
    (two specs of the request that want one port included): 422."""
    if isinstance(exc, (PortInUseError, PortTaken)):
        return ApiRefusal(409, "port_conflict", words(exc))
    if isinstance(exc, PortSpecError):
        return ApiRefusal(422, "invalid_port_spec", words(exc))
    return ApiRefusal(422, "invalid", words(exc))


def _target_error(exc: Exception, *, conflict: str) -> ApiRefusal:
    """An attach or retarget refused: 403 outside --attach-subnet, 404 no such target,
    409 ``conflict``, 503 it does not answer, 409/422 as :func:`_port_conflict`."""
    if isinstance(exc, Forbidden):
        return ApiRefusal(403, "forbidden_target", words(exc))
    if isinstance(exc, SandboxNotFound):
        return ApiRefusal(404, "unknown_target", words(exc))
    if isinstance(exc, Conflict):
        return ApiRefusal(409, conflict, words(exc))
    if isinstance(exc, SandboxFailed):
        return ApiRefusal(503, "not_ready", words(exc))
    return _port_conflict(exc)


class SandboxApi(Protocol):
    """What the API needs from the gateway."""

    @property
    def admin_token_hash(self) -> str:
        """Stored form of the admin token."""
        ...

    async def create_sandbox(self, *, profile: str = ..., vnc_port: int = ...,
                             publish: list[PortMapping] | None = ...,
                             options: ForwardOptions | None = ...,
                             session_ttl: float | None = ..., backend: str = ...,
                             memory_mb: int | None = ..., vcpus: int | None = ...) -> Any:
        """Create a sandbox and wait until it is ready; its info."""
        ...

    def info(self, sandbox_id: str) -> Any:
        """The info of a running sandbox; raises SandboxNotFound."""
        ...

    def sandbox_ids(self) -> list[str]:
        """Ids of the running sandboxes."""
        ...

    async def destroy_sandbox(self, sandbox_id: str) -> None:
        """Stop and remove a sandbox; raises SandboxNotFound."""
        ...

    async def add_forwards(self, sandbox_id: str, publish: list[PortMapping]) -> Any:
        """Forward more ports of a sandbox; the new forwards."""
        ...

    async def remove_forward(self, sandbox_id: str, forward_id: str) -> None:
        """Stop one forward; raises SandboxNotFound."""
        ...

    def create_grant(self, sandbox_id: str, ttl: float, *, ports: tuple[str, ...] = ...,
                     kinds: tuple[str, ...] = ...) -> dict[str, Any]:
        """A new access token for ``ttl`` seconds: id, token, expires_at, desktop_url."""
        ...

    def grants(self, sandbox_id: str) -> list[dict[str, Any]]:
        """The access tokens of a sandbox (without the tokens)."""
        ...

    def revoke_grant(self, sandbox_id: str, grant_id: str) -> None:
        """Revoke one; raises SandboxNotFound."""
        ...

    @property
    def events(self) -> EventHub:
        """Live events."""
        ...

    def event_log(self, *, after: int = ..., sandbox_id: str | None = ...,
                  limit: int = ...) -> list[EventRecord]:
        """Recorded events after ``after``."""
        ...

    def create_session(self, sandbox_id: str, ttl: float = ...) -> SessionRecord:
        """A new session; raises SandboxNotFound, Conflict."""
        ...

    def session(self, session_id: str) -> SessionRecord:
        """One session; raises SandboxNotFound."""
        ...

    def sessions(self, sandbox_id: str) -> list[SessionRecord]:
        """Sessions of a sandbox; raises SandboxNotFound."""
        ...

    def session_counts(self) -> dict[str, int]:
        """How many sessions are in each state."""
        ...

    async def wait_session(self, session_id: str, timeout: float) -> SessionRecord:
        """The session once final, or after ``timeout``."""
        ...

    def check_agent(self, sandbox_id: str, token: str | None,
                    client_ip: str | None = ...) -> Any:
        """Raises SandboxNotFound or Unauthorized unless ``token`` is the agent's."""
        ...

    def post_credentials(self, sandbox_id: str, data: dict[str, Any],
                         session_id: str | None = ...) -> tuple[Any, SessionRecord | None]:
        """Store credentials; (record, completed session)."""
        ...

    def credentials(self, sandbox_id: str) -> list[dict[str, Any]]:
        """The credentials of a sandbox, unsealed."""
        ...

    def agent_report(self, sandbox_id: str, report: dict[str, Any]) -> None:
        """Keep an agent's report."""
        ...

    def read_log(self, sandbox_id: str, name: str, offset: int,
                 limit: int) -> tuple[bytes, int, list[str]]:
        """(bytes from ``offset``, the next offset, the log names); SandboxNotFound."""
        ...

    async def doctor(self, sandbox_id: str, *, port: str | None = None,
                     token: str | None = None) -> DoctorReport:
        """Walk the path to a sandbox hop by hop (:mod:`sandport.doctor`)."""
        ...

    async def attach(self, *, ip: str, name: str = ..., profile: str = ..., port: int = ...,
                     vnc_port: int = ..., publish: list[PortMapping] | None = ...,
                     vnc_password: str | None = ..., interface: str = ...,
                     netns: str = ..., forward_mode: str = ...) -> Any:
        """Front a guest sandport did not create; its info once it answers."""
        ...

    async def retarget(self, sandbox_id: str, *, ip: str | None = ..., gone: bool = ...,
                       reason: str = ...) -> Any:
        """An attached target moved or is gone."""
        ...


def api_router(gateway: SandboxApi) -> APIRouter:
    """The ``/api/sandboxes`` routes over ``gateway``."""

    router = APIRouter(prefix="/api", dependencies=[Security(ADMIN_BEARER)],
                       tags=["sandboxes"], responses=ERRORS)

    def out(sandbox_id: str) -> SandboxOut:
        try:
            return SandboxOut.model_validate(gateway.info(sandbox_id).as_json())
        except SandboxNotFound:
            raise ApiRefusal(404, "unknown_sandbox", f"no sandbox {sandbox_id!r}") from None

    @router.post("/sandboxes", status_code=201, response_model=SandboxOut,
                 summary="Create a sandbox; answers once it is proven ready",
                 responses={**CONFLICT, 503: {"model": ErrorOut, "description":
                                              "it did not become ready: the hop and why"}})
    async def create_sandbox(body: SandboxCreate) -> SandboxOut:
        mappings = _mappings(body.publish)
        try:
            info = await gateway.create_sandbox(profile=body.profile, vnc_port=body.vnc_port,
                                                publish=mappings,
                                                session_ttl=body.session_ttl_seconds,
                                                backend=body.backend,
                                                memory_mb=body.memory_mb, vcpus=body.vcpus)
        except SandboxFailed as exc:
            raise ApiRefusal(503, "not_ready", words(exc)) from None
        except UsageError as exc:
            raise _port_conflict(exc) from None
        return out(info.id)

    @router.post("/attach", status_code=201, response_model=SandboxOut,
                 summary="Front a guest sandport did not create; answers once it answers",
                 responses={**CONFLICT, 403: {"model": ErrorOut, "description":
                                              "the address is outside --attach-subnet"},
                            503: {"model": ErrorOut, "description":
                                  "it did not answer its protocol: the hop and why"}})
    async def attach(body: AttachIn) -> SandboxOut:
        mappings = _mappings(body.publish)
        try:
            info = await gateway.attach(
                ip=body.ip, name=body.name, profile=body.profile, port=body.port,
                vnc_port=body.vnc_port, publish=mappings, vnc_password=body.vnc_password,
                interface=body.interface, netns=body.netns, forward_mode=body.forward_mode)
        except (Conflict, SandboxFailed, UsageError) as exc:
            raise _target_error(exc, conflict="already_attached") from None
        return out(info.id)

    @router.post("/sandboxes/{sandbox_id}/target", response_model=SandboxOut,
                 responses={**CONFLICT, 403: {"model": ErrorOut, "description":
                                              "the new address is outside --attach-subnet"},
                            503: {"model": ErrorOut, "description":
                                  "it does not answer at the new address"}},
                 summary="An attached target moved to a new address, or is gone")
    async def retarget(sandbox_id: str, body: TargetIn) -> SandboxOut:
        try:
            info = await gateway.retarget(sandbox_id, ip=body.ip, gone=body.gone,
                                          reason=body.reason)
        except (SandboxNotFound, Conflict, SandboxFailed, UsageError) as exc:
            raise _target_error(exc, conflict="conflict") from None
        return out(info.id)

    @router.get("/sandboxes", response_model=SandboxList, summary="Every sandbox")
    async def list_sandboxes() -> SandboxList:
        found = []
        for sandbox_id in gateway.sandbox_ids():
            try:
                found.append(out(sandbox_id))
            except ApiRefusal:  # removed meanwhile
                continue
        return SandboxList(sandboxes=found)

    @router.get("/sandboxes/{sandbox_id}", response_model=SandboxOut,
                summary="One sandbox: state, reason, readiness probes, URLs, forwards")
    async def get_sandbox(sandbox_id: str) -> SandboxOut:
        return out(sandbox_id)

    @router.delete("/sandboxes/{sandbox_id}", status_code=204, response_class=Response,
                   summary="Stop and remove a sandbox")
    async def delete_sandbox(sandbox_id: str) -> Response:
        try:
            await gateway.destroy_sandbox(sandbox_id)
        except SandboxNotFound:
            raise ApiRefusal(404, "unknown_sandbox", f"no sandbox {sandbox_id!r}") from None
        return Response(status_code=204)

    @router.post("/sandboxes/{sandbox_id}/forwards", status_code=201,
                 response_model=ForwardList, summary="Forward more ports of a sandbox",
                 responses=CONFLICT)
    async def add_forwards(sandbox_id: str, body: ForwardsCreate) -> ForwardList:
        mappings = _mappings(body.publish)
        try:
            added = await gateway.add_forwards(sandbox_id, mappings)
        except SandboxNotFound:
            raise ApiRefusal(404, "unknown_sandbox", f"no sandbox {sandbox_id!r}") from None
        except Conflict as exc:
            raise ApiRefusal(409, "sandbox_unavailable", words(exc)) from None
        except UsageError as exc:
            raise _port_conflict(exc) from None
        return ForwardList(forwards=added)

    @router.delete("/sandboxes/{sandbox_id}/forwards/{forward_id}", status_code=204,
                   response_class=Response, summary="Stop one forward of a sandbox")
    async def remove_forward(sandbox_id: str, forward_id: str) -> Response:
        try:
            await gateway.remove_forward(sandbox_id, forward_id)
        except SandboxNotFound as exc:
            raise ApiRefusal(404, "not_found", words(exc)) from None
        return Response(status_code=204)

    @router.post("/sandboxes/{sandbox_id}/tokens", status_code=201, response_model=TokenOut,
                 summary="An access token that expires (a desktop link to hand out)")
    async def create_token(sandbox_id: str, body: TokenCreate) -> TokenOut:
        try:
            return TokenOut.model_validate(gateway.create_grant(
                sandbox_id, body.ttl_seconds, ports=tuple(body.ports), kinds=tuple(body.kinds)))
        except SandboxNotFound:
            raise ApiRefusal(404, "unknown_sandbox", f"no sandbox {sandbox_id!r}") from None
        except UsageError as exc:  # a scope that opens nothing it names
            raise ApiRefusal(422, "bad_scope", words(exc)) from None

    @router.get("/sandboxes/{sandbox_id}/tokens", response_model=TokenList,
                summary="The access tokens of a sandbox")
    async def list_tokens(sandbox_id: str) -> TokenList:
        try:
            return TokenList.model_validate({"tokens": gateway.grants(sandbox_id)})
        except SandboxNotFound:
            raise ApiRefusal(404, "unknown_sandbox", f"no sandbox {sandbox_id!r}") from None

    @router.delete("/sandboxes/{sandbox_id}/tokens/{token_id}", status_code=204,
                   response_class=Response,
                   summary="Revoke an access token: its live sessions close at once")
    async def revoke_token(sandbox_id: str, token_id: str) -> Response:
        try:
            gateway.revoke_grant(sandbox_id, token_id)
        except SandboxNotFound as exc:
            raise ApiRefusal(404, "not_found", words(exc)) from None
        return Response(status_code=204)

    @router.post("/sandboxes/{sandbox_id}/sessions", status_code=201, response_model=SessionOut,
                 tags=["sessions"], responses=CONFLICT,
                 summary="Open a session: it completes when the guest posts credentials")
    async def create_session(sandbox_id: str, body: SessionCreate) -> SessionOut:
        try:
            return SessionOut.of(gateway.create_session(sandbox_id, body.ttl_seconds))
        except SandboxNotFound:
            raise ApiRefusal(404, "unknown_sandbox", f"no sandbox {sandbox_id!r}") from None
        except Conflict as exc:
            raise ApiRefusal(409, "sandbox_unavailable", words(exc)) from None

    @router.get("/sandboxes/{sandbox_id}/sessions", response_model=SessionList,
                tags=["sessions"], summary="The sessions of a sandbox")
    async def list_sessions(sandbox_id: str) -> SessionList:
        try:
            return SessionList(sessions=[SessionOut.of(r) for r in gateway.sessions(sandbox_id)])
        except SandboxNotFound:
            raise ApiRefusal(404, "unknown_sandbox", f"no sandbox {sandbox_id!r}") from None

    @router.get("/sessions/{session_id}", response_model=SessionOut, tags=["sessions"],
                summary="One session; with ?wait=S, answers when it ends or after S seconds")
    async def get_session(
        session_id: str,
        wait: Annotated[float, Query(ge=0, le=MAX_WAIT_SECONDS,
                                     description="seconds to wait for the session to end")] = 0,
    ) -> SessionOut:
        try:
            rec = await gateway.wait_session(session_id, wait) if wait else \
                gateway.session(session_id)
        except SandboxNotFound:
            raise ApiRefusal(404, "unknown_session", f"no session {session_id!r}") from None
        return SessionOut.of(rec)

    @router.get("/sandboxes/{sandbox_id}/logs", tags=["sandboxes"],
                summary="A guest log (a VM's serial console by default) from an offset",
                response_class=Response,
                responses={200: {"content": {"text/plain": {}},
                                 "description": "the bytes; X-Next-Offset: where to go on; "
                                                "X-Logs: the log names"}})
    async def read_log(
        sandbox_id: str,
        name: Annotated[str, Query(pattern=r"^[A-Za-z0-9_.-]{0,64}$",
                                   description="serial (VMs), Xvnc, openbox, agent, qemu...")]
        = "",
        offset: Annotated[int, Query(ge=-(1 << 30), le=1 << 40, description=(
            "where to start; negative: that many bytes before the end"))] = -65536,
        limit: Annotated[int, Query(ge=1, le=1 << 20)] = 1 << 20,
    ) -> Response:
        try:
            data, nxt, names = gateway.read_log(sandbox_id, name, offset, limit)
        except SandboxNotFound as exc:
            raise ApiRefusal(404, "not_found", words(exc)) from None
        return Response(data, media_type="text/plain; charset=utf-8",
                        headers={"X-Next-Offset": str(nxt), "X-Logs": ",".join(names)})

    @router.get("/sandboxes/{sandbox_id}/doctor", response_model=DoctorOut,
                tags=["sandboxes"], responses=ERRORS,
                summary="Walk the path to the sandbox hop by hop; name the broken hop")
    async def doctor(
        sandbox_id: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{1,64}$")],
        port: Annotated[str | None, Query(max_length=64, description=(
            "one port: " + PORT_FORMS))] = None,
        token: Annotated[str | None, Query(max_length=256, description=(
            "a token someone uses for the sandbox (a link's ?token=): checked too"))] = None,
    ) -> DoctorOut:
        if port is not None:
            try:
                check_port(port)
            except UsageError as exc:
                raise ApiRefusal(422, "invalid_port", words(exc)) from None
        report = await gateway.doctor(sandbox_id, port=port, token=token or None)
        return DoctorOut.model_validate(report.as_json())

    @router.get("/sandboxes/{sandbox_id}/credentials", response_model=CredentialList,
                tags=["sessions"], summary="What the sandbox's guest posted, decrypted")
    async def list_credentials(sandbox_id: str) -> CredentialList:
        try:
            return CredentialList.model_validate(
                {"credentials": gateway.credentials(sandbox_id)})
        except SandboxNotFound:
            raise ApiRefusal(404, "unknown_sandbox", f"no sandbox {sandbox_id!r}") from None

    @router.get("/events", response_model=EventList, tags=["events"],
                summary="The event log after `after`; a live stream (SSE) when asked for "
                        "text/event-stream",
                responses={200: {"content": {"text/event-stream": {}}}})
    async def events(
        request: Request,
        after: Annotated[int, Query(ge=0, description="only events with seq > after")] = 0,
        sandbox: Annotated[str | None, Query(max_length=64,
                                             description="only this sandbox's")] = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 1000,
    ) -> Response:
        if "text/event-stream" in request.headers.get("accept", ""):
            last_id = request.headers.get("last-event-id", "")
            start = int(last_id) if last_id.isascii() and last_id.isdigit() else after

            def keep(e: EventRecord) -> bool:
                return sandbox is None or e.sandbox_id == sandbox

            def replay(seq: int) -> list[EventRecord]:
                return gateway.event_log(after=seq, sandbox_id=sandbox)

            stream: AsyncIterator[bytes] = sse_stream(gateway.events, replay, start, keep)
            return StreamingResponse(stream, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-store",
                                              "X-Accel-Buffering": "no"})
        found = gateway.event_log(after=after, sandbox_id=sandbox, limit=limit)
        doc = EventList(events=[Event.model_validate(e.as_json()) for e in found],
                        last=found[-1].seq if found else after)
        return JSONResponse(doc.model_dump())

    return router


async def validation_error_response(_: Request, exc: Exception) -> Response:
    """422 naming the fields (registered as an exception handler)."""
    assert isinstance(exc, RequestValidationError)
    problems = [f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', '')}"
                for e in exc.errors()[:3]]
    more = f" (and {len(exc.errors()) - 3} more)" if len(exc.errors()) > 3 else ""
    return JSONResponse({"error": "invalid", "message": "the request does not fit the schema: "
                         + "; ".join(problems) + more,
                         "detail": jsonable_errors(exc)}, status_code=422)


async def http_error_response(_: Request, exc: Exception) -> Response:
    """Starlette's own refusals (no route, wrong method, a body that does not parse) in the
    API's shape: ``{"error", "message"}``; a body that is not JSON is a 422 like any
    other schema error."""
    assert isinstance(exc, StarletteHTTPException)
    status, detail = exc.status_code, str(exc.detail)
    if status == 400 and "parsing the body" in detail:
        return JSONResponse({"error": "invalid", "message": "the body is not UTF-8 JSON",
                             "detail": [{"loc": ["body"], "msg": detail,
                                         "type": "json_invalid"}]}, status_code=422)
    names = {404: "not_found", 405: "method_not_allowed"}
    return JSONResponse({"error": names.get(status, "http_error"), "message": detail,
                         "detail": detail}, status_code=status, headers=exc.headers)


def jsonable_errors(exc: RequestValidationError) -> list[dict[str, Any]]:
    """FastAPI's validation errors without the input echoed back (it may be a secret)."""
    return [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
            for e in exc.errors()]


AGENT_ROUTE = re.compile(r"^/api/sandboxes/(?P<sandbox>[^/]+)/(?:credentials|agent/report)/?$")


def api_refusal(gateway: SandboxApi, method: str, path: str, headers: Headers,
                client_ip: str | None, *, agent_port: bool) -> ApiRefusal | None:
    """Why a request to ``/api`` is refused before its body is read (None: let it in).

    The guest agent's POSTs take the sandbox's agent token (and, on the agent port, come
    from the sandbox's address); every other ``/api`` route takes the admin token.
    """
    authorization = headers.get("authorization")
    m = AGENT_ROUTE.match(path)
    if m is not None and method == "POST":
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > MAX_AGENT_BODY:
            return ApiRefusal(413, "too_large", f"the body is over {MAX_AGENT_BODY} bytes")
        try:
            gateway.check_agent(unquote(m["sandbox"]), bearer_token(authorization),
                                client_ip if agent_port else None)
        except (SandboxNotFound, Unauthorized) as exc:
            missing = isinstance(exc, Unauthorized) and exc.missing
            return ApiRefusal(401 if missing else 403,
                            "unauthorized" if missing else "forbidden", words(exc))
        return None
    if agent_port or not (path == "/api" or path.startswith("/api/")):
        return None  # the agent port has no other routes: they answer 404
    return admin_error(authorization, gateway.admin_token_hash)


class ApiGate:
    """ASGI middleware: authentication first, so no body is parsed (or 422'd) for a
    caller without the right token."""

    def __init__(self, app: ASGIApp, *, gateway: SandboxApi, agent_port: bool = False) -> None:
        self.app, self.gateway, self.agent_port = app, gateway, agent_port

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            client = scope.get("client")
            refusal = api_refusal(self.gateway, scope["method"], scope["path"],
                                  Headers(scope=scope), client[0] if client else None,
                                  agent_port=self.agent_port)
            if refusal is not None:
                await api_error_response(None, refusal)(scope, receive, send)
                return
        await self.app(scope, receive, send)
