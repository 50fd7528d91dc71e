"""The ``sandport`` command. Only this module prints or exits.

Flags map onto :class:`sandport.config.GatewayConfig`; the work is done by
:class:`sandport.control.gateway.Gateway`, which Python callers use directly. The commands
that ask a running gateway (sandbox, token, forward, attach, doctor...) go through
:class:`sandport.client.Client`, the one client of its API: this module reads the state
file, maps the client's errors onto messages and exit codes, and makes no HTTP call of its
own.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import ipaddress
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
import uvloop
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.table import Table
from typer.core import TyperArgument, TyperCommand, TyperGroup, TyperOption
from typer.models import CommandFunctionType

from sandport import __version__
from sandport.bridge.server import WsBridge
from sandport.bridge.standalone import UNSUPPORTED, WsOptions, build_config
from sandport.bridge.standalone import serve as serve_ws
from sandport.bridge.tls import TlsConfig, TlsContexts
from sandport.client import ApiError, Client
from sandport.config import (
    DEFAULT_AGENT_PORT,
    DEFAULT_BRIDGE,
    DEFAULT_STATE_DIR,
    DEFAULT_SUBNET,
    GatewayConfig,
    NetConfig,
    parse_hostport,
)
from sandport.control.forwards import ForwardOptions
from sandport.control.gateway import GATEWAY_FILE, Gateway, SandboxInfo
from sandport.doctor import Report, Row, Walk
from sandport.errors import SandportError, UsageError
from sandport.forward.spec import PortMapping, check_overlaps, parse_port_spec

if TYPE_CHECKING:  # the class TyperCommand and TyperGroup share (typer vendors click)
    from typer._click.core import Command as _ClickCommand
else:
    _ClickCommand = object

log = logging.getLogger("sandport")


# Help that fits a terminal. Typer (0.29) renders help with rich, which wraps each
# paragraph to the terminal's width but keeps the newlines of a docstring's later
# paragraphs, so a docstring wrapped at 100 columns in the source showed sentences broken
# in the middle; and it gave every parameter a type column (`<bool>`, `<int range>
# [0<=x<=65535]`, `<str>`) that left the help text a third of 80 columns. So every
# command and group is made by the classes below: a paragraph becomes one line (rich
# wraps it), indented lines (examples) stay as they are; its parameters become
# _HelpOption and _HelpArgument, which change only what the help shows: an option its
# metavar (every option that takes a value names one) and nothing for a flag, an argument
# its name. Flags have no --no-X form (it cost two more columns). Typer dedents a help's
# later paragraphs as one block, so examples keep their indent only after a paragraph of
# prose (not "Examples:" alone). tests/unit/test_cli_help.py renders every help at 80
# and 120 columns.


def _one_line_paragraphs(text: str | None) -> str | None:
    """``text`` with each paragraph on one line, except blocks of indented lines."""
    if not text:
        return text
    paragraphs = inspect.cleandoc(text).split("\n\n")
    return "\n\n".join(p if all(line.startswith(" ") for line in p.splitlines())
                       else " ".join(line.strip() for line in p.splitlines())
                       for p in paragraphs)


class _HelpOption(TyperOption):
    """An option whose help shows its metavar; a flag's nothing; no range (its help
    says what fits, and a bad value is refused with the range)."""

    def display_type_rich(self, ctx: Any) -> str | None:
        return None if self.is_flag else self.metavar

    def _get_number_range_help_str(self) -> str | None:
        return None


class _HelpArgument(TyperArgument):
    """An argument whose help shows its name (its metavar) and no type."""

    def display_type_rich(self, ctx: Any) -> str | None:
        return None


class _FitsTerminal(_ClickCommand):
    """What a command and a group share: their help fits a terminal (see above)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.help = _one_line_paragraphs(self.help)
        for param in self.params:
            if isinstance(param, TyperOption):
                param.__class__ = _HelpOption
            elif isinstance(param, TyperArgument):
                param.__class__ = _HelpArgument

    def get_help_option(self, ctx: Any) -> Any:
        option = super().get_help_option(ctx)  # made on first use
        if isinstance(option, TyperOption):
            option.__class__ = _HelpOption
        return option


class _HelpCommand(_FitsTerminal, TyperCommand):
    """A command whose help fits a terminal."""


class _HelpGroup(_FitsTerminal, TyperGroup):
    """A group whose help fits a terminal."""


