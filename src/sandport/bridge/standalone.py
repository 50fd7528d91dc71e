"""``sandport ws``: the bridge as a standalone command with websockify's command-line shape.

``sandport ws [options] [SOURCE_ADDR:]SOURCE_PORT [TARGET_ADDR:TARGET_PORT]`` takes the
options websockify users have in their systemd units (see :func:`build_config`), so a
unit switches by changing the binary name. Options websockify has and this command does
not (wrap mode, daemonising, session recording, auth plugins, syslog) are refused with a
message saying what to use instead, never silently ignored.

The server's lifetime follows websockify: ``--run-once`` exits after the first session,
``--timeout T`` exits T seconds after start, ``--idle-timeout T`` exits after T seconds
without any session.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sandport.bridge.model import BridgeConfig, BridgeLimits
from sandport.bridge.server import WsBridge
from sandport.bridge.targets import Target, load_plugin, parse_target
from sandport.bridge.tls import MIN_VERSIONS, TlsConfig
from sandport.errors import UsageError

log = logging.getLogger(__name__)

DEFAULT_CERT = "self.pem"  # websockify loads ./self.pem when it exists

#: websockify options sandport ws refuses, with what to do instead.
UNSUPPORTED = {
    "daemon": "run it under systemd (Type=simple) or your supervisor instead of -D",
    "record": "session recording is not supported: drop --record (each session is logged: "
              "client, target, bytes each way, close reason)",
    "inetd": "inetd mode is not supported: let sandport ws listen itself",
    "wrap_mode": "wrap mode is not supported: start the program yourself and give its "
                 "TARGET_ADDR:TARGET_PORT",
    "libserver": "not needed: sandport ws has one engine; drop it",
    "auth_plugin": "auth plugins are not supported: use token files (--token-plugin "
                   "TokenFile) and --origin",
    "web_auth": "not supported (it needs an auth plugin): use token files (--token-plugin "
                "TokenFile) and --origin",
    "syslog": "not supported: use --log-file or your supervisor's log",
}


@dataclass(frozen=True, slots=True, kw_only=True)
class WsOptions:
    """The command line of ``sandport ws`` (websockify's names, plus sandport's own)."""

    source: str
    target: str | None = None
    extra: tuple[str, ...] = ()
    cert: str | None = None
    key: str | None = None
    key_password: str | None = None
    ssl_only: bool = False
    ssl_target: bool = False
    verify_client: bool = False
    cafile: str | None = None
    ssl_version: str = "default"
    ssl_ciphers: str | None = None
    unix_target: str | None = None
    web: str | None = None
    target_config: str | None = None
    token_plugin: str | None = None
    token_source: str | None = None
    host_token: bool = False
    heartbeat: float | None = None
    prefer_ipv6: bool = False
    origins: tuple[str, ...] = ()
    trusted_proxies: tuple[str, ...] = ()
    max_connections: int | None = None
    max_per_client: int | None = None
    max_message: int = 16 * 1024 * 1024
    connect_timeout: float = 10.0
    session_idle_timeout: float | None = None


def parse_source(text: str, *, prefer_ipv6: bool = False) -> tuple[str, int]:
    """``[SOURCE_ADDR:]SOURCE_PORT``; no address means every interface, as in websockify.

    Raises:
        UsageError: not a port, or a port outside 1-65535 (0: any free port is allowed).
    """
    host, sep, port_text = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not (port_text.isascii() and port_text.isdigit()) or int(port_text) > 65535:
        raise UsageError(f"SOURCE {text!r} is not [SOURCE_ADDR:]SOURCE_PORT "
                         "(e.g. 6080 or 127.0.0.1:6080)")
    if not sep or not host:
        host = "::" if prefer_ipv6 else "0.0.0.0"
    if host == "localhost":
        host = "::1" if prefer_ipv6 else "127.0.0.1"
    return host, int(port_text)


def build_config(o: WsOptions) -> BridgeConfig:
    """Map the command line onto a :class:`BridgeConfig`.

    Raises:
        UsageError: a missing or contradictory target, a bad address, a missing file.
    """
    if o.extra:
        raise UsageError(f"unexpected arguments {' '.join(o.extra)!r}: "
                         f"{UNSUPPORTED['wrap_mode']}")
    host, port = parse_source(o.source, prefer_ipv6=o.prefer_ipv6)
    plugin_name, plugin_source = o.token_plugin, o.token_source
    if o.target_config:
        if plugin_name:
            raise UsageError("--target-config and --token-plugin exclude each other")
        plugin_name, plugin_source = "TokenFile", o.target_config
    chosen = [x for x in (o.target, o.unix_target, plugin_name) if x]
    if len(chosen) != 1:
        raise UsageError(
            "give exactly one of TARGET_ADDR:TARGET_PORT, --unix-target FILE or "
            "--token-plugin TokenFile --token-source PATH"
            + (f" (got {len(chosen)})" if chosen else ""))
    if o.host_token and not plugin_name:
        raise UsageError("--host-token needs a token plugin (--token-plugin TokenFile "
                         "--token-source PATH)")
    target: Target | None = None
    tokens = None
    if o.target:
        target = parse_target(o.target, what="TARGET")
    elif o.unix_target:
        target = Target(path=o.unix_target)
    else:
        assert plugin_name is not None
        tokens = load_plugin(plugin_name, plugin_source)
    tls = None
    cert = o.cert or (DEFAULT_CERT if Path(DEFAULT_CERT).exists() else None)
    if cert is not None:
        if not Path(cert).exists():
            raise UsageError(f"--cert {cert}: no such file")
        if o.ssl_version not in MIN_VERSIONS:
            raise UsageError(f"--ssl-version {o.ssl_version!r} is not one of "
                             f"{', '.join(MIN_VERSIONS)}")
        tls = TlsConfig(cert=Path(cert), key=Path(o.key) if o.key else None,
                        key_password=o.key_password, ssl_only=o.ssl_only,
                        min_version=o.ssl_version, ciphers=o.ssl_ciphers,
                        verify_client=o.verify_client,
                        cafile=Path(o.cafile) if o.cafile else None)
    elif o.ssl_only:
        raise UsageError(f"--ssl-only needs a certificate: --cert FILE (or ./{DEFAULT_CERT})")
    web_dir = None
    if o.web:
        web_dir = Path(o.web)
        if not web_dir.is_dir():
            raise UsageError(f"--web {o.web}: not a directory")
    proxies = []
    for text in o.trusted_proxies:
        try:
            proxies.append(ipaddress.ip_network(text, strict=False))
        except ValueError:
            raise UsageError(f"--trusted-proxy {text!r} is not an address or network "
                             "(e.g. 10.0.0.0/8)") from None
    limits = BridgeLimits(max_connections=o.max_connections, max_per_client=o.max_per_client,
                          max_message=o.max_message, connect_timeout=o.connect_timeout,
                          idle_timeout=o.session_idle_timeout, heartbeat=o.heartbeat)
    return BridgeConfig(listen_host=host, listen_port=port, target=target, tokens=tokens,
                        host_token=o.host_token, web_dir=web_dir, tls=tls,
                        target_tls=o.ssl_target, origins=o.origins,
                        trusted_proxies=tuple(proxies), limits=limits)


async def serve(config: BridgeConfig, stop: asyncio.Event, *, run_once: bool = False,
                timeout: float | None = None, idle_timeout: float | None = None,
                on_ready: Callable[[WsBridge], None] | None = None) -> None:
    """Run the bridge until ``stop`` is set or a websockify lifetime option ends it."""
    bridge = WsBridge(config)
    await bridge.start()
    try:
        if on_ready is not None:
            on_ready(bridge)
        started = last_busy = time.monotonic()
        if run_once:
            bridge.on_session_end = stop.set
        while not stop.is_set():
            now = time.monotonic()
            if bridge.stats.sessions_active:
                last_busy = now
            if timeout and now - started > timeout:
                log.info("exiting: --timeout %g s", timeout)
                break
            if idle_timeout and now - last_busy > idle_timeout:
                log.info("exiting: --idle-timeout %g s without a session", idle_timeout)
                break
            try:
                async with asyncio.timeout(0.2):
                    await stop.wait()
            except TimeoutError:
                pass
    finally:
        await bridge.stop()
