"""The gateway's HTTP API for sandboxes (FastAPI; OpenAPI at ``/openapi.json``, ``/docs``).

Every route takes the admin token (``Authorization: Bearer T``; the gateway writes it to
``<state dir>/gateway.json``, mode 0600). Errors are JSON: ``{"error", "message"}`` with
401 (no token), 403 (wrong token), 404 (unknown sandbox), 409 (a host port taken or
already forwarded), 503 (the sandbox did not become ready: the reason names the hop);
a body that does not fit the schema is FastAPI's 422, which names the field.

::

    POST   /api/sandboxes           create one and wait until it is proven ready (201)
    GET    /api/sandboxes           every sandbox
    GET    /api/sandboxes/{id}      one: state, reason, readiness probes, URLs, forwards
    DELETE /api/sandboxes/{id}      stop and remove it (204)
    POST   /api/sandboxes/{id}/forwards         forward more ports at runtime (201)
    DELETE /api/sandboxes/{id}/forwards/{fid}   stop one forward (204)
    POST   /api/sandboxes/{id}/tokens           an access token with a TTL (201)
    GET    /api/sandboxes/{id}/tokens           its tokens (ids and expiry)
    DELETE /api/sandboxes/{id}/tokens/{tid}     revoke one: live sessions close (204)
"""

from __future__ import annotations

from typing import Any, Literal, Protocol

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from sandport.control.forwards import ForwardOptions
from sandport.control.tokens import TokenCheck, bearer_token, check_token
from sandport.errors import PortInUseError, SandboxFailed, SandboxNotFound, UsageError
from sandport.forward.spec import PortMapping, PortSpecError, check_overlaps, parse_port_spec


class ApiError(Exception):
    """An API refusal: HTTP status, a short error name and a message for people."""

    def __init__(self, status: int, error: str, message: str) -> None:
        super().__init__(message)
        self.status, self.error, self.message = status, error, message


def api_error_response(_: Request, exc: Exception) -> Response:
    """The JSON body of an :class:`ApiError` (registered as an exception handler)."""
    assert isinstance(exc, ApiError)
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
    return JSONResponse({"error": exc.error, "message": exc.message},
                        status_code=exc.status, headers=headers)


def _words(exc: Exception) -> str:
    """An error's message with its hint, on one line."""
    return "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())


def admin_error(authorization: str | None, admin_hash: str) -> ApiError | None:
    """Why an ``Authorization`` header does not carry the admin token (None: it does)."""
    check = check_token(bearer_token(authorization), admin_hash)
    if check is TokenCheck.MISSING:
        return ApiError(401, "unauthorized", "admin routes need 'Authorization: Bearer <admin "
                        "token>' (the token is in the gateway's state dir, gateway.json)")
    if check is TokenCheck.INVALID:
        return ApiError(403, "forbidden", "the admin token is not valid")
    return None


def _mappings(specs: list[str]) -> list[PortMapping]:
    """``-p`` specs to mappings.

    Raises:
        ApiError: 422 with the syntax, for a spec that does not parse or overlaps another.
    """
    try:
        mappings = [m for spec in specs for m in parse_port_spec(spec)]
        check_overlaps(mappings, {})
    except PortSpecError as exc:
        raise ApiError(422, "invalid_port_spec", _words(exc)) from None
    return mappings


def _port_conflict(exc: Exception) -> ApiError:
    """A port taken by another program or already forwarded: 409; other bad input: 422."""
    if isinstance(exc, (PortInUseError, PortSpecError)):
        return ApiError(409, "port_conflict", _words(exc))
    return ApiError(422, "invalid", _words(exc))


class SandboxApi(Protocol):
    """What the API needs from the gateway."""

    @property
    def admin_token_hash(self) -> str:
        """Stored form of the admin token."""
        ...

    async def create_sandbox(self, *, profile: str = ..., vnc_port: int = ...,
                             publish: list[PortMapping] | None = ...,
                             options: ForwardOptions | None = ...) -> Any:
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

    def create_grant(self, sandbox_id: str, ttl: float) -> dict[str, Any]:
        """A new access token for ``ttl`` seconds: id, token, expires_at, desktop_url."""
        ...

    def grants(self, sandbox_id: str) -> list[dict[str, Any]]:
        """The access tokens of a sandbox (without the tokens)."""
        ...

    def revoke_grant(self, sandbox_id: str, grant_id: str) -> None:
        """Revoke one; raises SandboxNotFound."""
        ...


class SandboxCreate(BaseModel):
    """A sandbox to create."""

    model_config = ConfigDict(extra="forbid")

    profile: Literal["desktop"] = Field("desktop", description="guest profile")
    publish: list[str] = Field(
        default_factory=list,
        description="host port forwards, docker syntax: [HOSTIP:]HOSTPORT:GUESTPORT[/tcp|/udp]",
        examples=[["18080:8080", "127.0.0.1:15353:53/udp"]])
    vnc_port: int = Field(0, ge=0, le=65535,
                          description="host port of the VNC forward; 0 picks a free one")


class ForwardsCreate(BaseModel):
    """Ports to forward from the host into a running sandbox."""

    model_config = ConfigDict(extra="forbid")

    publish: list[str] = Field(
        min_length=1, description="docker syntax: [HOSTIP:]HOSTPORT:GUESTPORT[/tcp|/udp]",
        examples=[["18080:8080"]])


class TokenCreate(BaseModel):
    """An access token to make: valid for ``ttl_seconds``."""

    model_config = ConfigDict(extra="forbid")

    ttl_seconds: float = Field(gt=0, le=30 * 86400, description="how long it is valid")


