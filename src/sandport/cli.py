"""The ``sandport`` command. Only this module prints or exits.

Flags map onto :class:`sandport.config.GatewayConfig`; the work is done by
:class:`sandport.control.gateway.Gateway`, which Python callers use directly.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Annotated, Any

import typer
import uvloop
from rich.console import Console
from rich.logging import RichHandler

from sandport import __version__
from sandport.config import (
    DEFAULT_BRIDGE,
    DEFAULT_STATE_DIR,
    DEFAULT_SUBNET,
    GatewayConfig,
    NetConfig,
    parse_hostport,
)
from sandport.control.gateway import Gateway, SandboxInfo
from sandport.errors import SandportError, UsageError

log = logging.getLogger("sandport")

app = typer.Typer(
    name="sandport",
    help="Reach every port of every sandbox: host port forwards, a browser desktop (noVNC) "
    "and a WebSocket bridge, with readiness proven through the path you use.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err = Console(stderr=True, highlight=False, soft_wrap=True)
out = Console(highlight=False, soft_wrap=True)

READY_PREFIX = "SANDPORT-READY"
DEMO_VNC_PORT = 15901


def _setup_logging(level: str) -> None:
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise UsageError(f"unknown log level {level!r}: use debug, info, warning or error")
    handler: logging.Handler
    if err.is_terminal:
        handler = RichHandler(console=err, show_path=False, rich_tracebacks=False,
                              log_time_format="%H:%M:%S")
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:  # a log file or a pipe: one plain line per record, never wrapped
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(
            "%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    logging.basicConfig(level=numeric, handlers=[handler], force=True)
    # Third-party chatter only at debug.
    for noisy in ("uvicorn", "uvicorn.error", "websockets", "pyroute2", "asyncio"):
        logging.getLogger(noisy).setLevel(max(numeric, logging.WARNING))


def _parse_subnet(text: str) -> ipaddress.IPv4Network:
    try:
        return ipaddress.IPv4Network(text, strict=True)
    except ValueError as exc:
        raise UsageError(f"--subnet {text!r} is not an IPv4 network like 10.201.0.0/24: {exc}")\
            from None


def _print_sandbox(info: SandboxInfo) -> None:
    err.print(
        f"\n[bold green]Desktop sandbox {info.id} is ready[/] in {info.ready_seconds:.1f} s "
        f"(ip {info.ip}, background {info.colour})\n"
        f"  Browser:  [bold]{info.desktop_url}[/]\n"
        f"  VNC:      [bold]vncviewer {info.vnc_host}::{info.vnc_port}[/]"
        f"   password [bold]{info.vnc_password}[/]\n"
    )
    out.print(f"{READY_PREFIX} {json.dumps(info.as_json(), separators=(',', ':'))}",
              markup=False)
    sys.stdout.flush()


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _forget_signals_in_child() -> None:
    signal.set_wakeup_fd(-1)
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_DFL)


@functools.cache
def _install_fork_hook() -> None:
    """Register :func:`_forget_signals_in_child` once per process."""
    os.register_at_fork(after_in_child=_forget_signals_in_child)


def install_stop_signals(loop: asyncio.AbstractEventLoop, on_stop: Callable[[], None]) -> None:
    """Call ``on_stop`` on SIGINT or SIGTERM, and only for signals sent to this process.

    A child forked without exec (pyroute2 forks one for every namespace operation and
    ends it with SIGTERM) inherits the loop's signal handler *and* its wakeup fd: a
    signal sent to the child would reach this process's loop and stop the gateway.
    So every forked child drops both right after fork.
    """
    _install_fork_hook()

    def on_signal(sig: signal.Signals) -> None:
        log.info("received %s: shutting down", sig.name)
        on_stop()

    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, on_signal, sig)


async def _serve(config: GatewayConfig, *, demo: bool, vnc_port: int) -> None:
    """Run the gateway until SIGINT or SIGTERM; always stop it cleanly."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    install_stop_signals(loop, stop.set)
    gateway = Gateway(config)

    async def main() -> None:
        with err.status("starting gateway", spinner="dots") as status:

            def progress(line: str) -> None:
                status.update(line)
                log.debug("%s", line)

            await gateway.start(progress)
            err.print(f"sandport {__version__} gateway on [bold]{gateway.base_url}[/] "
                      f"(bridge {config.net.bridge}, subnet {config.net.subnet}, "
                      f"state {config.state_dir})")
            if demo:
                info = await gateway.create_sandbox(vnc_port=vnc_port, progress=progress)
        if demo:
            _print_sandbox(info)
        err.print("Press Ctrl-C to stop: every sandbox, link and process sandport made is "
                  "removed.")
        await asyncio.Event().wait()

    task = asyncio.create_task(main(), name="gateway main")
    stopper = asyncio.create_task(stop.wait(), name="signal wait")
    try:
        await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in (task, stopper):
            t.cancel()
        results = await asyncio.gather(task, stopper, return_exceptions=True)
        err.print("stopping: removing sandboxes, links and processes ...")
        await gateway.stop()
        for sig in STOP_SIGNALS:
            loop.remove_signal_handler(sig)
    for result in results:
        if isinstance(result, BaseException) and not isinstance(result, asyncio.CancelledError):
            raise result
    err.print("stopped; nothing left behind.")


