"""What every usernet transport (TAP, QEMU stream, QEMU dgram) shares: hand each batch of
guest frames to the stack, send the replies back, count what went wrong."""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable
from typing import ClassVar

log = logging.getLogger(__name__)

#: Guest frames in, frames to send back out (the stack: ``Usernet.handle``).
Handler = Callable[[list[bytes]], list[bytes]]
MAX_FRAME = 14 + 0xFFFF  # Ethernet and the largest IPv4 packet (MTU 65520 fits)


class FrameTransport:
    """A batch of frames from the guest goes to ``handler``; its replies to :meth:`send`.

    ``handler`` may come later (`sandport.usernet.stack.Usernet.on` sets it); until then
    frames are counted as ``errors["no_handler"]`` and dropped.
    """

    #: The link MTU a stack on this transport announces unless told otherwise.
    default_mtu: ClassVar[int] = 1500
    #: Frames both ways carry a virtio-net header (a TAP with offloads).
    vnet: bool = False

    def __init__(self, handler: Handler | None = None) -> None:
        self.handler = handler
        self.frames_in = 0
        self.frames_out = 0
        self.errors: collections.Counter[str] = collections.Counter()

    def deliver(self, frames: list[bytes]) -> None:
        """Hand ``frames`` to the stack and send what it answers."""
        if not frames:
            return
        self.frames_in += len(frames)
        if self.handler is None:
            self.errors["no_handler"] += len(frames)
            return
        try:
            replies = self.handler(frames)
        except Exception:  # the stack must never die of one batch
            log.exception("usernet: handler failed on a batch of %d frames", len(frames))
            self.errors["handler"] += 1
            return
        self.send(replies)

    def send(self, frames: list[bytes]) -> None:
        """Write frames to the guest."""
        raise NotImplementedError
