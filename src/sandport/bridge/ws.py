"""Move bytes between an accepted WebSocket and a TCP connection to a guest port.

The caller (the HTTP app) has already authorised the request and connected to the
target; this module only pumps: binary messages from the browser go to the guest as they
are, bytes from the guest go back as binary messages. When either side ends, the other is
closed with a reason, never left to time out into a bare 1006.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

log = logging.getLogger(__name__)

READ_CHUNK = 256 * 1024
SUBPROTOCOLS = ("binary",)  # websockify's default; noVNC asks for it

# Close codes (RFC 6455 7.4.1).
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_UNSUPPORTED = 1003


def choose_subprotocol(offered: list[str]) -> str | None:
    """The subprotocol to accept: ``binary`` if offered, else none."""
    for name in SUBPROTOCOLS:
        if name in offered:
            return name
    return None


@dataclass(slots=True)
class BridgeStats:
    """Byte counts of one bridged session."""

    to_guest: int = 0
    to_client: int = 0


async def pump(
    ws: WebSocket,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    *,
    conn_id: str,
) -> BridgeStats:
    """Relay until one side ends, then close the other with a reason.

    Args:
        ws: an accepted WebSocket.
        reader, writer: the connection to the guest port.
        conn_id: the connection id every log line carries.
    """
    stats = BridgeStats()
    close: tuple[int, str] = (CLOSE_NORMAL, "closed")

    async def guest_to_client() -> None:
        nonlocal close
        while data := await reader.read(READ_CHUNK):
            await ws.send_bytes(data)
            stats.to_client += len(data)
        close = (CLOSE_NORMAL, "the guest service closed the connection")

    async def client_to_guest() -> None:
        nonlocal close
        while True:
            message = await ws.receive()
            if message["type"] == "websocket.disconnect":
                close = (int(message.get("code", CLOSE_NORMAL)), "client closed")
                return
            data = message.get("bytes")
            if data is None:
                close = (CLOSE_UNSUPPORTED, "text messages are not accepted: use binary")
                return
            writer.write(data)
            stats.to_guest += len(data)
            await writer.drain()

    tasks = [
        asyncio.create_task(guest_to_client(), name=f"{conn_id} guest->client"),
        asyncio.create_task(client_to_guest(), name=f"{conn_id} client->guest"),
    ]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            exc = task.exception()
            if isinstance(exc, WebSocketDisconnect):
                close = (exc.code, "client went away")
            elif isinstance(exc, OSError):
                close = (CLOSE_GOING_AWAY, f"guest connection failed: {exc.strerror or exc}")
            elif exc is not None:
                raise exc
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        writer.close()
        with contextlib.suppress(OSError, RuntimeError):
            if ws.application_state == WebSocketState.CONNECTED and (
                ws.client_state == WebSocketState.CONNECTED
            ):
                await ws.close(close[0] if close[0] >= CLOSE_NORMAL else CLOSE_NORMAL, close[1])
    log.info("%s closed: %s (to guest %d B, to client %d B)", conn_id, close[1],
             stats.to_guest, stats.to_client)
    return stats