def _run(coro: Coroutine[Any, Any, None]) -> None:
    """Run a coroutine under uvloop, mapping errors to messages and exit codes."""
    try:
        uvloop.run(coro)
    except SandportError as exc:
        err.print(f"[bold red]error:[/] {exc}", markup=True)
        raise typer.Exit(exc.exit_code) from None
    except Exception as exc:  # never a traceback to a user
        log.debug("internal error", exc_info=True)
        err.print(f"[bold red]internal error:[/] {type(exc).__name__}: {exc}\n"
                  "  run again with --log-level debug for the traceback, and report it")
        raise typer.Exit(1) from None


@app.command()
def up(
    demo: Annotated[bool, typer.Option(
        "--demo", help="Also create one desktop sandbox and print how to open it.")] = False,
    listen: Annotated[str, typer.Option(
        help="HOST:PORT of the HTTP port (noVNC, WebSocket bridge).")] = "127.0.0.1:8700",
    state_dir: Annotated[Path, typer.Option(
        help="Store, per-sandbox files and logs; locked while the gateway runs.")]
        = DEFAULT_STATE_DIR,
    bridge: Annotated[str, typer.Option(
        help="Bridge for sandbox links (must start with sp-).")] = DEFAULT_BRIDGE,
    subnet: Annotated[str, typer.Option(
        help="Sandbox address pool; the first address is the bridge's.")] = str(DEFAULT_SUBNET),
    vnc_port: Annotated[int, typer.Option(
        help="Host port of the demo sandbox's VNC forward (0: any free port).",
        min=0, max=65535)] = DEMO_VNC_PORT,
    forward_host: Annotated[str, typer.Option(
        help="Address host port forwards bind to.")] = "127.0.0.1",
    ready_timeout: Annotated[float, typer.Option(
        help="Seconds a sandbox may take to answer VNC through every path.", min=1)] = 60.0,
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "info",
) -> None:
    """Run the gateway in the foreground until Ctrl-C or SIGTERM.

    With --demo it creates one desktop sandbox (Xvnc + openbox in a network namespace),
    waits until VNC answers through the host port *and* through the WebSocket bridge, then
    prints the browser URL, the vncviewer command with the password, and for programs one
    line `SANDPORT-READY {json}` on stdout.

    Examples:

      sudo sandport up --demo

      sudo sandport up --listen 0.0.0.0:8700 --subnet 10.201.5.0/24 --bridge sp-br5
    """
    try:
        _setup_logging(log_level)
        host, port = parse_hostport(listen)
        config = GatewayConfig(
            listen_host=host,
            listen_port=port,
            state_dir=state_dir.absolute(),
            net=NetConfig(bridge=bridge, subnet=_parse_subnet(subnet)),
            forward_host=forward_host,
            ready_timeout=ready_timeout,
        )
    except SandportError as exc:
        err.print(f"[bold red]error:[/] {exc}")
        raise typer.Exit(exc.exit_code) from None
    _run(_serve(config, demo=demo, vnc_port=vnc_port))


@app.command()
def version() -> None:
    """Print sandport's version."""
    out.print(__version__)


def main() -> None:
    """Entry point of the ``sandport`` command."""
    app()
