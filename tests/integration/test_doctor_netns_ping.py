"""The doctor pings a `--netns` target from inside its namespace (issue 18, finding 4).

The target listens on 127.0.0.1 inside a namespace of its own: that address means the
host's loopback on the host, so a ping from there would prove nothing (the doctor used to
skip the hop). Pinged from inside, it answers; with the namespace's loopback down, the
hop fails and names the namespace.
"""

from __future__ import annotations

import ipaddress
import subprocess
from typing import Any

import pytest

from attachhelpers import HandMade, hand_made  # noqa: F401
from sandport.control.gateway import Gateway

pytestmark = pytest.mark.integration

LOOPBACK = ipaddress.IPv4Network("127.0.0.0/8")


def test_the_doctor_pings_a_netns_target_from_inside_its_namespace(
        gateway_factory: Any, loop_thread: Any, hand_made: HandMade) -> None:
    gw: Gateway = gateway_factory(attach_subnets=(LOOPBACK,), probe_interval=600.0)
    info = loop_thread.run(gw.attach(ip="127.0.0.1", netns=hand_made.netns,
                                     vnc_password=hand_made.password))
    where = f"/run/netns/{hand_made.netns}"
    try:
        report = loop_thread.run(gw.doctor(info.id))
        [row] = [r for r in report.rows if r.hop == "guest reachability"
                 and r.check == "ping"]
        assert row.status == "ok", row
        assert f"127.0.0.1 answers ICMP echo inside {where}" in row.evidence, row
        subprocess.run(["ip", "-n", hand_made.netns, "link", "set", "lo", "down"],
                       check=True)
        report = loop_thread.run(gw.doctor(info.id))
        [row] = [r for r in report.rows if r.hop == "guest reachability"
                 and r.check == "ping"]
        assert row.status == "fail", row
        assert f"pinged from inside {where}" in row.evidence, row
        assert where in row.fix, row
    finally:
        loop_thread.run(gw.destroy_sandbox(info.id))