class _Typer(typer.Typer):
    """A typer app whose commands and groups fit their help to a terminal."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(cls=_HelpGroup, no_args_is_help=True, **kwargs)

    def command(self, *args: Any,
                **kwargs: Any) -> Callable[[CommandFunctionType], CommandFunctionType]:
        return super().command(*args, cls=_HelpCommand, **kwargs)


app = _Typer(
    name="sandport",
    help="Reach every port of every sandbox: host port forwards, a browser desktop (noVNC) "
    "and a WebSocket bridge, with readiness proven through the path you use.",
    add_completion=False,
    pretty_exceptions_enable=False,
    # Click wraps the usage line at 78 columns unless told the terminal may be wider.
    context_settings={"max_content_width": 240},
)
err = Console(stderr=True, highlight=False, soft_wrap=True)
out = Console(highlight=False, soft_wrap=True)

READY_PREFIX = "SANDPORT-READY"
#: The help of -p/--publish: SPEC_SYNTAX in words short enough for a help column.
PUBLISH_HELP = escape("SPEC is [HOSTIP:]HOSTPORT:GUESTPORT, and /udp or /tcp+udp after it for "
                      "other protocols than tcp; e.g. 15901:5901, 127.0.0.1:8080:80, "
                      "15900-15909:5900-5909, 5353:53/udp. Repeatable.")
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


def _parse_attach_subnet(text: str) -> ipaddress.IPv4Network:
    try:
        return ipaddress.IPv4Network(text, strict=False)
    except ValueError:
        raise UsageError(f"--attach-subnet {text!r} is not an IPv4 network (e.g. "
                         "10.0.0.0/24)") from None


def _parse_subnet(text: str) -> ipaddress.IPv4Network:
    try:
        return ipaddress.IPv4Network(text, strict=True)
    except ValueError as exc:
        raise UsageError(f"--subnet {text!r} is not an IPv4 network like 10.201.0.0/24: {exc}")\
            from None


def _networks(texts: list[str]) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    out = []
    for text in texts:
        try:
            out.append(ipaddress.ip_network(text, strict=False))
        except ValueError:
            raise UsageError(f"--trusted-proxy {text!r} is not an address or network "
                             "(e.g. 10.0.0.0/8)") from None
    return tuple(out)


def _tls_config(cert: Path | None, key: Path | None, ssl_only: bool) -> TlsConfig | None:
    if cert is None:
        if key is not None or ssl_only:
            raise UsageError("--key and --ssl-only need --cert")
        return None
    for what, path in (("--cert", cert), ("--key", key)):
        if path is not None and not path.is_file():
            raise UsageError(f"{what} {path}: no such file")
    config = TlsConfig(cert=cert.absolute(), key=key.absolute() if key else None,
                       ssl_only=ssl_only)
    TlsContexts(config)  # loads now: a bad certificate is an error before anything starts
    return config


def _error(exc: BaseException) -> None:
    """One error line on stderr; the message is text, never rich markup."""
    err.print(f"[bold red]error:[/] {escape(str(exc))}")


def _print_sandbox(info: SandboxInfo) -> None:
    err.print(
        f"\n[bold green]Desktop sandbox {info.id} is ready[/] in {info.ready_seconds:.1f} s "
        f"(ip {info.ip}, background {info.colour})\n"
        f"  Browser:  [bold]{info.desktop_url}[/]\n"
        f"  VNC:      [bold]vncviewer {info.vnc_host}::{info.vnc_port}[/]"
        f"   password [bold]{info.vnc_password}[/]\n"
    )
    for f in info.forwards:
        err.print(escape(f"  Forward:  {f['protocol']} {f['host']} -> {f['guest']}  ")
                  + f"[bold]{f['mode']}[/] " + escape(f"({f['why']})"))
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


async def _serve(config: GatewayConfig, *, demo: bool, vnc_port: int,
                 publish: list[PortMapping], options: ForwardOptions) -> None:
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
                      f"state {escape(str(config.state_dir))})")
            if demo:
                info = await gateway.create_sandbox(vnc_port=vnc_port, publish=publish,
                                                    options=options, progress=progress)
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
        _error(exc)
        raise typer.Exit(exc.exit_code) from None
    except Exception as exc:  # never a traceback to a user
        log.debug("internal error", exc_info=True)
        err.print(f"[bold red]internal error:[/] {type(exc).__name__}: {escape(str(exc))}\n"
                  "  run again with --log-level debug for the traceback, and report it")
        raise typer.Exit(1) from None


@app.command()
def up(
    demo: Annotated[bool, typer.Option(
        "--demo", help="Also create one desktop sandbox and print how to open it.")] = False,
    listen: Annotated[str, typer.Option(
        help="Address and port of the HTTP port (noVNC, WebSocket bridge, API).",
        metavar="HOST:PORT")] = "127.0.0.1:8700",
    state_dir: Annotated[Path, typer.Option(
        help="Store, per-sandbox files and logs; locked while the gateway runs.",
        metavar="DIR")] = DEFAULT_STATE_DIR,
    bridge: Annotated[str, typer.Option(
        help="Bridge for sandbox links (its name starts with sp-).", metavar="NAME")]
        = DEFAULT_BRIDGE,
    subnet: Annotated[str, typer.Option(
        help="Sandbox address pool; the first address is the bridge's.", metavar="CIDR")]
        = str(DEFAULT_SUBNET),
    vnc_port: Annotated[int, typer.Option(
        help="Host port of the demo sandbox's VNC forward (0: any free port).",
        min=0, max=65535, metavar="PORT")] = DEMO_VNC_PORT,
    publish: Annotated[list[str] | None, typer.Option(
        "--publish", "-p", metavar="SPEC",
        help=f"Forward more ports of the demo sandbox. {PUBLISH_HELP}")] = None,
    forward_mode: Annotated[str, typer.Option(
        help="auto (kernel DNAT where it can serve, else the relay, and says why), kernel "
        "(nftables DNAT) or proxy (userspace relay on splice).", metavar="MODE")] = "auto",
    proxy_protocol: Annotated[int | None, typer.Option(
        help="Send a PROXY protocol header, version 1 or 2, to the guest on -p forwards, so "
        "it sees the real client address (userspace relay).", min=1, max=2,
        metavar="1|2")] = None,
    max_connections: Annotated[int | None, typer.Option(
        help="Most connections at once per -p TCP forward (userspace relay).", min=1,
        metavar="N")] = None,
    idle_timeout: Annotated[float | None, typer.Option(
        help="Close -p TCP connections silent for this many seconds (userspace relay).",
        min=0.001, metavar="SECONDS")] = None,
    forward_host: Annotated[str, typer.Option(
        help="Address host port forwards bind to when a -p spec names none.",
        metavar="ADDR")] = "127.0.0.1",
    ready_timeout: Annotated[float, typer.Option(
        help="Seconds a sandbox may take to answer VNC through every path.", min=1,
        metavar="SECONDS")] = 60.0,
    cert: Annotated[Path | None, typer.Option(
        help="PEM certificate chain (and key, unless --key) for https:// and wss:// on the "
             "HTTP port; http and ws stay served on the same port. Re-read when it "
             "changes.", metavar="FILE")] = None,
    key: Annotated[Path | None, typer.Option(help="PEM key of --cert.", metavar="FILE")]
        = None,
    ssl_only: Annotated[bool, typer.Option(
        "--ssl-only", help="With --cert: refuse plain http and ws clients.")] = False,
    origin: Annotated[list[str] | None, typer.Option(
        help="Origin allowed to open desktop WebSockets, such as https://app.example.com "
             "(repeatable); default: any.", metavar="ORIGIN")] = None,
    trusted_proxy: Annotated[list[str] | None, typer.Option(
        help="Address or network of a reverse proxy in front of the gateway whose "
             "X-Forwarded-For or PROXY protocol header names the client (repeatable).",
        metavar="CIDR")] = None,
    ws_max_sessions: Annotated[int | None, typer.Option(
        help="Most desktop WebSocket sessions at once (503 beyond).", min=1,
        metavar="N")] = None,
    ws_max_per_client: Annotated[int | None, typer.Option(
        help="Most desktop WebSocket sessions from one client address (429 beyond).",
        min=1, metavar="N")] = None,
    probe_interval: Annotated[float, typer.Option(
        help="Seconds between readiness probes of ready sandboxes (degraded on a failure).",
        min=0.1, metavar="SECONDS")] = 5.0,
    attach_subnet: Annotated[list[str] | None, typer.Option(
        help="A network in which `sandport attach` may front VMs or containers of other "
             "managers (repeatable); none by default: attaching is off.",
        metavar="CIDR")] = None,
    attach_grace: Annotated[float, typer.Option(
        help="Seconds an attached target may not answer before it is failed.",
        min=0.1, metavar="SECONDS")] = 60.0,
    agent_port: Annotated[int, typer.Option(
        help="Port on the bridge address where guest agents reach the gateway.",
        min=1, max=65535, metavar="PORT")] = DEFAULT_AGENT_PORT,
    secret_key_file: Annotated[Path | None, typer.Option(
        help="Key that encrypts credentials and sandbox secrets at rest (64 hex digits, "
             "e.g. from `openssl rand -hex 32`); default: secret.key in the state dir, "
             "created at the first start.", metavar="FILE")] = None,
    log_level: Annotated[str, typer.Option(
        help="debug, info, warning or error.", metavar="LEVEL")] = "info",
) -> None:
    """Run the gateway in the foreground until Ctrl-C or SIGTERM.

    With --demo it creates one desktop sandbox (Xvnc + openbox in a network namespace),
    waits until VNC answers through the host port *and* through the WebSocket bridge, then
    prints the browser URL, the vncviewer command with the password, and for programs one
    line `SANDPORT-READY {json}` on stdout.

    Examples:

      sudo sandport up --demo

      sudo sandport up --listen 0.0.0.0:8700 --subnet 10.201.5.0/24 \\
          --bridge sp-br5

      sudo sandport up --demo -p 18080:8080 -p 15353:53/udp --forward-mode proxy
    """
    try:
        _setup_logging(log_level)
        host, port = parse_hostport(listen)
        mappings = [m for spec in publish or []
                    for m in parse_port_spec(spec, default_host_ip=forward_host)]
        if mappings and not demo:
            raise UsageError("-p forwards ports of a sandbox: add --demo to create one",
                             hint="sandboxes created through the API take their own specs")
        check_overlaps(mappings, {})
        options = ForwardOptions(mode=forward_mode, proxy_protocol=proxy_protocol,
                                 max_connections=max_connections, idle_timeout=idle_timeout)
        config = GatewayConfig(
            listen_host=host,
            listen_port=port,
            state_dir=state_dir.absolute(),
            net=NetConfig(bridge=bridge, subnet=_parse_subnet(subnet)),
            forward_host=forward_host,
            ready_timeout=ready_timeout,
            forward_mode=forward_mode,
            tls=_tls_config(cert, key, ssl_only),
            origins=tuple(origin or ()),
            trusted_proxies=_networks(trusted_proxy or []),
            ws_max_sessions=ws_max_sessions,
            ws_max_per_client=ws_max_per_client,
            probe_interval=probe_interval,
            agent_port=agent_port,
            secret_key_file=secret_key_file.absolute() if secret_key_file else None,
            attach_subnets=tuple(_parse_attach_subnet(t) for t in attach_subnet or ()),
            attach_grace=attach_grace,
        )
    except SandportError as exc:
        _error(exc)
        raise typer.Exit(exc.exit_code) from None
    _run(_serve(config, demo=demo, vnc_port=vnc_port, publish=mappings, options=options))


StateDirOption = Annotated[Path, typer.Option(help="State dir of the gateway to ask.",
                                              metavar="DIR")]

forward_app = _Typer(help="Inspect the host port forwards of a running gateway.")
app.add_typer(forward_app, name="forward")


def _gateway_doc(state_dir: Path) -> dict[str, Any]:
    path = state_dir / GATEWAY_FILE
    try:
        doc: dict[str, Any] = json.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"no gateway runs with state dir {state_dir} ({path} is missing)",
                         hint="start one with `sandport up`, or pass its --state-dir") from None
    except PermissionError:
        raise UsageError(f"cannot read {path}: it is the gateway's admin secret",
                         hint="run as root (the user that runs the gateway)") from None
    except ValueError as exc:
        raise UsageError(f"{path} is not valid JSON: {exc}") from None
    return doc


@contextlib.contextmanager
def _gateway_client(state_dir: Path, timeout: float = 5.0) -> Iterator[Client]:
    """The API client of the gateway running with ``state_dir`` (its admin token from
    the state file), each call bounded by ``timeout`` seconds.

    Raises:
        UsageError: no gateway runs with this state dir, or the API refused a request
            (its message says why).
        SandportError: the gateway does not answer.
    """
    doc = _gateway_doc(state_dir)
    url = str(doc["url"])
    if not url.startswith(("http://", "https://")):
        raise UsageError(f"{state_dir / GATEWAY_FILE} names no http(s):// URL: {url!r}")
    # Our own gateway, found through its root-only state file: its certificate may be
    # self-signed and name another host, so it is not verified.
    try:
        yield Client(url, str(doc["admin_token"]), timeout=timeout, verify_tls=False)
    except ApiError as exc:
        if exc.status:
            raise UsageError(f"the gateway answered {exc.status}: {exc.message}") from None
        raise SandportError(f"gateway pid {doc.get('pid')}: {exc.message}",
                            hint="is it still running? `sandport up` starts one") from None


def _count(value: object) -> str:
    return "-" if value is None else f"{value:,}" if isinstance(value, int) else str(value)


@forward_app.command("list")
def forward_list(
    state_dir: StateDirOption = DEFAULT_STATE_DIR,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
        = False,
) -> None:
    """Show every host port forward: mode and why, state, connections, bytes, failures.

    Kernel forwards count the connections their DNAT rule translated; bytes and active
    connections are known only for the userspace relay ("-").
    """
    try:
        with _gateway_client(state_dir.absolute()) as gateway:
            forwards = gateway.forwards()
    except SandportError as exc:
        _error(exc)
        raise typer.Exit(exc.exit_code) from None
    if as_json:
        out.print(json.dumps(forwards, indent=2), markup=False)
        return
    if not forwards:
        err.print("no forwards")
        return
    header = ("ID", "SANDBOX", "NAME", "PROTO", "HOST", "GUEST", "MODE", "STATE", "ACTIVE",
              "TOTAL", "BYTES UP", "BYTES DOWN", "FAILURES", "WHY")
    rows = [header]
    for f in forwards:
        failures = ",".join(f"{k}={v}" for k, v in sorted((f.get("failures") or {}).items())
                            if v) or "-"
        rows.append((f["id"], f["sandbox"], f["name"], f["protocol"], f["host"], f["guest"],
                     f"{f['mode']}/{f['data_path']}", f["state"], _count(f.get("active")),
                     _count(f.get("total")), _count(f.get("bytes_up")),
                     _count(f.get("bytes_down")), failures, f["why"]))
    # Plain aligned columns, never truncated: the output is grepped as often as read.
    widths = [max(len(r[i]) for r in rows) for i in range(len(header) - 1)]
    for r in rows:
        cells = [c.ljust(w) for c, w in zip(r, widths, strict=False)]
        out.print("  ".join([*cells, r[-1]]), markup=False, crop=False, overflow="ignore")


WS_HELP = """WebSocket-to-TCP bridge with websockify's command line: swap the binary name.

  sandport ws \\[OPTIONS] \\[SOURCE_ADDR:]SOURCE_PORT \\[TARGET_ADDR:TARGET_PORT]

