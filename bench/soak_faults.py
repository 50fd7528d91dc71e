"""The fault half of `make soak`: kill -9 of the gateway, and four faults through each path.

One `sandport up` (a subprocess with its own state dir, bridge and subnet), one sandbox
with a guest byte service on port 7000 (``soakf_guest.py``), a kernel forward (nft DNAT,
127.0.0.1), a proxy forward (the relay, [::1]) and the WebSocket bridge to the same port.

a) ``kill -9`` of the gateway with 200 kernel, 200 proxy and 20 bridge streams (each a
   known byte pattern both ways, paced): per kind the bytes lost and how each client ended,
   then a restart on the same state dir and how long until a new connection of each kind
   works, from the process start and from its ready line ("Press Ctrl-C ...").
b) the guest service killed, c) the guest link cut (host end of the sandbox's veth down),
d) a guest that stops reading, e) a client that stops reading: through the proxy forward
   and through the bridge each: how the client's connection ended, what the guest saw,
   the gateway's counters, and the gateway's RSS while it lasted.

Prints progress on stderr, a summary table and PASS/MISS lines against the goals on
stdout, and writes every figure to ``bench/results/soak-faults-<UTC>.json``. Exit 0 (also
on a MISS), 1 on a setup failure, 2 without root or a tool, 130 when interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import secrets
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import report
import soakf_scenarios as sc
import testbed
from report import fmt
from soakf_lib import Bed
from testbed import progress

from sandport.net.upstream import DEFAULT_GUEST_TIMEOUT

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REQUIRED_TOOLS = ("ip", "nft", "ss", "Xvnc")
GOAL_RESTART_S = 1.0  # new connections within 1 s of the restart being up
GOAL_END_S = 10.0  # a closed connection must show within this bound (no hang)
# Bounded per connection while a stall lasts: the relay holds one read per direction (a
# pipe or a 64 KiB buffer), the bridge one message; 1 MiB leaves room for the allocator.
GOAL_STALL_KIB_PER_CONN = 1024


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="bench/soak_faults.py",
        description="Fault soak: kill -9 of the gateway with live kernel, proxy and bridge "
                    "streams (bytes lost, closes, time to work again after a restart), then "
                    "a guest service killed, its link cut, a guest and a client that stop "
                    "reading, through the proxy forward and the bridge. Run as root.",
        epilog="Progress goes to stderr; a table and PASS/MISS lines to stdout; JSON to "
               "bench/results/soak-faults-<UTC>.json. Exit 0 even on a MISS.")
    ap.add_argument("--quick", action="store_true",
                    help="20 kernel + 20 proxy + 3 bridge streams, 3 s stalls, 1 connection "
                         "per fault")
    ap.add_argument("--kernel", type=int, default=None, help="kernel streams (default 200)")
    ap.add_argument("--proxy", type=int, default=None, help="proxy streams (default 200)")
    ap.add_argument("--ws", type=int, default=None, help="bridge streams (default 20)")
    ap.add_argument("--fault-conns", type=int, default=None,
                    help="connections per fault and path (default 10, --quick 1)")
    ap.add_argument("--stall", type=float, default=None,
                    help="seconds a stall lasts (default 10, --quick 3)")
    ap.add_argument("--end-bound", type=float, default=GOAL_END_S,
                    help="seconds a client may wait for its end (default: %(default)s)")
    ap.add_argument("--guest-timeout", type=float, default=DEFAULT_GUEST_TIMEOUT,
                    help="the gateway's --guest-timeout: seconds before a silent guest is "
                         "given up (default: the gateway's, %(default)s)")
    ap.add_argument("--subnet", default="10.201.253.0/24",
                    help="the gateway's subnet (default: %(default)s)")
    ap.add_argument("--out-dir", type=Path, default=RESULTS_DIR,
                    help="where the JSON result goes (default: bench/results)")
    args = ap.parse_args(argv)
    q = args.quick
    args.kernel = args.kernel if args.kernel is not None else (20 if q else 200)
    args.proxy = args.proxy if args.proxy is not None else (20 if q else 200)
    args.ws = args.ws if args.ws is not None else (3 if q else 20)
    args.fault_conns = args.fault_conns if args.fault_conns is not None else (1 if q else 10)
    args.stall = args.stall if args.stall is not None else (3.0 if q else 10.0)
    if min(args.kernel, args.proxy, args.ws, args.fault_conns) < 1 or args.stall <= 0:
        ap.error("counts and --stall must be positive")
    return args


# -- judging -------------------------------------------------------------------------------------

def goals(res: dict[str, Any], args: argparse.Namespace) -> list[dict[str, Any]]:
    """The PASS/MISS lines."""
    out: list[dict[str, Any]] = []

    def line(what: str, ok: bool | None, value: str, target: str) -> None:
        out.append({"what": what, "value": value, "target": target,
                    "verdict": None if ok is None else ("PASS" if ok else "MISS")})

    k9 = res.get("kill9") or {}
    kinds = k9.get("kinds", {})
    kern = kinds.get("kernel", {})
    if kern:
        line("kill -9: kernel streams lose no byte", kern["lost_down_total"] == 0
             and kern["lost_up_total"] == 0 and kern["no_guest_report"] == 0
             and kern["bytes_out_of_sequence"] == 0,
             f"{kern['lost_down_total']}+{kern['lost_up_total']} B lost", "0 B")
        line("kill -9: kernel streams keep flowing",
             kern["flowing_after_kill"] == kern["conns"],
             f"{kern['flowing_after_kill']}/{kern['conns']}", "all")
    for kind in ("proxy", "ws"):
        k = kinds.get(kind, {})
        if k:
            line(f"kill -9: {kind} clients closed, none hung", k["hung"] == 0,
                 f"{k['ended']}/{k['conns']} in {fmt(k['end_after_kill_max_s'], '.2f')} s",
                 f"all <= {args.end_bound:g} s")
    restart = k9.get("restart", {})
    watch = restart.get("kernel_probes_failed")
    if watch:
        line("restart: no new kernel connection refused meanwhile", watch["failed"] == 0,
             f"{watch['failed']}/{watch['tries']} refused", "0")
    for kind in sc.KINDS:
        r = restart.get(kind)
        if r:
            v = r["works_after_ready_s"]
            line(f"restart: new {kind} connection after the ready line",
                 v is not None and v <= GOAL_RESTART_S,
                 f"{fmt(v, '+.2f')} s ({fmt(r['works_after_start_s'], '.2f')} s after start)",
                 f"<= {GOAL_RESTART_S:g} s")
    for f in res.get("faults", []):
        name = f"{f['fault']} via {f['kind']}"
        ended = sum(f["ends"].values()) - f["hung"] - f["ends"].get("gave up", 0)
        if f["fault"] != "client-stops-reading":
            line(f"{name}: client told (gateway ended it)",
                 f["hung"] == 0 and "gave up" not in f["ends"],
                 f"{ended}/{f['conns']} in {fmt(f['end_after_fault_max_s'], '.2f')} s",
                 f"<= {f['bound_s']:g} s")
        else:
            line(f"{name}: gateway lets go of the guest", f["guest_not_ended"] == 0,
                 f"{f['conns'] - f['guest_not_ended']}/{f['conns']} in "
                 f"{fmt(f['guest_saw_end_after_s'], '.2f')} s", f"<= {f['bound_s']:g} s")
        if "steady_growth_kib" in f["rss"]:
            growth = f["rss"]["steady_growth_kib"]
            per = growth / max(1, f["conns"])
            line(f"{name}: RSS flat while stalled", per <= GOAL_STALL_KIB_PER_CONN,
                 f"{per:.0f} KiB/conn", f"<= {GOAL_STALL_KIB_PER_CONN} KiB/conn")
        if f["gateway_tracebacks"]:
            line(f"{name}: no traceback in the gateway's log", False,
                 f"{len(f['gateway_tracebacks'])} lines", "none")
    if k9.get("gateway_tracebacks"):
        line("kill -9: no traceback in the gateway's log", False,
             f"{len(k9['gateway_tracebacks'])} lines", "none")
    return out


def render(res: dict[str, Any], lines: list[dict[str, Any]]) -> str:
    """Tables and PASS/MISS lines, as printed."""
    rows: list[tuple[str, ...]] = [("kill -9", "conns", "ends", "end max s", "lost down B",
                                    "lost up B", "flowing after kill", "after restart")]
    for kind, k in (res.get("kill9") or {}).get("kinds", {}).items():
        rows.append((kind, str(k["conns"]), ", ".join(f"{n} {e}" for e, n in k["ends"].items()),
                     fmt(k["end_after_kill_max_s"], ".2f"), str(k["lost_down_total"]),
                     str(k["lost_up_total"]), str(k["flowing_after_kill"]),
                     str(k.get("flowing_after_restart", "—"))))
    out = _table(rows)
    restart = (res.get("kill9") or {}).get("restart", {})
    if restart:
        out.append("")
        watch = restart["kernel_probes_failed"]
        out.append(f"restart: ready line {restart['ready_line_after_start_s']:.2f} s after "
                   f"the process started; kernel forward: {watch['failed']} of "
                   f"{watch['tries']} new connections refused meanwhile; a new connection "
                   "worked, after start / after the ready line:")
        for kind in sc.KINDS:
            r = restart[kind]
            out.append(f"  {kind:<7} {fmt(r['works_after_start_s'], '.3f')} s / "
                       f"{fmt(r['works_after_ready_s'], '+.3f')} s ({r['probes']} probes)")
    rows = [("fault", "via", "conns", "client saw", "end s", "guest saw", "RSS growth KiB",
             "gateway counted")]
    for f in res.get("faults", []):
        guest = ", ".join(sorted(set((f.get("guest_saw_end") or {}).values()))) or "—"
        rss = f["rss"]
        growth = rss.get("steady_growth_kib", rss.get("growth_kib"))
        family = "sandport_forward_" if f["kind"] == "proxy" else "sandport_ws_"
        counted = ", ".join(f"{_short(k)} {v:g}" for k, v in f["metrics"].items()
                            if k.startswith(family) and ("failures" in k or "closes" in k
                                                         or "active" in k))
        rows.append((f["fault"], f["kind"], str(f["conns"]),
                     ", ".join(f"{n}× {e}" for e, n in f["ends"].items()),
                     fmt(f["end_after_fault_max_s"], ".2f"), guest, fmt(growth, ".0f"),
                     counted or "—"))
    out += ["", *_table(rows), ""]
    width = max((len(x["what"]) for x in lines), default=0)
    for x in lines:
        out.append(f"{x['what'].ljust(width)}  {x['value']:>28}  (goal {x['target']})  "
                   f"{x['verdict'] or ''}".rstrip())
    return "\n".join(out)


def _short(key: str) -> str:
    """A metric sample, short: name without prefix and the telling label."""
    name = key.split("{", 1)[0].removeprefix("sandport_")
    labels = key.split("{", 1)[1] if "{" in key else ""
    for part in labels.rstrip("}").split(","):
        if part.startswith("reason="):
            return f"{name}[{part.split('=', 1)[1].strip(chr(34))}]"
    return name


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = []
    for i, row in enumerate(rows):
        out.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        if i == 0:
            out.append("  ".join("-" * w for w in widths))
    return out


# -- run -------------------------------------------------------------------------------------

async def scenarios(bed: Bed, args: argparse.Namespace, res: dict[str, Any]) -> None:
    """Faults first (on the fresh gateway), kill -9 last (it ends that gateway's life)."""
    res["faults"] = []
    for what in sc.FAULTS:  # both paths at once: one fault, one wait
        progress(f"fault {what} via proxy and ws ...")
        # A guest gone silent (link cut, window closed) is given up after
        # the gateway's --guest-timeout: wait that long and a little more.
        bound = args.end_bound if what in ("guest-killed", "client-stops-reading") else \
            max(args.end_bound, args.guest_timeout + 10)
        found = await sc.fault(bed, ("proxy", "ws"), what, conns=args.fault_conns,
                               stall=args.stall, end_bound=bound, log=progress)
        res["faults"] += found
        for f in found:
            progress(f"fault {what} via {f['kind']}: client {f['ends']}")
    progress(f"kill -9 with {args.kernel} kernel, {args.proxy} proxy, {args.ws} bridge "
             "streams ...")
    res["kill9"] = await sc.kill9(
        bed, counts={"kernel": args.kernel, "proxy": args.proxy, "ws": args.ws},
        end_bound=args.end_bound, log=progress)


def run(args: argparse.Namespace) -> int:
    started = dt.datetime.now(dt.UTC)
    machine = report.machine_info(("uvloop", "websockets", "sandport"))
    res: dict[str, Any] = {}
    result_path: Path | None = None
    errors: list[str] = []
    with tempfile.TemporaryDirectory(prefix=testbed.LOGDIR_PREFIX) as tmp:
        bed = Bed(Path(tmp), bridge=f"sp-soakf{secrets.token_hex(2)}", subnet=args.subnet,
                  listen_port=testbed.free_port(), kernel_port=testbed.free_port(),
                  proxy_port=testbed.free_port(), log=progress,
                  extra=("--guest-timeout", f"{args.guest_timeout:g}"))
        try:
            bed.create()
            asyncio.run(scenarios(bed, args, res))
            lines = goals(res, args)
            print(render(res, lines), flush=True)
            doc = {"bench": "soak-faults",
                   "timestamp": started.strftime("%Y-%m-%dT%H:%M:%SZ"),
                   "duration_s": round(testbed.elapsed(), 1),
                   "config": {k: (str(v) if isinstance(v, Path) else v)
                              for k, v in vars(args).items()},
                   "machine": machine, "goals": lines, **res,
                   "notes": [
                       "lost: bytes one side's application wrote that the other side's "
                       "application never read (guest's own report vs the client's count)",
                       "proxy forward on [::1] (auto mode: kernel forwards are IPv4 only), "
                       "kernel forward on 127.0.0.1, both to guest port 7000",
                       "RSS: VmRSS of the gateway process sampled every 0.1 s; "
                       "steady_growth_kib counts from 1 s after a stall began",
                       "figures from a shared 2-core machine: noisy"]}
            args.out_dir.mkdir(parents=True, exist_ok=True)
            result_path = args.out_dir / \
                f"soak-faults-{started.strftime('%Y%m%dT%H%M%SZ')}.json"
            result_path.write_text(report.to_json(doc))
        except KeyboardInterrupt as exc:
            progress(f"interrupted ({exc or 'SIGINT'}); tearing down, no result written")
            return 130
        except Exception as exc:  # a setup failure is reported, then torn down
            progress(f"soak failed: {type(exc).__name__}: {exc}")
            return 1
        finally:
            testbed.protect_teardown()
            progress("teardown ...")
            errors = bed.teardown()
            for err in errors:
                progress(f"teardown: {err}")
    if result_path is not None:
        print(f"\nwrote {result_path}", flush=True)
    return 1 if errors else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("soak_faults: must run as root (it runs `sandport up`: namespaces, a bridge, "
              "nftables): sudo make soak", file=sys.stderr)
        return 2
    missing = [t for t in REQUIRED_TOOLS if shutil.which(t) is None]
    if missing:
        print(f"soak_faults: missing {', '.join(missing)}: run `make setup`",
              file=sys.stderr)
        return 2
    testbed.interrupt_on_signals()
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
