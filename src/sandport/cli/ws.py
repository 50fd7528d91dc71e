"""``sandport ws``: the standalone WebSocket bridge with websockify's command line.

Owns mapping websockify's flags onto :class:`~sandport.bridge.standalone.WsOptions`, and
refusing the ones sandport does not support. Must not touch the bridge itself
(:mod:`sandport.bridge`) nor a gateway: ``ws`` runs on its own. :mod:`sandport.cli`
registers it, with :data:`WS_HELP` as its help.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from sandport.bridge.model import BridgeConfig
from sandport.bridge.server import WsBridge
from sandport.bridge.standalone import UNSUPPORTED, WsOptions, build_config
from sandport.bridge.standalone import serve as serve_ws
from sandport.cli.common import (
    count_option,
    err,
    install_stop_signals,
    run_async,
    seconds_option,
    setup_logging,
    show_error,
)
from sandport.cli.help import HelpCommand
from sandport.errors import SandportError, UsageError

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


#: Where :class:`WsCommand` leaves what followed ``--`` (websockify's wrap mode).
WRAP = "sandport.ws.wrap"


class WsCommand(HelpCommand):
    """``ws`` as Click parses it, noting what follows ``--``: websockify runs that as a
    program (wrap mode), which sandport ws refuses by name, however many words it has."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        """Click's parsing; the words after ``--`` are kept in ``ctx.meta[WRAP]``."""
        if "--" in args:
            ctx.meta[WRAP] = args[args.index("--") + 1:]
        return super().parse_args(ctx, args)


def served(config: BridgeConfig) -> str:
    """What the startup line says the port serves: ``ws`` and ``wss`` (``http`` and
    ``https`` with ``--web``), only the encrypted ones with ``--ssl-only``."""
    web = config.web_dir is not None
    if config.tls is None:
        return "ws and http" if web else "ws"
    if config.tls.ssl_only:
        return ("wss and https" if web else "wss") + " only: unencrypted clients are refused"
    return "ws, wss, http and https" if web else "ws and wss"


def _unsupported(name: str) -> Any:
    return typer.Option(hidden=True, help=name)


def ws_command(
    ctx: typer.Context,
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
    heartbeat: Annotated[float | None, seconds_option(
        "Ping clients every this many seconds; no pong by the next ping closes "
        "(1011).", least=0.1)] = None,
    run_once: Annotated[bool, typer.Option("--run-once",
                                           help="Exit after the first session.")] = False,
    timeout: Annotated[float | None, seconds_option(
        "Exit this many seconds after start.", least=0.1)] = None,
    idle_timeout: Annotated[float | None, seconds_option(
        "Exit after this many seconds without any session.", least=0.1)] = None,
    prefer_ipv6: Annotated[bool, typer.Option(
        "--prefer-ipv6", "-6", help="Listen on :: when no SOURCE_ADDR is given.")] = False,
    origin: Annotated[list[str] | None, typer.Option(
        help="Allowed Origin, such as https://app.example.com (repeatable). Default: any; "
             "clients that send no Origin (not browsers) are not checked.",
        metavar="ORIGIN")] = None,
    trusted_proxy: Annotated[list[str] | None, typer.Option(
        help="Address or network whose X-Forwarded-For and PROXY protocol header name "
             "the real client (repeatable).", metavar="CIDR")] = None,
    max_connections: Annotated[int | None, count_option(
        "Most sessions at once (503 beyond).")] = None,
    max_per_client: Annotated[int | None, count_option(
        "Most sessions at once from one client address (429 beyond).")] = None,
    max_message: Annotated[int, typer.Option(
        help="Largest client message in bytes (close 1009 beyond).", min=1,
        metavar="BYTES")] = 16 * 1024 * 1024,
    connect_timeout: Annotated[float, seconds_option(
        "Seconds to connect to the target (504 beyond).", least=0.1)] = 10.0,
    session_idle_timeout: Annotated[float | None, seconds_option(
        "Close a session silent for this many seconds (1000 'idle').", least=0.1)] = None,
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
        setup_logging("debug" if verbose or traffic else log_level)
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
        wrapped = ctx.meta.get(WRAP)
        if wrapped is not None:
            program = " ".join(wrapped) or "PROGRAM"
            raise UsageError(f"websockify's wrap mode (`-- {program}`): "
                             f"{UNSUPPORTED['wrap_mode']} (e.g. `sandport ws 6080 "
                             "localhost:5901`)")
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
        show_error(exc)
        raise typer.Exit(exc.exit_code) from None

    async def main() -> None:
        stop = asyncio.Event()
        install_stop_signals(asyncio.get_running_loop(), stop.set)

        def ready(bridge: WsBridge) -> None:
            err.print(escape(f"sandport ws on {config.listen_host}:{bridge.bound_port} "
                             f"({served(config)}) -> "
                             f"{config.target or 'targets by token'}"
                             + (f", web {config.web_dir}" if config.web_dir else "")))

        await serve_ws(config, stop, run_once=run_once, timeout=timeout,
                       idle_timeout=idle_timeout, on_ready=ready)

    run_async(main())
