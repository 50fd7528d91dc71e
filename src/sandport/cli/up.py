"""``sandport up``: the gateway in the foreground until Ctrl-C or SIGTERM.

Owns mapping ``up``'s flags onto :class:`~sandport.config.GatewayConfig` (and their
parsers), the run from start to a clean stop, and the ``--demo`` sandbox's announcement.
Must not do the gateway's work: :class:`~sandport.control.gateway.Gateway` does.
:mod:`sandport.cli` registers ``up``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import sys
from pathlib import Path
from typing import Annotated
from urllib.parse import urlsplit

import typer
from rich.markup import escape

from sandport import __version__
from sandport.bridge.tls import TlsConfig, TlsContexts
from sandport.cli.common import (
    LOG_FILE,
    PUBLISH_HELP,
    STOP_SIGNALS,
    count_option,
    err,
    install_stop_signals,
    log,
    out,
    run_async,
    seconds_option,
    setup_logging,
    show_error,
)
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
from sandport.control.gateway import Gateway, SandboxInfo
from sandport.errors import SandportError, UsageError
from sandport.forward.spec import ExposedPort, PortMapping, parse_port_spec, place
from sandport.net.upstream import DEFAULT_GUEST_TIMEOUT
from sandport.sandbox.profiles import VNC_PORT

READY_PREFIX = "SANDPORT-READY"
DEMO_VNC_PORT = 15901


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


def _demo_vnc(vnc_port: int | None, mappings: list[PortMapping], labels: list[str],
              forward_host: str) -> int:
    """The host port of the demo desktop's VNC forward: that of a -p for guest port 5901
    (it sets it), else ``--vnc-port``, else :data:`DEMO_VNC_PORT`. Every forward of the
    demo is checked here, before the gateway starts.

    Raises:
        PortSpecError: two of them want one host port (naming both).
        UsageError: ``--vnc-port`` (not 0) and a -p set VNC's host port differently.
    """
    chosen = vnc_port if vnc_port is not None else DEMO_VNC_PORT
    label = f"--vnc-port {vnc_port}" if vnc_port is not None else \
        f"the desktop's VNC (--vnc-port, default {DEMO_VNC_PORT})"
    placement = place(mappings, [ExposedPort(
        name="vnc", guest_port=VNC_PORT, label=label, fixed=bool(vnc_port),
        default=PortMapping(host_ip=forward_host, host_port=chosen, guest_port=VNC_PORT),
    )], labels=labels)
    return placement.exposed[0][1].host_port


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


def _print_links(config: GatewayConfig, link_base: str) -> None:
    """Where the links the gateway hands out point, when that is not the listen address."""
    if config.public_url:
        err.print(f"  Links:    {escape(link_base)} (--public-url)")
    elif config.listen_host in ("0.0.0.0", "::"):
        host = urlsplit(link_base).hostname or ""
        why = ("no default route: links only open on this host" if host in ("127.0.0.1", "::1")
               else "this host's address on its default route")
        err.print(f"  Links:    {escape(link_base)} ({why}); clients that reach this host "
                  "by another name or through a proxy: --public-url URL")


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
            started.set()
            where = gateway.base_url
            if config.listen_host in ("0.0.0.0", "::"):  # every address: say so
                where = f"{config.listen_host} port {gateway.http_port} ({where} from here)"
            err.print(f"sandport {__version__} gateway on [bold]{escape(where)}[/]\n"
                      + escape(f"  Network:  bridge {config.net.bridge}, subnet "
                               f"{config.net.subnet}\n"
                               f"  Log:      {config.state_dir / LOG_FILE} (--log-level "
                               "info shows it here)"))
            _print_links(config, gateway.link_base)
            if demo:
                info = await gateway.create_sandbox(vnc_port=vnc_port, publish=publish,
                                                    options=options, progress=progress)
        if demo:
            _print_sandbox(info)
        err.print("Press Ctrl-C to stop: every sandbox, link and process sandport made is "
                  "removed.")
        await asyncio.Event().wait()

    started = asyncio.Event()  # "stopping" is said only of a gateway that started
    task = asyncio.create_task(main(), name="gateway main")
    stopper = asyncio.create_task(stop.wait(), name="signal wait")
    try:
        await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in (task, stopper):
            t.cancel()
        results = await asyncio.gather(task, stopper, return_exceptions=True)
        if started.is_set():
            err.print("stopping: removing sandboxes, links and processes ...")
        await gateway.stop()
        for sig in STOP_SIGNALS:
            loop.remove_signal_handler(sig)
    for result in results:
        if isinstance(result, BaseException) and not isinstance(result, asyncio.CancelledError):
            raise result
    err.print("stopped; nothing left behind.")


def up(
    demo: Annotated[bool, typer.Option(
        "--demo", help="Also create one desktop sandbox and print how to open it.")] = False,
    listen: Annotated[str, typer.Option(
        help="Address and port of the HTTP port (noVNC, WebSocket bridge, API).",
        metavar="HOST:PORT")] = "127.0.0.1:8700",
    public_url: Annotated[str | None, typer.Option(
        help="Where clients reach the HTTP port, e.g. https://sandport.example.com (a name, "
             "a reverse proxy): every link printed or handed out starts with it. Default: "
             "the --listen address; for 0.0.0.0 this host's address on its default route.",
        metavar="URL")] = None,
    state_dir: Annotated[Path, typer.Option(
        help="Store, per-sandbox files and logs; locked while the gateway runs.",
        metavar="DIR")] = DEFAULT_STATE_DIR,
    bridge: Annotated[str, typer.Option(
        help="Bridge for sandbox links (its name starts with sp-).", metavar="NAME")]
        = DEFAULT_BRIDGE,
    subnet: Annotated[str, typer.Option(
        help="Sandbox address pool; the first address is the bridge's.", metavar="CIDR")]
        = str(DEFAULT_SUBNET),
    vnc_port: Annotated[int | None, typer.Option(
        help=f"Host port of the demo sandbox's VNC forward (0: any free port); default "
             f"{DEMO_VNC_PORT}, or the host port of a -p for guest port {VNC_PORT}.",
        min=0, max=65535, metavar="PORT", show_default=False)] = None,
    publish: Annotated[list[str] | None, typer.Option(
        "--publish", "-p", metavar="SPEC",
        help=f"Forward ports of the demo sandbox; a SPEC for guest port {VNC_PORT} sets the "
             f"VNC forward's host side. {PUBLISH_HELP}")] = None,
    forward_mode: Annotated[str, typer.Option(
        help="auto (kernel DNAT where it can serve, else the relay, and says why), kernel "
        "(nftables DNAT) or proxy (userspace relay on splice).", metavar="MODE")] = "auto",
    proxy_protocol: Annotated[int | None, typer.Option(
        help="Send a PROXY protocol header, version 1 or 2, to the guest on -p forwards, so "
        "it sees the real client address (userspace relay).", min=1, max=2,
        metavar="1|2")] = None,
    max_connections: Annotated[int | None, count_option(
        "Most connections at once per -p TCP forward (userspace relay).")] = None,
    idle_timeout: Annotated[float | None, seconds_option(
        "Close -p TCP connections silent for this many seconds (userspace "
        "relay).", least=0.001)] = None,
    forward_host: Annotated[str, typer.Option(
        help="Address host port forwards bind to when a -p spec names none.",
        metavar="ADDR")] = "127.0.0.1",
    ready_timeout: Annotated[float, seconds_option(
        "Seconds a sandbox may take to answer VNC through every path.", least=1)] = 60.0,
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
             "(repeatable), besides the gateway's own pages; default: any.",
        metavar="ORIGIN")] = None,
    trusted_proxy: Annotated[list[str] | None, typer.Option(
        help="Address or network of a reverse proxy in front of the gateway whose "
             "X-Forwarded-For or PROXY protocol header names the client (repeatable).",
        metavar="CIDR")] = None,
    ws_max_sessions: Annotated[int | None, count_option(
        "Most desktop WebSocket sessions at once (503 beyond).")] = None,
    ws_max_per_client: Annotated[int | None, count_option(
        "Most desktop WebSocket sessions from one client address (429 beyond).")] = None,
    probe_interval: Annotated[float, seconds_option(
        "Seconds between readiness probes of ready sandboxes (degraded on a "
        "failure).", least=0.1)] = 5.0,
    attach_subnet: Annotated[list[str] | None, typer.Option(
        help="A network in which `sandport attach` may front VMs or containers of other "
             "managers (repeatable); none by default: attaching is off.",
        metavar="CIDR")] = None,
    attach_grace: Annotated[float, seconds_option(
        "Seconds an attached target may not answer before it is failed.", least=0.1)] = 60.0,
    guest_timeout: Annotated[float, seconds_option(
        "Seconds data sent to a guest may stay unacknowledged (a guest gone without a word, "
        "or one that reads nothing) before the relay resets that connection and the bridge "
        "closes its session with 1011.", least=1)] = DEFAULT_GUEST_TIMEOUT,
    agent_port: Annotated[int, typer.Option(
        help="Port on the bridge address where guest agents reach the gateway.",
        min=1, max=65535, metavar="PORT")] = DEFAULT_AGENT_PORT,
    secret_key_file: Annotated[Path | None, typer.Option(
        help="Key that encrypts credentials and sandbox secrets at rest (64 hex digits, "
             "e.g. from `openssl rand -hex 32`); default: secret.key in the state dir, "
             "created at the first start.", metavar="FILE")] = None,
    log_level: Annotated[str, typer.Option(
        help="What the terminal shows of the log: debug, info, warning or error. The "
             "log file, gateway.log in the state dir, gets info and above (debug with "
             "debug).", metavar="LEVEL")] = "warning",
) -> None:
    """Run the gateway in the foreground until Ctrl-C or SIGTERM.

    With --demo it creates one desktop sandbox (Xvnc + openbox in a network namespace),
    waits until VNC answers through the host port *and* through the WebSocket bridge, then
    prints the browser URL, the vncviewer command with the password, and for programs one
    line `SANDPORT-READY {json}` on stdout.

    Examples:

      sudo sandport up --demo

      sudo sandport up --listen 0.0.0.0:8700 --subnet 10.201.5.0/24 \\
          --bridge sp-br5 --public-url http://sandport.example.com:8700

      sudo sandport up --demo -p 18080:8080 -p 15353:53/udp --forward-mode proxy
    """
    try:
        host, port = parse_hostport(listen)
        mappings, labels = [], []
        for spec in publish or []:
            for m in parse_port_spec(spec, default_host_ip=forward_host):
                mappings.append(m)
                labels.append(f"-p {spec}")
        if mappings and not demo:
            raise UsageError("-p forwards ports of a sandbox: add --demo to create one",
                             hint="sandboxes created through the API take their own specs")
        vnc = _demo_vnc(vnc_port, mappings, labels, forward_host)
        options = ForwardOptions(mode=forward_mode, proxy_protocol=proxy_protocol,
                                 max_connections=max_connections, idle_timeout=idle_timeout)
        config = GatewayConfig(
            listen_host=host,
            listen_port=port,
            public_url=public_url,
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
            guest_timeout=guest_timeout,
        )
        setup_logging(log_level, config.state_dir / LOG_FILE)
    except SandportError as exc:
        show_error(exc)
        raise typer.Exit(exc.exit_code) from None
    run_async(_serve(config, demo=demo, vnc_port=vnc, publish=mappings, options=options))
