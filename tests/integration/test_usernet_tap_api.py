"""`tap_into_netns` works from a coroutine too (README.md's usernet program calls it there).

pyroute2 0.9's synchronous IPRoute runs an event loop of its own; called on a thread whose
loop already runs, it raised "This event loop is already running".
"""

from __future__ import annotations

import asyncio
import os
import secrets
import subprocess

import pytest

from conftest import require_root
from sandport.usernet import TapTransport, tap_into_netns

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("offload", [True, False])
def test_tap_into_netns_from_a_running_event_loop(offload: bool) -> None:
    require_root()
    netns = f"sp-u{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", netns], check=True)
    try:
        async def main() -> int:
            return tap_into_netns(f"{netns}-t", netns, offload=offload)

        fd = asyncio.run(main())
        try:
            links = subprocess.run(["ip", "-n", netns, "-o", "link", "show", "eth0"],
                                   capture_output=True, text=True, check=False)
            assert links.returncode == 0, links.stderr  # moved in, renamed eth0
            assert TapTransport(fd).vnet is offload
        finally:
            os.close(fd)
    finally:
        subprocess.run(["ip", "netns", "del", netns], check=False)
