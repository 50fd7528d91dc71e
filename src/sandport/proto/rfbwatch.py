"""Watch an RFB handshake pass by, without taking part (RFC 6143 section 7.1-7.3).

The bridge feeds both directions of a session to :class:`RfbWatch`; it tells when the
server's ServerInit has gone by (the desktop is about to show), when the handshake failed,
or that this is not RFB (then it stops looking). Only the message lengths matter::

    server  ProtocolVersion  "RFB 003.00x\\n"                          12 bytes
    client  ProtocolVersion                                           12 bytes
    3.3:    server  security-type u32 (0 failed, 1 None, 2 VNC Authentication)
    3.7+:   server  number-of-types u8, types u8 * n;  client  chosen type u8
    VNC Authentication: server challenge 16 bytes; client response 16 bytes
    SecurityResult u32 (0 ok) after VNC Authentication, and after None in 3.8
    client  ClientInit u8;  server  ServerInit: width u16, height u16, pixel format 16,
            name-length u32, name

Every buffer has a cap: the watcher keeps at most 64 client bytes per read, and at most
:data:`MAX_SERVER_BYTES` server bytes it has not yet passed. The largest message it waits
for whole is a ServerInit with a name of the RFB client's cap (24 + 4096 bytes); a server
that sends more than that before the handshake moves on (a name-length over the cap, or a
stream of bytes while the client has not answered) is not followed: NOT_RFB, and the
watcher lets go of what it held.
"""

from __future__ import annotations

import enum
import struct
from typing import Final

from sandport.proto.rfb.messages import MAX_NAME_LENGTH, SERVER_INIT_HEADER_LENGTH

_U32 = struct.Struct("!I")
#: Most server bytes the watcher holds (see the module docstring).
MAX_SERVER_BYTES: Final = 8 * 1024
SECURITY_NONE = 1
SECURITY_VNC_AUTH = 2


class Watch(enum.Enum):
    """Where the watched handshake is."""

    WATCHING = "watching"
    SERVER_INIT = "server-init"  # ServerInit has passed: the handshake succeeded
    FAILED = "failed"  # the server refused (security failure)
    NOT_RFB = "not-rfb"  # not RFB, or a security type this watcher does not follow


class RfbWatch:
    """Feed server and client bytes in the order they pass; read :attr:`state`."""

    __slots__ = ("_cli", "_minor", "_srv", "_stage", "state")

    def __init__(self) -> None:
        self._srv = bytearray()
        self._cli = bytearray()
        self._minor = 0
        self._stage = "version"
        self.state = Watch.WATCHING

    def from_server(self, data: bytes) -> Watch:
        """Bytes the server sent; the state after them."""
        if self.state is Watch.WATCHING:
            self._srv += data
            self._advance()
            if self.state is Watch.WATCHING and len(self._srv) > MAX_SERVER_BYTES:
                self.state = Watch.NOT_RFB
            if self.state is not Watch.WATCHING:
                self._srv.clear()
        return self.state

    def from_client(self, data: bytes) -> Watch:
        """Bytes the client sent; the state after them."""
        if self.state is Watch.WATCHING and len(self._cli) < 64:
            self._cli += data[:64]
            self._advance()
        return self.state

    def _take(self, n: int) -> bytes | None:
        if len(self._srv) < n:
            return None
        out = bytes(self._srv[:n])
        del self._srv[:n]
        return out

    def _advance(self) -> None:
        while self.state is Watch.WATCHING:
            stage = self._stage
            if stage == "version":
                if len(self._srv) >= 4 and not self._srv.startswith(b"RFB "):
                    self.state = Watch.NOT_RFB
                    return
                if len(self._srv) < 12 or len(self._cli) < 12:
                    return
                if not self._cli.startswith(b"RFB 003."):
                    self.state = Watch.NOT_RFB
                    return
                self._minor = int(self._cli[8:11]) if self._cli[8:11].isdigit() else 3
                del self._srv[:12]
                del self._cli[:12]
                self._stage = "security"
            elif stage == "security" and self._minor < 7:
                raw = self._take(4)
                if raw is None:
                    return
                self._after_choice(_U32.unpack(raw)[0])
            elif stage == "security":
                if not self._srv:
                    return
                n = self._srv[0]
                if n == 0:
                    self.state = Watch.FAILED
                    return
                if len(self._srv) < 1 + n or not self._cli:
                    return
                del self._srv[: 1 + n]
                chosen = self._cli[0]
                del self._cli[:1]
                self._after_choice(chosen)
            elif stage == "challenge":
                if self._take(16) is None:
                    return
                self._stage = "result"
            elif stage == "result":
                raw = self._take(4)
                if raw is None:
                    return
                if _U32.unpack(raw)[0] != 0:
                    self.state = Watch.FAILED
                    return
                self._stage = "init"
            else:  # ServerInit
                if len(self._srv) < SERVER_INIT_HEADER_LENGTH:
                    return
                name_len = _U32.unpack_from(self._srv, SERVER_INIT_HEADER_LENGTH - 4)[0]
                if name_len > MAX_NAME_LENGTH:
                    self.state = Watch.NOT_RFB
                    return
                if len(self._srv) < SERVER_INIT_HEADER_LENGTH + name_len:
                    return
                self.state = Watch.SERVER_INIT

    def _after_choice(self, security: int) -> None:
        if security == 0:
            self.state = Watch.FAILED
        elif security == SECURITY_NONE:
            self._stage = "result" if self._minor >= 8 else "init"
        elif security == SECURITY_VNC_AUTH:
            self._stage = "challenge"
        else:
            self.state = Watch.NOT_RFB
