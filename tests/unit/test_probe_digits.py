"""A guest's HTTP answer is wire input: a status of Unicode digits ("HTTP/1.1 ² OK",
'²'.isdigit() but int('²') fails) is a failed probe, not an exception in the monitor."""

from __future__ import annotations

import asyncio

import pytest

from sandport.probe import probe_http

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("status", ["\u00b2", "2\u00b2\u00b2", "\u0662\u0660\u0660"])
def test_a_status_of_unicode_digits_is_a_failed_probe(status: str) -> None:
    async def main() -> bool:
        async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(f"HTTP/1.1 {status} OK\r\nContent-Length: 0\r\n\r\n".encode())
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(answer, "127.0.0.1", 0)
        async with server:
            port = server.sockets[0].getsockname()[1]
            result = await probe_http("127.0.0.1", port, timeout=5)
        return result.ok

    assert asyncio.run(main()) is False