Serves WebSocket clients (subprotocol binary, base64 or none) and, with --web, plain
HTTP files on the same port; TLS (wss://, https://) on the same port too, detected from
the first byte, once --cert is given (or ./self.pem exists). Before the upgrade it answers
401/403/429/502/503/504 with a JSON body saying why; after it, every close has a code and
a reason.

Examples:

  sandport ws --web /usr/share/novnc 6080 localhost:5901

  sandport ws --token-plugin TokenFile \\
      --token-source /etc/sandport/tokens 6080

  sandport ws --cert self.pem --ssl-only 127.0.0.1:6443 \\
      --unix-target /run/app.sock

Token files hold lines `token: host:port` (or `token: unix_socket:/path`), one file or a
directory of files; edits take effect for the next connection.
"""


def _unsupported(name: str) -> Any:
    return typer.Option(hidden=True, help=name)


@app.command("ws", help=WS_HELP)
def ws_command(
    args: Annotated[list[str], typer.Argument(
        metavar="SOURCE [TARGET]",
        help="Where to listen, [SOURCE_ADDR:]SOURCE_PORT, and the fixed target, "
             "TARGET_ADDR:TARGET_PORT (unless a token plugin or --unix-target gives it).",
        show_default=False)],
    web: Annotated[str | None, typer.Option(
        help="Serve files from DIR on the same port (e.g. /usr/share/novnc).",
        metavar="DIR")] = None,
    token_plugin: Annotated[str | None, typer.Option(
        help="TokenFile (alias ReadOnlyTokenFile) or UnixDomainSocketDirectory.",
        metavar="CLASS")] = None,
    token_source: Annotated[str | None, typer.Option(
        help="The token file or directory of the token plugin.", metavar="PATH")] = None,
    target_config: Annotated[str | None, typer.Option(
        help="Deprecated websockify spelling of --token-plugin TokenFile --token-source.",
        metavar="FILE")] = None,
    host_token: Annotated[bool, typer.Option(
        "--host-token", help="Take the token from the Host header's name instead of the "
        "URL.")] = False,
    unix_target: Annotated[str | None, typer.Option(
        help="Connect to this Unix socket.", metavar="FILE")] = None,
    cert: Annotated[str | None, typer.Option(
        help="PEM certificate chain (and key, unless --key); re-read when it changes. "
             "Default: ./self.pem if it exists.", metavar="FILE")] = None,
    key: Annotated[str | None, typer.Option(help="PEM key file.", metavar="FILE")] = None,
    key_password: Annotated[str | None, typer.Option(help="Password of the key.",
                                                     metavar="PASSWORD")] = None,
    ssl_only: Annotated[bool, typer.Option("--ssl-only",
                                           help="Refuse unencrypted clients.")] = False,
    ssl_target: Annotated[bool, typer.Option(
        "--ssl-target", help="Connect to the target with TLS.")] = False,
    verify_client: Annotated[bool, typer.Option(
        "--verify-client", help="Require a client certificate (see --cafile).")] = False,
    cafile: Annotated[str | None, typer.Option(
        help="CAs trusted for client certificates.", metavar="FILE")] = None,
    ssl_version: Annotated[str, typer.Option(
        help="Minimum TLS version: default (1.2), tlsv1_1, tlsv1_2, tlsv1_3.",
        metavar="VERSION")] = "default",
    ssl_ciphers: Annotated[str | None, typer.Option(
        help="OpenSSL cipher list.", metavar="CIPHERS")] = None,
    heartbeat: Annotated[float | None, typer.Option(
        help="Ping clients every this many seconds; no pong by the next ping closes "
             "(1011).", metavar="SECONDS", min=0.1)] = None,
    run_once: Annotated[bool, typer.Option("--run-once",
                                           help="Exit after the first session.")] = False,
    timeout: Annotated[float | None, typer.Option(
        help="Exit this many seconds after start.", metavar="SECONDS", min=0.1)] = None,
    idle_timeout: Annotated[float | None, typer.Option(
        help="Exit after this many seconds without any session.", metavar="SECONDS",
        min=0.1)] = None,
    prefer_ipv6: Annotated[bool, typer.Option(
        "--prefer-ipv6", "-6", help="Listen on :: when no SOURCE_ADDR is given.")] = False,
    origin: Annotated[list[str] | None, typer.Option(
        help="Allowed Origin, such as https://app.example.com (repeatable). Default: any; "
             "clients that send no Origin (not browsers) are not checked.",
        metavar="ORIGIN")] = None,
    trusted_proxy: Annotated[list[str] | None, typer.Option(
        help="Address or network whose X-Forwarded-For and PROXY protocol header name "
             "the real client (repeatable).", metavar="CIDR")] = None,
    max_connections: Annotated[int | None, typer.Option(
        help="Most sessions at once (503 beyond).", min=1, metavar="N")] = None,
    max_per_client: Annotated[int | None, typer.Option(
        help="Most sessions at once from one client address (429 beyond).", min=1,
        metavar="N")] = None,
    max_message: Annotated[int, typer.Option(
        help="Largest client message in bytes (close 1009 beyond).", min=1,
        metavar="BYTES")] = 16 * 1024 * 1024,
    connect_timeout: Annotated[float, typer.Option(
        help="Seconds to connect to the target (504 beyond).", min=0.1,
        metavar="SECONDS")] = 10.0,
    session_idle_timeout: Annotated[float | None, typer.Option(
        help="Close a session silent for this many seconds (1000 'idle').", min=0.1,
        metavar="SECONDS")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
    traffic: Annotated[bool, typer.Option("--traffic",
                                          help="Accepted for websockify; same as -v.")]
        = False,
    log_file: Annotated[Path | None, typer.Option(help="Also log to FILE.",
                                                  metavar="FILE")] = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error.",
                                           metavar="LEVEL")] = "info",
    daemon: Annotated[bool, typer.Option("--daemon", "-D", hidden=True)] = False,
    record: Annotated[str | None, _unsupported("record")] = None,
    inetd: Annotated[bool, _unsupported("inetd")] = False,
    wrap_mode: Annotated[str | None, _unsupported("wrap-mode")] = None,
    libserver: Annotated[bool, _unsupported("libserver")] = False,
    auth_plugin: Annotated[str | None, _unsupported("auth-plugin")] = None,
    auth_source: Annotated[str | None, _unsupported("auth-source")] = None,
    web_auth: Annotated[bool, _unsupported("web-auth")] = False,
    syslog: Annotated[str | None, _unsupported("syslog")] = None,
    legacy_syslog: Annotated[bool, _unsupported("legacy-syslog")] = False,
) -> None:
    try:
        _setup_logging("debug" if verbose or traffic else log_level)
        if log_file is not None:
            handler = logging.FileHandler(log_file)
            handler.setFormatter(logging.Formatter(
                "%(asctime)s %(levelname)s %(name)s: %(message)s"))
            logging.getLogger().addHandler(handler)
        given = {"daemon": daemon, "record": record, "inetd": inetd, "wrap_mode": wrap_mode,
                 "libserver": libserver, "auth_plugin": auth_plugin or auth_source,
                 "web_auth": web_auth, "syslog": syslog or legacy_syslog}
        for name, value in given.items():
            if value:
                raise UsageError(f"--{name.replace('_', '-')}: {UNSUPPORTED[name]}")
        if not args:
            raise UsageError("give [SOURCE_ADDR:]SOURCE_PORT (e.g. 6080)")
        config = build_config(WsOptions(
            source=args[0], target=args[1] if len(args) > 1 else None, extra=tuple(args[2:]),
            cert=cert, key=key, key_password=key_password, ssl_only=ssl_only,
            ssl_target=ssl_target, verify_client=verify_client, cafile=cafile,
            ssl_version=ssl_version, ssl_ciphers=ssl_ciphers, unix_target=unix_target,
            web=web, target_config=target_config, token_plugin=token_plugin,
            token_source=token_source, host_token=host_token, heartbeat=heartbeat,
            prefer_ipv6=prefer_ipv6, origins=tuple(origin or ()),
            trusted_proxies=tuple(trusted_proxy or ()), max_connections=max_connections,
            max_per_client=max_per_client, max_message=max_message,
            connect_timeout=connect_timeout, session_idle_timeout=session_idle_timeout))
    except SandportError as exc:
        _error(exc)
        raise typer.Exit(exc.exit_code) from None

    async def main() -> None:
        stop = asyncio.Event()
        install_stop_signals(asyncio.get_running_loop(), stop.set)

        def ready(bridge: WsBridge) -> None:
            scheme = "ws and wss" if config.tls else "ws"
            err.print(escape(f"sandport ws on {config.listen_host}:{bridge.bound_port} "
                             f"({scheme}) -> "
                             f"{config.target or 'targets by token'}"
                             + (f", web {config.web_dir}" if config.web_dir else "")))

        await serve_ws(config, stop, run_once=run_once, timeout=timeout,
                       idle_timeout=idle_timeout, on_ready=ready)

    _run(main())


sandbox_app = _Typer(help="Create, list and remove sandboxes of a running gateway "
                          "(through its API, with the admin token from its state dir).")
app.add_typer(sandbox_app, name="sandbox")

def _cli_call(fn: Callable[[], None]) -> None:
    try:
        fn()
    except SandportError as exc:
        _error(exc)
        raise typer.Exit(exc.exit_code) from None


@sandbox_app.command("create")
def sandbox_create(
    publish: Annotated[list[str] | None, typer.Option(
        "--publish", "-p", help=f"Forward a port. {PUBLISH_HELP}", metavar="SPEC")] = None,
    profile: Annotated[str, typer.Option(
        help="desktop (Xvnc + openbox) or echo (TCP/UDP echo on 7, HTTP on 80; qemu).",
        metavar="PROFILE")] = "desktop",
    backend: Annotated[str, typer.Option(
        help="netns (a network namespace) or qemu (a microVM; its image is built once, "
             "see `sandport image build`).", metavar="BACKEND")] = "netns",
    state_dir: StateDirOption = DEFAULT_STATE_DIR,
) -> None:
    """Create a sandbox and print it as JSON once it is proven ready.

    The JSON goes to stdout, a line with its desktop link to stderr.

    Examples:

      sandport sandbox create -p 18080:8080

      sandport sandbox create --backend qemu --profile echo \\
          -p 10007:7 -p 10007:7/udp
    """

    def run() -> None:
        with _gateway_client(state_dir, timeout=600.0) as gateway:
            sb = gateway.create_sandbox(publish=publish or [], profile=profile,
                                        backend=backend).doc
        err.print(escape(f"sandbox {sb['id']} ready in {sb['ready_seconds']} s: "
                         f"{sb['desktop_url']}"))
        out.print(json.dumps(sb, indent=2), markup=False)

    _cli_call(run)


@sandbox_app.command("list")
def sandbox_list(
    state_dir: StateDirOption = DEFAULT_STATE_DIR,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Every sandbox: id, state, ip, VNC port and desktop URL."""

    def run() -> None:
        with _gateway_client(state_dir) as gateway:
            sandboxes = [sb.doc for sb in gateway.sandboxes()]
        if as_json:
            out.print(json.dumps(sandboxes, indent=2), markup=False)
            return
        if not sandboxes:
            err.print("no sandboxes")
            return
        for sb in sandboxes:
            line = (f"{sb['id']}  {sb['state']:<9} {sb['ip']:<15} vnc {sb['vnc']['host']}:"
                    f"{sb['vnc']['port']}  {sb['desktop_url']}")
            if sb["reason"]:
                line += f"  ({sb['reason']})"
            out.print(line, markup=False, crop=False, overflow="ignore")

    _cli_call(run)


@sandbox_app.command("logs")
def sandbox_logs(
    sandbox_id: Annotated[str, typer.Argument(help="Sandbox id.", metavar="ID")],
    name: Annotated[str, typer.Option(
        help="Which log: serial (a VM's console, the default there), qemu, Xvnc, openbox, "
             "agent...; an unknown name lists them.", metavar="NAME")] = "",
    follow: Annotated[bool, typer.Option("--follow", "-f",
                                         help="Keep printing what is added.")] = False,
    state_dir: StateDirOption = DEFAULT_STATE_DIR,
) -> None:
    """Print a sandbox's guest log: a VM's boot and console, a guest program's output."""

    def run() -> None:
        with _gateway_client(state_dir, timeout=10.0) as gateway:
            sb = gateway.sandbox(sandbox_id, fetch=False)
            for chunk in sb.follow_logs(name) if follow else [sb.logs(name)]:
                sys.stdout.write(chunk.text)
                sys.stdout.flush()

    try:
        _cli_call(run)
    except KeyboardInterrupt:
        raise typer.Exit(0) from None


@app.command()
def attach(
    name: Annotated[str, typer.Argument(help="Your name for the target (shown in lists).",
                                        metavar="NAME")],
    ip: Annotated[str, typer.Option(help="The target's IPv4 address.", metavar="ADDR")],
    publish: Annotated[list[str] | None, typer.Option(
        "--publish", "-p", help=f"Forward a port. {PUBLISH_HELP}", metavar="SPEC")] = None,
    profile: Annotated[str, typer.Option(
        help="desktop (VNC on 5901), http (80 or --port) or tcp (--port): what readiness "
             "speaks to it.", metavar="PROFILE")] = "desktop",
    port: Annotated[int, typer.Option(help="Primary port of an http or tcp target.",
                                      min=0, max=65535, metavar="PORT")] = 0,
    vnc_password_file: Annotated[Path | None, typer.Option(
        help="File holding the desktop's VNC password (plain text, first line).",
        metavar="FILE")] = None,
    interface: Annotated[str, typer.Option(
        help="Host interface the target is reached through (checked against the route).",
        metavar="IFACE")] = "",
    netns: Annotated[str, typer.Option(
        help="The network namespace the target lives in (a container's), by `ip netns` "
             "name or the PID of a process in it; --ip is then an address in there, its "
             "127.0.0.1 too.", metavar="NAME|PID")] = "",
    forward_mode: Annotated[str, typer.Option(
        help="proxy (the userspace relay) or kernel (nft DNAT; not with --netns).",
        metavar="MODE")] = "proxy",
    state_dir: StateDirOption = DEFAULT_STATE_DIR,
) -> None:
    """Front a VM or container that sandport did not create.

    It gets forwards, the WebSocket bridge and noVNC, readiness and the doctor, as
    sandport's own sandboxes do; nothing is created in the guest. The gateway must allow
    the target's network (`sandport up --attach-subnet`).

    Examples:

      sandport attach fc-42 --ip 172.16.0.2 --vnc-password-file pw.txt

      sandport attach api-7 --ip 10.1.0.7 --profile http --port 8080 \\
          -p 18080:8080

      sandport attach web --netns "$(docker inspect -f '{{.State.Pid}}' web)" \\
          --ip 127.0.0.1 --profile http --port 8000 -p 18000:8000
    """

    def run() -> None:
        password = None
        if vnc_password_file is not None:
            try:
                password = vnc_password_file.read_text().splitlines()[0].strip()
            except (OSError, IndexError) as exc:
                raise UsageError(f"cannot read the VNC password from {vnc_password_file}: "
                                 f"{exc}") from None
        with _gateway_client(state_dir, timeout=600.0) as gateway:
            sb = gateway.attach(ip, name=name, publish=publish or [], profile=profile,
                                port=port, vnc_password=password, interface=interface,
                                netns=netns, forward_mode=forward_mode).doc
        err.print(escape(f"attached {ip} as sandbox {sb['id']} ({sb['state']}): "
                         f"{sb['desktop_url']}"))
        out.print(json.dumps(sb, indent=2), markup=False)

    _cli_call(run)


@app.command()
def detach(
    ids: Annotated[list[str], typer.Argument(help="Ids of attached targets.", metavar="ID")],
    state_dir: StateDirOption = DEFAULT_STATE_DIR,
) -> None:
    """Stop fronting attached targets; the targets themselves are left as they are.

    Their forwards and bridge sessions close, with a reason.
    """

    _remove(state_dir, ids, "detached")


@app.command()
def retarget(
    sandbox_id: Annotated[str, typer.Argument(help="Id of an attached target.", metavar="ID")],
    ip: Annotated[str | None, typer.Option(help="Its new address.", metavar="ADDR")] = None,
    gone: Annotated[bool, typer.Option(
        "--gone", help="It is gone (its VM or container stopped).")] = False,
    reason: Annotated[str, typer.Option(help="Words for logs and close reasons.",
                                        metavar="WORDS")] = "",
    state_dir: StateDirOption = DEFAULT_STATE_DIR,
) -> None:
    """Tell the gateway an attached target moved (--ip) or is gone (--gone).

    Live connections close with the reason; links and tokens stay valid, and new
    connections go to the new address.
    """

    def run() -> None:
        if gone == (ip is not None):
            raise UsageError("say where the target moved (--ip ADDR) or that it is gone "
                             "(--gone), one of them")
        with _gateway_client(state_dir, timeout=120.0) as gateway:
            target = gateway.sandbox(sandbox_id, fetch=False)
            sb = (target.gone(reason) if ip is None else target.moved(ip, reason)).doc
        err.print(escape(f"sandbox {sb['id']}: {sb['state']} at {sb['ip']}"))

    _cli_call(run)


@sandbox_app.command("rm")
def sandbox_rm(
    ids: Annotated[list[str], typer.Argument(help="Sandbox ids.", metavar="ID")],
    state_dir: StateDirOption = DEFAULT_STATE_DIR,
) -> None:
    """Stop and remove sandboxes."""

    _remove(state_dir, ids, "removed")


def _remove(state_dir: Path, ids: list[str], done: str) -> None:
    """DELETE each sandbox (or attached target), saying ``done ID`` for each."""

    def run() -> None:
        with _gateway_client(state_dir, timeout=60.0) as gateway:
            for sandbox_id in ids:
                gateway.sandbox(sandbox_id, fetch=False).delete()
                err.print(escape(f"{done} {sandbox_id}"))

    _cli_call(run)


token_app = _Typer(help="Access tokens of a sandbox: desktop links that expire, limited "
                        "to ports and kinds; revoking one closes its live sessions.")
app.add_typer(token_app, name="token")


@token_app.command("create")
def token_create(
    sandbox_id: Annotated[str, typer.Argument(help="Sandbox id.", metavar="SANDBOX")],
    ttl: Annotated[float, typer.Option(help="Seconds it is valid.", min=1,
                                       metavar="SECONDS")] = 3600.0,
    port: Annotated[list[str] | None, typer.Option(
        "--port", help="A guest port (name or number) it opens; repeatable; default all.",
        metavar="PORT")] = None,
    kind: Annotated[list[str] | None, typer.Option(
        "--kind", help="What it opens: ws (the WebSocket bridge), http (the desktop page); "
        "repeatable; default both.", metavar="KIND")] = None,
    state_dir: StateDirOption = DEFAULT_STATE_DIR,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Make an access token and print its desktop link.

    The token is shown only now: `sandport token list` shows ids and expiry, never tokens.

    Example:

      sandport token create 3f9a1c --ttl 600 --port vnc
    """

    def run() -> None:
        for k in kind or []:
            if k not in ("ws", "http"):
                raise UsageError(f"--kind {k!r} is not one of ws, http")
        with _gateway_client(state_dir) as gateway:
            doc = gateway.sandbox(sandbox_id, fetch=False).create_token(
                ttl, ports=port or [], kinds=kind or [])
        if as_json:
            out.print(json.dumps(doc, indent=2), markup=False)
            return
        err.print(escape(f"token {doc['id']} for sandbox {sandbox_id}, valid {ttl:g} s"))
        out.print(doc["desktop_url"], markup=False, crop=False, overflow="ignore")

    _cli_call(run)


@token_app.command("list")
def token_list(
    sandbox_id: Annotated[str, typer.Argument(help="Sandbox id.", metavar="SANDBOX")],
    state_dir: StateDirOption = DEFAULT_STATE_DIR,
) -> None:
    """The access tokens of a sandbox: id, expiry, scope (never the tokens)."""

    def run() -> None:
        with _gateway_client(state_dir) as gateway:
            tokens = gateway.sandbox(sandbox_id, fetch=False).tokens()
        if not tokens:
            err.print("no access tokens")
        for t in tokens:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t["expires_at"]))
            state = "expired" if t["expired"] else f"until {when}"
            out.print(f"{t['id']}  {state}  ports {','.join(t['ports']) or 'all'}  "
                      f"kinds {','.join(t['kinds']) or 'all'}", markup=False)

    _cli_call(run)


@token_app.command("revoke")
def token_revoke(
    sandbox_id: Annotated[str, typer.Argument(help="Sandbox id.", metavar="SANDBOX")],
    token_id: Annotated[str, typer.Argument(help="Token id (from create or list).",
                                            metavar="TOKEN_ID")],
    state_dir: StateDirOption = DEFAULT_STATE_DIR,
) -> None:
    """Revoke an access token: its live sessions close at once (1008, with the reason)."""

    def run() -> None:
        with _gateway_client(state_dir) as gateway:
            gateway.sandbox(sandbox_id, fetch=False).revoke_token(token_id)
        err.print(escape(f"revoked {token_id}"))

    _cli_call(run)


# The `image` commands: guest images of QEMU microVM sandboxes (sandport.sandbox.images).
from rich.progress import (  # noqa: E402 - this command group's own imports
    BarColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)

from sandport.sandbox import images as guest_images  # noqa: E402

DOCTOR_STYLE = {"ok": "green", "fail": "bold red", "warn": "yellow", "skip": "dim"}


def _gateway_rows(state_dir: Path) -> list[Row]:
    """The doctor's checks from outside the gateway: its state file, its process, its API.
    Later rows are skipped once one fails."""
    path = state_dir / GATEWAY_FILE
    walk = Walk()
    try:
        doc = _gateway_doc(state_dir)
    except UsageError as exc:
        walk.add("gateway", "gateway file", False, str(exc.args[0]),
                 exc.hint or "start the gateway with `sandport up`")
        walk.add("gateway", "API", False, "")
        return walk.rows
    pid = int(doc.get("pid", 0))
    alive = pid > 0 and Path(f"/proc/{pid}").exists()
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(
        errors="replace").strip() if alive else ""
    walk.add("gateway", "gateway file", True, f"{path}: pid {pid}, {doc.get('url')}")
    if not alive or ("sandport" not in cmdline and "python" not in cmdline):
        walk.add("gateway", "process", False,
                 f"pid {pid} of {path} is not running" + (f" (it is {cmdline!r})" if alive
                                                          else ""),
                 "the gateway died (see its log); start `sandport up` again with the same "
                 "--state-dir: it adopts the sandboxes that still run")
    t0 = time.monotonic()
    try:
        with _gateway_client(state_dir, timeout=3.0) as gateway:
            gateway.sandboxes()
        walk.add("gateway", "API", True,
                 f"{doc.get('url')} answers ({1000 * (time.monotonic() - t0):.0f} ms)")
    except SandportError as exc:
        walk.add("gateway", "API", False, str(exc),
                 "the gateway process runs but its API does not answer: it hangs or its "
                 "port is blocked; see its log, restart it")
    return walk.rows


@app.command()
def doctor(
    sandbox_id: Annotated[str | None, typer.Argument(
        help="Sandbox id; default: every sandbox.", metavar="SANDBOX")] = None,
    port: Annotated[str | None, typer.Option(
        help="Only this port (name, e.g. vnc, or number).", metavar="NAME|NUMBER")] = None,
    token: Annotated[str | None, typer.Option(
        help="A token someone uses for the sandbox (a link's ?token=...): checked too.",
        metavar="TOKEN")] = None,
    as_json: Annotated[bool, typer.Option(
        "--json", help="Print JSON (docs/doctor.schema.json) instead of a table.")] = False,
    state_dir: StateDirOption = DEFAULT_STATE_DIR,
) -> None:
    """Walk the path to a sandbox hop by hop; name the broken hop, its cause and the fix.

    Hops, in order: gateway (process, API, every forward's listener), route (sandbox, port,
    token), host network (bridge address, the sandbox's link, nft DNAT rules, firewall
    rules dropping the guest), guest reachability (ping, ARP), guest service (each port
    answers its protocol at the guest: RFB with the stored password, HTTP, the agent's
    /health) and end to end (each host forward, the WebSocket bridge). After a failure
    the later hops of that port are skipped. Exit status 0: healthy; 1: a hop fails.

    Examples:

      sandport doctor

      sandport doctor 3f2a1c --port vnc

      sandport doctor 3f2a1c --token "$TOKEN" --json
    """
    state_dir = state_dir.absolute()
    gateway_rows = _gateway_rows(state_dir)
    reports: list[Report] = []
    if all(r.status == "ok" for r in gateway_rows):
        try:
            with _gateway_client(state_dir) as gateway:
                sandboxes = [gateway.sandbox(sandbox_id, fetch=False)] if sandbox_id \
                    else gateway.sandboxes()
                gateway.timeout = 30.0  # a walk with a dead hop takes a few seconds
                reports += [Report.from_json(sb.doctor(port=port, token=token))
                            for sb in sandboxes]
        except SandportError as exc:
            _error(exc)
            raise typer.Exit(exc.exit_code) from None
    healthy = all(r.status != "fail" for r in gateway_rows) and all(r.healthy
                                                                    for r in reports)
    if as_json:
        out.print(json.dumps({
            "version": 1, "healthy": healthy, "gateway": [r.as_json() for r in gateway_rows],
            "reports": [r.as_json() for r in reports]}, indent=2), markup=False)
        raise typer.Exit(0 if healthy else 1)
    _print_doctor(gateway_rows, reports, sandbox_id)
    raise typer.Exit(0 if healthy else 1)


def _print_doctor(gateway_rows: list[Row], reports: list[Report],
                  sandbox_id: str | None) -> None:
    sections: list[tuple[str, list[Row]]] = [("gateway", gateway_rows)]
    sections += [(f"sandbox {r.sandbox}", list(r.rows)) for r in reports]
    for title, rows in sections:
        table = Table(title=title, title_justify="left", expand=False, show_lines=False)
        fixes = any(r.fix for r in rows)
        for column in ("HOP", "CHECK", "RESULT", "EVIDENCE", *(("FIX",) if fixes else ())):
            table.add_column(column, overflow="fold")
        for r in rows:
            style = DOCTOR_STYLE.get(r.status, "")
            cells = [r.hop, escape(r.check + (f" [{r.port}]" if r.port else "")),
                     f"[{style}]{r.status}[/]", escape(r.evidence)]
            table.add_row(*cells, *((escape(r.fix),) if fixes else ()))
        out.print(table)
    failed = next((r for r in gateway_rows if r.status == "fail"), None) or next(
        (rep.failed for rep in reports if rep.failed is not None), None)
    if failed is not None:
        err.print(f"[bold red]broken hop:[/] {escape(failed.hop)} ({escape(failed.check)}): "
                  f"{escape(failed.evidence)}")
        if failed.fix:
            err.print(f"[bold]fix:[/] {escape(failed.fix)}")
    elif not reports and sandbox_id is None:
        err.print("healthy: the gateway answers; it runs no sandboxes")
    else:
        took = sum(r.took for r in reports)
        warns = [r for rep in reports for r in rep.rows if r.status == "warn"]
        err.print(f"[green]healthy[/]: every hop answers ({took:.1f} s)"
                  + (f"; [yellow]{len(warns)} warning(s)[/]: "
                     f"{escape('; '.join(f'{w.check}: {w.fix}' for w in warns))}"
                     if warns else ""))


image_app = _Typer(help="Guest images of QEMU microVM sandboxes: a Debian kernel and a "
                        "busybox initramfs per profile, made from the host's Debian packages.")
app.add_typer(image_app, name="image")

ImageCacheOption = Annotated[Path, typer.Option(help="The image cache directory.",
                                                metavar="DIR")]


def _mib(value: object) -> str:
    return f"{value / 2**20:.1f} MiB" if isinstance(value, int) else "-"


def _build_image(bar: Progress, profile: str, cache_dir: Path,
                 force: bool) -> tuple[guest_images.Image, float, bool]:
    """Build one image under a progress bar: (image, seconds, cached)."""
    task = bar.add_task(profile, total=None)
    steps: list[str] = []

    def report(step: str, fraction: float | None) -> None:
        steps.append(step)
        bar.update(task, description=f"{profile}: {step}",
                   total=None if fraction is None else 1.0, completed=fraction or 0.0)

    t0 = time.monotonic()
    try:
        image = guest_images.build_image(profile, cache_dir, force=force, progress=report)
    finally:
        bar.remove_task(task)
    return image, time.monotonic() - t0, "cached" in steps


@image_app.command("build")
def image_build(
    profile: Annotated[str, typer.Option(help="echo, desktop or all.",
                                         metavar="PROFILE")] = "all",
    cache_dir: ImageCacheOption = guest_images.DEFAULT_IMAGE_CACHE,
    force: Annotated[bool, typer.Option(
        "--force", help="Build even if the image for the current inputs exists.")] = False,
) -> None:
    """Build the image of each profile; at once ("cached") if its inputs are unchanged.

    An image's key hashes its inputs: the kernel apt would fetch now, the versions of the
    Debian packages its files come from, the init script. Prints one line per image:
    profile, key, sizes, seconds, built or cached, directory.
    """

    def run() -> None:
        choices = (*guest_images.IMAGE_PROFILES, "all")
        if profile not in choices:
            raise UsageError(f"--profile {profile!r} is not one of {', '.join(choices)}")
        profiles = guest_images.IMAGE_PROFILES if profile == "all" else (profile,)
        columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                   TimeElapsedColumn())
        for name in profiles:
            # One bar per image, gone before its line is printed (stdout stays clean).
            with Progress(*columns, console=err, transient=True) as bar:
                image, seconds, cached = _build_image(bar, name, cache_dir.absolute(), force)
            sizes = image.manifest.get("sizes", {})
            out.print(f"{image.profile:<8} {image.key[:16]}  initramfs "
                      f"{_mib(sizes.get('initramfs'))}, vmlinux {_mib(sizes.get('vmlinux'))}"
                      f"  {seconds:.1f} s  {'cached' if cached else 'built'}  {image.dir}",
                      markup=False, crop=False, overflow="ignore")

    _cli_call(run)


@image_app.command("list")
def image_list(
    cache_dir: ImageCacheOption = guest_images.DEFAULT_IMAGE_CACHE,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Every image in the cache, current or not: profile, key, kernel, sizes, build time.

    `sandport image build` names the current image of each profile.
    """

    def run() -> None:
        found = guest_images.list_images(cache_dir.absolute())
        if as_json:
            docs = [{"profile": i.profile, "key": i.key, "dir": str(i.dir),
                     "kernel": str(i.kernel), "initrd": str(i.initrd), "manifest": i.manifest}
                    for i in found]
            out.print(json.dumps(docs, indent=2), markup=False)
            return
        if not found:
            err.print(escape(f"no images in {cache_dir}"))
            return
        rows = [("PROFILE", "KEY", "KERNEL", "INITRAMFS", "UNPACKED", "BUILT", "DIR")]
        for i in found:
            sizes = i.manifest.get("sizes", {})
            rows.append((i.profile, i.key[:16], str(i.manifest.get("kernel_version", "-")),
                         _mib(sizes.get("initramfs")), _mib(sizes.get("unpacked")),
                         str(i.manifest.get("built_at", "-")), str(i.dir)))
        widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]) - 1)]
        for r in rows:
            cells = [c.ljust(w) for c, w in zip(r, widths, strict=False)]
            out.print("  ".join([*cells, r[-1]]), markup=False, crop=False, overflow="ignore")

    _cli_call(run)


@app.command()
def version() -> None:
    """Print sandport's version."""
    out.print(__version__)


def main() -> None:
    """Entry point of the ``sandport`` command."""
    app()