class TokenOut(BaseModel):
    """A new access token: shown once."""

    id: str
    token: str
    expires_at: float
    desktop_url: str


class TokenInfo(BaseModel):
    """An access token as listed (the token itself is never shown again)."""

    id: str
    expires_at: float
    expired: bool


class TokenList(BaseModel):
    """The access tokens of a sandbox."""

    tokens: list[TokenInfo]


class ForwardList(BaseModel):
    """Forwards of a sandbox."""

    forwards: list[dict[str, Any]]


class Probe(BaseModel):
    """One readiness probe: which hop, how far it got, what the server said."""

    hop: str
    ok: bool
    stage: str
    detail: str
    elapsed_ms: float


class Readiness(BaseModel):
    """The probes that declared the sandbox ready, and the monitor's latest."""

    probes: list[Probe]
    last: Probe | None


class VncAddress(BaseModel):
    """Where a native VNC viewer connects."""

    host: str
    port: int


class SandboxOut(BaseModel):
    """A sandbox as the API shows it."""

    id: str
    state: str
    reason: str
    ip: str
    profile: str
    desktop_url: str
    token: str
    vnc: VncAddress
    vnc_password: str
    colour: str
    ready_seconds: float | None
    forwards: list[dict[str, Any]]
    readiness: Readiness


class SandboxList(BaseModel):
    """Every sandbox of the gateway."""

    sandboxes: list[SandboxOut]


def api_router(gateway: SandboxApi) -> APIRouter:
    """The ``/api/sandboxes`` routes over ``gateway``."""

    def admin(request: Request) -> None:
        error = admin_error(request.headers.get("authorization"), gateway.admin_token_hash)
        if error is not None:
            raise error

    router = APIRouter(prefix="/api", dependencies=[Depends(admin)], tags=["sandboxes"])

    def out(sandbox_id: str) -> SandboxOut:
        try:
            return SandboxOut.model_validate(gateway.info(sandbox_id).as_json())
        except SandboxNotFound:
            raise ApiError(404, "unknown_sandbox", f"no sandbox {sandbox_id!r}") from None

    @router.post("/sandboxes", status_code=201, response_model=SandboxOut,
                 summary="Create a sandbox; answers once it is proven ready")
    async def create_sandbox(body: SandboxCreate) -> SandboxOut:
        mappings = _mappings(body.publish)
        try:
            info = await gateway.create_sandbox(profile=body.profile, vnc_port=body.vnc_port,
                                                publish=mappings)
        except SandboxFailed as exc:
            raise ApiError(503, "not_ready", _words(exc)) from None
        except UsageError as exc:
            raise _port_conflict(exc) from None
        return out(info.id)

    @router.get("/sandboxes", response_model=SandboxList, summary="Every sandbox")
    async def list_sandboxes() -> SandboxList:
        found = []
        for sandbox_id in gateway.sandbox_ids():
            try:
                found.append(out(sandbox_id))
            except ApiError:  # removed meanwhile
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
            raise ApiError(404, "unknown_sandbox", f"no sandbox {sandbox_id!r}") from None
        return Response(status_code=204)

    @router.post("/sandboxes/{sandbox_id}/forwards", status_code=201,
                 response_model=ForwardList, summary="Forward more ports of a sandbox")
    async def add_forwards(sandbox_id: str, body: ForwardsCreate) -> ForwardList:
        mappings = _mappings(body.publish)
        try:
            added = await gateway.add_forwards(sandbox_id, mappings)
        except SandboxNotFound:
            raise ApiError(404, "unknown_sandbox", f"no sandbox {sandbox_id!r}") from None
        except UsageError as exc:
            raise _port_conflict(exc) from None
        return ForwardList(forwards=added)

    @router.delete("/sandboxes/{sandbox_id}/forwards/{forward_id}", status_code=204,
                   response_class=Response, summary="Stop one forward of a sandbox")
    async def remove_forward(sandbox_id: str, forward_id: str) -> Response:
        try:
            await gateway.remove_forward(sandbox_id, forward_id)
        except SandboxNotFound as exc:
            raise ApiError(404, "not_found", _words(exc)) from None
        return Response(status_code=204)

    @router.post("/sandboxes/{sandbox_id}/tokens", status_code=201, response_model=TokenOut,
                 summary="An access token that expires (a desktop link to hand out)")
    async def create_token(sandbox_id: str, body: TokenCreate) -> TokenOut:
        try:
            return TokenOut.model_validate(gateway.create_grant(sandbox_id, body.ttl_seconds))
        except SandboxNotFound:
            raise ApiError(404, "unknown_sandbox", f"no sandbox {sandbox_id!r}") from None

    @router.get("/sandboxes/{sandbox_id}/tokens", response_model=TokenList,
                summary="The access tokens of a sandbox")
    async def list_tokens(sandbox_id: str) -> TokenList:
        try:
            return TokenList.model_validate({"tokens": gateway.grants(sandbox_id)})
        except SandboxNotFound:
            raise ApiError(404, "unknown_sandbox", f"no sandbox {sandbox_id!r}") from None

    @router.delete("/sandboxes/{sandbox_id}/tokens/{token_id}", status_code=204,
                   response_class=Response,
                   summary="Revoke an access token: its live sessions close at once")
    async def revoke_token(sandbox_id: str, token_id: str) -> Response:
        try:
            gateway.revoke_grant(sandbox_id, token_id)
        except SandboxNotFound as exc:
            raise ApiError(404, "not_found", _words(exc)) from None
        return Response(status_code=204)

    return router
