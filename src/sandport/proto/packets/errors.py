"""The one error every frame parser in `sandport.proto.packets` raises for bad wire input."""

from __future__ import annotations

from sandport.proto.errors import RemoteProtocolError

__all__ = ["MalformedFrame"]


class MalformedFrame(RemoteProtocolError, ValueError):
    """A frame, packet or message from the guest violates its format.

    The guest link is untrusted: a parser checks lengths, checksums and the fields it relies
    on, and raises this error instead of returning half-parsed data. ``reason`` is a short,
    stable code (``"eth_short"``, ``"ipv4_bad_checksum"``, ``"dhcp_option_overrun"`` ...)
    meant for counters and tests, so it never contains values from the frame; the message
    may carry details.

    It is a `RemoteProtocolError` (house rule: "the peer is broken" is one catchable class)
    and a `ValueError` (a parse of bad bytes is a bad value to callers that know nothing of
    sandport).

    Attributes:
        reason: The stable code naming what was wrong.
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        """Create the error.

        Args:
            reason: The stable code, ``<layer>_<problem>``.
            detail: Optional human-readable detail for the message.
        """
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
