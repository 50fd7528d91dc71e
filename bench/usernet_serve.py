"""Serve a namespace's TAP with usernet, in a process of its own (for bench/usernet.py).

    python bench/usernet_serve.py NETNS MTU ALLOW_PORT [offload|plain]

Creates TAP ``sp-bench-ut`` moved into NETNS as eth0 (10.201.252.2/24 via .1, static),
with offloads (the default) or plain frames, allows the guest to reach
127.0.0.1:ALLOW_PORT through the gateway address, prints "ready" and serves until SIGTERM.
"""

from __future__ import annotations

import asyncio
import ipaddress
import signal
import subprocess
import sys

import uvloop

from sandport.usernet.egress import EgressRule
from sandport.usernet.link import LinkConfig
from sandport.usernet.stack import Usernet
from sandport.usernet.tap import TapTransport, tap_into_netns

NETWORK = ipaddress.IPv4Network("10.201.252.0/24")
GATEWAY, GUEST = NETWORK.network_address + 1, NETWORK.network_address + 2


async def serve(netns: str, mtu: int, port: int, offload: bool) -> None:
    fd = await asyncio.to_thread(tap_into_netns, "sp-bench-ut", netns, offload=offload)
    transport = TapTransport(fd)
    net = Usernet.on(
        transport, LinkConfig(gateway_ip=GATEWAY, gateway_mac=bytes.fromhex("52540000fe01"),
                              network=NETWORK, guest_ip=GUEST, mtu=mtu),
        egress=(EgressRule(network=ipaddress.IPv4Network("127.0.0.1/32"), port=port),))
    transport.start()
    for cmd in (["link", "set", "lo", "up"], ["link", "set", "eth0", "mtu", str(mtu), "up"],
                ["addr", "add", f"{GUEST}/24", "dev", "eth0"],
                ["route", "add", "default", "via", str(GATEWAY)]):
        subprocess.run(["ip", "-n", netns, *cmd], check=True)  # noqa: ASYNC221 - set-up
    print("ready", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    print(f"usernet counters: tcp {dict(net.tcp.counters)}, dropped "  # for a look after a run
          f"{dict(net.tcp.dropped + net.link.dropped)}, transport {dict(transport.errors)}",
          file=sys.stderr)
    net.close()
    transport.close()


if __name__ == "__main__":
    mode = sys.argv[4] if len(sys.argv) > 4 else "offload"
    uvloop.run(serve(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), mode == "offload"))
