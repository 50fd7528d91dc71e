"""The guest agent's side of the API: the agent port and the agent's routes.

Owns: the routes a guest agent calls with its sandbox's *agent token* (credentials it
captured, its health reports) and the app on the agent port (the bridge address), where
only these exist and only the sandbox's own address may call them.

Must not touch: the admin routes (:mod:`sandport.control.api`) and the gateway's state:
the routes hand each call to the :class:`~sandport.control.api.SandboxApi`. The token
check runs before the body is read (:class:`~sandport.control.api.ApiGate`). The app
listens on a Unix socket; guests reach it only through the agent port's front
(:mod:`sandport.control.agent_port`: body cap, head and idle timeouts, connection cap),
which names the guest's address in ``X-Forwarded-For``.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, FastAPI, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from sandport import __version__
from sandport.control.api import (
    AGENT_BEARER,
    ApiGate,
    ApiRefusal,
    SandboxApi,
    api_error_response,
    http_error_response,
    validation_error_response,
    words,
)
from sandport.control.api_models import (
    CONFLICT,
    ERRORS,
    CredentialReceipt,
    CredentialsIn,
    ErrorOut,
    SessionOut,
)
from sandport.errors import Conflict, SandboxNotFound


def agent_router(gateway: SandboxApi) -> APIRouter:
    """The guest agent's routes: authenticated with the sandbox's agent token (the
    :class:`ApiGate` checks it before the body is read)."""
    router = APIRouter(prefix="/api", dependencies=[Security(AGENT_BEARER)],
                       tags=["guest agent"],
                       responses={**ERRORS, 413: {"model": ErrorOut,
                                                  "description": "the body is too large"}})

    @router.post("/sandboxes/{sandbox_id}/credentials", status_code=201,
                 response_model=CredentialReceipt, responses=CONFLICT,
                 summary="Credentials the guest captured (agent token); completes the session")
    async def post_credentials(sandbox_id: str, body: CredentialsIn) -> CredentialReceipt:
        try:
            rec, session = gateway.post_credentials(sandbox_id, body.data, body.session)
        except SandboxNotFound as exc:
            raise ApiRefusal(404, "not_found", words(exc)) from None
        except Conflict as exc:
            raise ApiRefusal(409, "session_ended", words(exc)) from None
        return CredentialReceipt(id=rec.id,
                                 session=SessionOut.of(session) if session else None)

    @router.post("/sandboxes/{sandbox_id}/agent/report", status_code=204,
                 response_class=Response, summary="The guest agent's health (agent token)")
    async def agent_report(sandbox_id: str, body: dict[str, Any]) -> Response:
        try:
            gateway.agent_report(sandbox_id, body)
        except SandboxNotFound:
            raise ApiRefusal(404, "unknown_sandbox", f"no sandbox {sandbox_id!r}") from None
        return Response(status_code=204)

    return router


def agent_app(gateway: SandboxApi) -> FastAPI:
    """The app on the agent port: the guest agent's routes, nothing else; each sandbox's
    agent may call only from the sandbox's own address."""
    app = FastAPI(title="sandport agent port", version=__version__, openapi_url=None,
                  docs_url=None, redoc_url=None)
    app.add_exception_handler(ApiRefusal, api_error_response)
    app.add_exception_handler(RequestValidationError, validation_error_response)
    app.add_exception_handler(StarletteHTTPException, http_error_response)
    app.include_router(agent_router(gateway))
    app.add_middleware(ApiGate, gateway=gateway, agent_port=True)
    return app
