"""The "sandport proxy" peer of the bench: sandport's userspace TCP relay in its own process.

Started by ``bench/run.py`` with the venv's python, so the relay's CPU time can be read from
``/proc/<pid>/stat`` apart from the bench's own. One process, one uvloop loop, one
:class:`~sandport.forward.tcp.TcpForward` per ``--forward``; the listen ports are ephemeral
and announced on stdout as one JSON line once every listener is bound::

    {"ready": [41327, 39011], "pid": 1234}

SIGTERM or SIGINT stops the forwards (graceful, bounded by their stop grace) and prints the
final counters as one more JSON line, ``{"stats": [...]}``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import signal

import uvloop

from sandport.forward.tcp import TcpForward, TcpForwardSpec


def parse_target(text: str) -> tuple[str, int]:
    """``HOST:PORT`` to a tuple."""
    host, _, port = text.rpartition(":")
    if not host:
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT")
    return host, int(port)


async def serve(listen_host: str, targets: list[tuple[str, int]], lifetime: float) -> None:
    """Start one forward per target, announce the ports, run until a signal or ``lifetime``."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with contextlib.AsyncExitStack() as stack:
        fwds: list[TcpForward] = []
        for host, port in targets:
            spec = TcpForwardSpec(listen_host=listen_host, listen_port=0, target_host=host,
                                  target_port=port, name=f"bench->{host}:{port}")
            fwds.append(await stack.enter_async_context(TcpForward(spec)))
        print(json.dumps({"ready": [f.bound_port for f in fwds], "pid": os.getpid()}),
              flush=True)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(lifetime):
                await stop.wait()
        print(json.dumps({"stats": [dataclasses.asdict(f.stats) for f in fwds]}), flush=True)


def main() -> None:
    """Parse arguments and run the relay under uvloop."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--listen-host", default="127.0.0.1")
    ap.add_argument("--forward", dest="targets", type=parse_target, action="append",
                    required=True, metavar="HOST:PORT",
                    help="target of one forward (repeat for several)")
    ap.add_argument("--lifetime", type=float, default=3600.0,
                    help="exit after this many seconds (default: %(default)s)")
    args = ap.parse_args()
    uvloop.run(serve(args.listen_host, args.targets, args.lifetime))


if __name__ == "__main__":
    main()
