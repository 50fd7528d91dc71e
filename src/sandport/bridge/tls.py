"""TLS for the bridge: one context per certificate version, re-read when the files change.

websockify's options map onto :class:`TlsConfig`: ``--cert`` (a PEM file holding the
certificate chain, and the key unless ``--key`` names another file), ``--key-password``,
``--ssl-only``, ``--ssl-version`` (the *minimum* TLS version), ``--ssl-ciphers``,
``--verify-client`` with ``--cafile``.

A renewed certificate (certbot, cert-manager) is picked up by the next TLS connection:
:meth:`TlsContexts.context` compares the files' inode, size and mtime with the ones it
loaded. A file that does not load keeps the previous context and logs why.
"""

from __future__ import annotations

import logging
import os
import ssl
from dataclasses import dataclass
from pathlib import Path

from sandport.errors import UsageError

log = logging.getLogger(__name__)

MIN_VERSIONS = {
    "default": ssl.TLSVersion.TLSv1_2,
    "tlsv1_1": ssl.TLSVersion.TLSv1_1,
    "tlsv1_2": ssl.TLSVersion.TLSv1_2,
    "tlsv1_3": ssl.TLSVersion.TLSv1_3,
}


@dataclass(frozen=True, slots=True, kw_only=True)
class TlsConfig:
    """Certificate and TLS settings of a bridge port."""

    cert: Path
    key: Path | None = None
    key_password: str | None = None
    ssl_only: bool = False
    min_version: str = "default"
    ciphers: str | None = None
    verify_client: bool = False
    cafile: Path | None = None

    def __post_init__(self) -> None:
        if self.min_version not in MIN_VERSIONS:
            raise UsageError(f"--ssl-version {self.min_version!r} is not one of "
                             f"{', '.join(MIN_VERSIONS)}")


def _key(path: Path | None) -> tuple[int, int, int] | None:
    if path is None:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


class TlsContexts:
    """The current server SSLContext of a :class:`TlsConfig`."""

    def __init__(self, config: TlsConfig) -> None:
        self.config = config
        self._files: tuple[object, ...] = ()
        self._ctx: ssl.SSLContext | None = None
        self.loads = 0
        try:
            self._ctx = self._build()
        except (OSError, ssl.SSLError) as exc:
            raise UsageError(f"cannot load the certificate {config.cert}: {exc}",
                             hint="--cert takes a PEM file with the certificate chain (and "
                                  "the key, unless --key names it), e.g. from `openssl req "
                                  "-new -x509 -days 365 -nodes -out self.pem -keyout "
                                  "self.pem`") from None

    def _stamp(self) -> tuple[object, ...]:
        c = self.config
        return (_key(c.cert), _key(c.key), _key(c.cafile))

    def _build(self) -> ssl.SSLContext:
        c = self.config
        stamp = self._stamp()
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = MIN_VERSIONS[c.min_version]
        ctx.load_cert_chain(c.cert, c.key, password=c.key_password)
        if c.ciphers:
            ctx.set_ciphers(c.ciphers)
        if c.verify_client:
            ctx.verify_mode = ssl.CERT_REQUIRED
            if c.cafile is not None:
                ctx.load_verify_locations(cafile=c.cafile)
            else:
                ctx.load_default_certs(ssl.Purpose.CLIENT_AUTH)
        ctx.set_alpn_protocols(["http/1.1"])
        self._files = stamp
        self.loads += 1
        log.info("TLS: loaded %s (minimum %s)", c.cert, ctx.minimum_version.name)
        return ctx

    def context(self) -> ssl.SSLContext:
        """The context for a new connection, rebuilt first if a file changed."""
        if self._stamp() != self._files:
            try:
                self._ctx = self._build()
            except (OSError, ssl.SSLError) as exc:
                self._files = self._stamp()  # do not retry until the files change again
                log.error("TLS: %s changed but does not load (%s); keeping the previous "
                          "certificate", self.config.cert, exc)
        assert self._ctx is not None
        return self._ctx
