"""The TAP transport of usernet: a TAP device inside a sandbox's namespace, served here.

The device is made in the host's namespace (``/dev/net/tun``, ``TUNSETIFF`` with
``IFF_TAP | IFF_NO_PI``: one Ethernet frame per read and per write, no header) and then
moved into the sandbox's network namespace as its ``eth0``; the file descriptor stays
with us. Whatever the sandbox's kernel sends on ``eth0`` arrives here as frames, and the
frames we write appear on its ``eth0`` (the pasta model: no bridge, no veth, no host
routing). Frames are batched: each wakeup reads until the device is empty and hands the
whole batch to the stack, then writes every reply.

With ``offload=True`` (the default) the device is opened with ``IFF_VNET_HDR`` and told
(``TUNSETOFFLOAD``) that we take partial checksums and TCP segmentation: the sandbox's
kernel stops computing TCP/UDP checksums for us and hands over TCP in segments of up to
64 KiB whatever the MTU, as it does for QEMU's virtio-net. Every frame both ways then starts
with a virtio-net header (`sandport.proto.packets.vnet`): give the stack ``vnet=True``
(`TapTransport.vnet` says which).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import fcntl
import logging
import os
import struct

from pyroute2 import IPRoute

from sandport.proto.packets.vnet import VNET_HEADER
from sandport.usernet.transport import MAX_FRAME, FrameTransport, Handler

log = logging.getLogger(__name__)

TUNSETIFF = 0x400454CA
TUNGETIFF = 0x800454D2
TUNSETOFFLOAD = 0x400454D0
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
TUN_F_CSUM = 0x01  # we take packets with partial checksums
TUN_F_TSO4 = 0x02  # ... and IPv4 TCP segments larger than the MTU
IFREQ = struct.Struct("16sH22x")
BATCH = 64  # frames per wakeup at most, so one busy guest cannot starve the loop


def open_tap(name: str, *, offload: bool = True) -> int:
    """A non-blocking fd of a new TAP device ``name`` in this network namespace (with
    ``offload``: virtio-net headers, partial checksums and TCP segmentation offload)."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    flags = IFF_TAP | IFF_NO_PI | (IFF_VNET_HDR if offload else 0)
    try:
        fcntl.ioctl(fd, TUNSETIFF, IFREQ.pack(name.encode(), flags))
        if offload:
            fcntl.ioctl(fd, TUNSETOFFLOAD, TUN_F_CSUM | TUN_F_TSO4)
    except OSError:
        os.close(fd)
        raise
    return fd


def has_vnet_header(fd: int) -> bool:
    """Whether the TAP behind ``fd`` puts a virtio-net header before each frame."""
    buf = fcntl.ioctl(fd, TUNGETIFF, bytes(IFREQ.size))
    return bool(IFREQ.unpack(buf)[1] & IFF_VNET_HDR)


def tap_into_netns(name: str, netns: str, guest_name: str = "eth0", *,
                   offload: bool = True) -> int:
    """Make TAP ``name``, move it into ``netns`` as ``guest_name``; return its fd.

    Callable from plain code and from a coroutine alike: pyroute2 0.9's synchronous
    ``IPRoute`` runs an event loop of its own, which cannot run in a thread whose loop
    already runs ("This event loop is already running"), so there the move is made on a
    short-lived thread of its own (one netlink round trip, milliseconds).
    """
    fd = open_tap(name, offload=offload)
    try:
        if _loop_running():
            with concurrent.futures.ThreadPoolExecutor(1, "tap_into_netns") as pool:
                pool.submit(_move_link, name, netns, guest_name).result()
        else:
            _move_link(name, netns, guest_name)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _move_link(name: str, netns: str, guest_name: str) -> None:
    with IPRoute() as ipr:
        (index,) = ipr.link_lookup(ifname=name)
        ipr.link("set", index=index, net_ns_fd=netns, ifname=guest_name)


def _loop_running() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


class TapTransport(FrameTransport):
    """Reads frame batches from a TAP fd into ``handler``; writes its replies back."""

    #: A TAP is a kernel's own link: no wire, so the largest MTU (as pasta defaults to).
    default_mtu = 65520

    def __init__(self, fd: int, handler: Handler | None = None) -> None:
        super().__init__(handler)
        self.fd = fd
        self.vnet = has_vnet_header(fd)
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        """Serve the fd on the running loop."""
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self.fd, self._readable)

    def send(self, frames: list[bytes]) -> None:
        """Write frames to the guest; a full device drops them (counted), as a NIC would."""
        for frame in frames:
            try:
                os.write(self.fd, frame)
                self.frames_out += 1
            except BlockingIOError:
                self.errors["tx_full"] += 1
            except OSError as exc:
                self.errors[f"tx_{exc.errno}"] += 1

    def _readable(self) -> None:
        batch: list[bytes] = []
        while len(batch) < BATCH:
            try:
                frame = os.read(self.fd, MAX_FRAME + VNET_HEADER.size)
            except BlockingIOError:
                break
            except OSError as exc:
                self.errors[f"rx_{exc.errno}"] += 1
                break
            if not frame:
                break
            batch.append(frame)
        self.deliver(batch)

    def close(self) -> None:
        """Stop serving and close the fd (the device goes away with it)."""
        if self._loop is not None:
            with contextlib.suppress(RuntimeError, ValueError):  # the loop is closed
                self._loop.remove_reader(self.fd)
            self._loop = None
        with contextlib.suppress(OSError):
            os.close(self.fd)
