"""The fault soak, short (``bench/soak_faults.py`` runs the long one in `make soak`).

One `sandport up` subprocess for the module, one sandbox with a guest byte service on port
7000 (``bench/soakf_guest.py``) behind a kernel forward (127.0.0.1), a proxy forward ([::1])
and the WebSocket bridge. Every client streams a known byte pattern, so a lost, doubled or
reordered byte shows. The faults run first; ``kill -9`` of the gateway runs last (it ends
that gateway; the scenario starts it again on the same state dir).
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import (
    record,
    remove_gateway_leftovers,
    require_programs,
    require_root,
    test_net_names,
)
from nethelpers import free_port

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import soakf_scenarios as sc
from soakf_lib import Bed

pytestmark = pytest.mark.integration

END_BOUND = 5.0  # seconds a client may wait for its end
STALL = 2.0  # seconds a stall lasts
STALL_KIB_PER_CONN = 1024  # RSS growth allowed while a stall lasts (one read per direction)
#: The gateway's --guest-timeout here (60 s by default): a silent guest is given up after it.
GUEST_TIMEOUT = 6.0


@pytest.fixture(scope="module")
def bed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bed]:
    require_root()
    require_programs("Xvnc", "openbox", "xsetroot", "xmessage", "nft", "ss")
    bridge, subnet = test_net_names()
    b = Bed(tmp_path_factory.mktemp("soakf"), bridge=bridge, subnet=str(subnet),
            listen_port=free_port(), kernel_port=free_port(), proxy_port=free_port(),
            log=print, extra=("--guest-timeout", f"{GUEST_TIMEOUT:g}"))
    try:
        b.create()
        yield b
    finally:
        errors = b.teardown()
        remove_gateway_leftovers(bridge=bridge, state_dir=b.gw.state_dir)
        assert not errors, errors


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def no_tracebacks(res: dict[str, Any]) -> None:
    assert res["gateway_tracebacks"] == [], "\n".join(res["gateway_tracebacks"])


def test_guest_service_killed_closes_the_client_with_a_reason(bed: Bed) -> None:
    proxy, ws = run(sc.fault(bed, ("proxy", "ws"), "guest-killed", conns=2,
                             end_bound=END_BOUND))
    for res in (proxy, ws):
        assert res["conns"] == 2 and res["hung"] == 0, res
        assert res["end_after_fault_max_s"] <= END_BOUND, res
    assert set(proxy["ends"]) <= {"eof", "rst"}, proxy  # the guest's FIN (or RST) comes through
    # Through the bridge: a close frame that names the hop, and the gateway counts it.
    # (its FIN, or its kernel's RST when unread bytes were left: both name the service).
    assert set(ws["ends"]) <= {
        "ws 1000 'the target closed the connection (hop: guest service)'",
        "ws 1011 'the target connection failed: Connection reset by peer (hop: guest "
        "service)'"}, ws
    assert sum(v for k, v in ws["metrics"].items() if k.startswith("sandport_ws_closes_total")
               and "target" in k) == 2, ws["metrics"]
    no_tracebacks(proxy)


def test_guest_link_cut_ends_every_client_with_a_reason(bed: Bed) -> None:
    """The host end of the sandbox's veth goes down under live streams: no FIN or RST can
    come back, yet every client sees its end once the gateway gives the guest up."""
    bound = GUEST_TIMEOUT + 8
    proxy, ws = run(sc.fault(bed, ("proxy", "ws"), "link-cut", conns=1, end_bound=bound))
    for res in (proxy, ws):
        assert res["conns"] == 1 and res["hung"] == 0, res
    assert proxy["ends"] == {"rst": 1}, proxy
    # 1011 and the kernel's word for it: "No route to host" (the neighbour entry failed
    # while the link was down) or "Connection timed out".
    (end,) = ws["ends"]
    assert end.startswith("ws 1011 'the target connection failed: ") and \
        end.endswith("(hop: guest reachability)'"), ws
    counted = proxy["metrics"]
    assert any('reason="reset"' in k and v == 1 for k, v in counted.items()), counted
    record(f"soak faults: guest link cut: the proxy client was reset "
           f"{proxy['end_after_fault_max_s']:.1f} s and the bridge client closed "
           f"{ws['end_after_fault_max_s']:.1f} s after the cut")
    no_tracebacks(proxy)


def test_guest_link_flap_loses_nothing(bed: Bed) -> None:
    """The link down for 2 s, then up: the streams stall, then flow again, not a byte
    lost (TCP survives a flap; the gateway gives a guest up only after
    GUEST_TIMEOUT)."""
    for res in run(sc.link_flap(bed, ("proxy", "ws"), conns=1, down=2.0)):
        assert res["hung_after_link_back"] == 0 and res["flowing_after_link_back"] == 1, res
        assert res["lost_down_total"] == 0 and res["lost_up_total"] == 0, res
        assert res["bytes_out_of_sequence"] == 0, res
        no_tracebacks(res)


def test_guest_that_stops_reading_holds_a_bounded_amount_then_is_given_up(bed: Bed) -> None:
    """Backpressure: the client can send only until the buffers on the way are full, the
    gateway's memory stays flat, and after GUEST_TIMEOUT of a closed window the
    gateway gives the guest up and tells the client (RST, close 1011)."""
    results = run(sc.fault(bed, ("proxy", "ws"), "guest-stops-reading", conns=1,
                           stall=STALL, end_bound=GUEST_TIMEOUT + 8))
    proxy, ws = results
    for res in results:
        sent = res["client_sent_during_stall"]
        assert sent[-1] == sent[-2], f"{res['kind']}: the client could still send: {sent}"
        assert res["rss"]["steady_growth_kib"] <= STALL_KIB_PER_CONN, res["rss"]
        assert res["hung"] == 0 and "gave up" not in res["ends"], res
        record(f"soak faults: guest stops reading via {res['kind']}: the client got "
               f"{sent[-1] / 1024:.0f} KiB in before it blocked; gateway RSS "
               f"+{res['rss']['steady_growth_kib']} KiB while stalled; given up after "
               f"{res['end_after_fault_max_s']:.1f} s")
    assert proxy["ends"] == {"rst": 1}, proxy
    (end,) = ws["ends"]
    assert end.startswith("ws 1011 'the target connection failed: "), ws
    assert ws["metrics"].get(
        next(k for k in ws["metrics"] if k.startswith("sandport_ws_sessions_active")), 1) == 0
    no_tracebacks(proxy)


def test_client_that_stops_reading_holds_a_bounded_amount(bed: Bed) -> None:
    results = run(sc.fault(bed, ("proxy", "ws"), "client-stops-reading", conns=1,
                           stall=STALL, end_bound=END_BOUND))
    for res in results:
        assert res["rss"]["steady_growth_kib"] <= STALL_KIB_PER_CONN, res["rss"]
        # When the client gives up (a reset), the gateway lets go of the guest at once.
        assert res["guest_not_ended"] == 0, res
        assert res["guest_saw_end_after_s"] <= END_BOUND, res
    no_tracebacks(results[0])


def test_kill_9_kernel_flows_proxy_and_bridge_close_new_connections_after_restart(
        bed: Bed) -> None:
    res = run(sc.kill9(bed, counts={"kernel": 20, "proxy": 20, "ws": 3}, warm=1.0,
                       end_bound=END_BOUND, flow_check=1.0))
    kinds = res["kinds"]
    kern = kinds["kernel"]
    assert kern["conns"] == 20 and res["ended_before_kill"] == [], res
    # Kernel forwards: nft DNAT outlives the process; every stream keeps flowing through
    # the kill and the restart, and loses no byte.
    assert kern["flowing_after_kill"] == 20 and kern["flowing_after_restart"] == 20, kern
    assert kern["lost_down_total"] == 0 and kern["lost_up_total"] == 0, kern
    assert kern["no_guest_report"] == 0 and kern["bytes_out_of_sequence"] == 0, kern
    # Proxy and bridge clients: closed (EOF, RST, 1006), none left hanging.
    for kind, n in (("proxy", 20), ("ws", 3)):
        k = kinds[kind]
        assert k["conns"] == n and k["hung"] == 0, (kind, k)
        assert k["end_after_kill_max_s"] <= END_BOUND, (kind, k)
        assert k["bytes_out_of_sequence"] == 0, (kind, k)
    # After the restart, a new connection of every kind works.
    restart = res["restart"]
    for kind in sc.KINDS:
        assert restart[kind]["works_after_start_s"] is not None, (kind, restart)
    # ... and the kernel forward never stopped taking new connections meanwhile.
    watch = restart["kernel_probes_failed"]
    assert watch["tries"] > 100 and watch["failed"] == 0, watch
    record("soak faults: kill -9 restart: new connections work "
           + ", ".join(f"{k} {restart[k]['works_after_ready_s']:+.2f} s" for k in sc.KINDS)
           + f" after the ready line ({restart['ready_line_after_start_s']:.2f} s after start)")
    assert res["gateway_tracebacks"] == [], res["gateway_tracebacks"]
