"""Create -> ready, median of N, for each kind of sandbox (``make bench`` runs it).

"Ready" is sandport's own: the guest answered its protocol through the user's path (a
desktop: RFB to ServerInit through the host forward *and* the WebSocket bridge; an HTTP
service: a GET through its forward). Kinds: a netns desktop, a qemu echo VM and a qemu
desktop VM (QEMU under TCG on these machines: no usable KVM). Targets from the issue:
qemu echo <= 5 s, qemu desktop <= 10 s (TCG). One gateway, one sandbox at a time, its own
state dir, bridge (sp-bench-r*) and subnet in 10.201.0.0/16; everything removed at the end.

    sudo .venv/bin/python bench/ready.py [--rounds 3] [--kinds netns-desktop,qemu-echo,...]
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from report import REPO, fmt, machine_info, median

from sandport.config import GatewayConfig, NetConfig
from sandport.control.gateway import Gateway
from sandport.sandbox import images

KINDS = {  # name: (backend, profile, target seconds or None)
    "netns-desktop": ("netns", "desktop", None),
    "qemu-echo": ("qemu", "echo", 5.0),
    "qemu-desktop": ("qemu", "desktop", 10.0),
}
SUBNET = ipaddress.IPv4Network("10.201.251.0/24")
BRIDGE = "sp-bench-r0"


async def measure(kinds: list[str], rounds: int, state_dir: Path) -> dict[str, list[float]]:
    """Seconds from create_sandbox() to its return (proven ready), per kind."""
    config = GatewayConfig(listen_port=0, state_dir=state_dir,
                           net=NetConfig(bridge=BRIDGE, subnet=SUBNET), ready_timeout=120.0)
    times: dict[str, list[float]] = {k: [] for k in kinds}
    async with Gateway(config) as gw:
        for kind in kinds:
            backend, profile, _ = KINDS[kind]
            if backend == "qemu":  # the image is built once, before the clock runs
                print(f"  {kind}: image {profile} ...", flush=True)
                await asyncio.to_thread(images.build_image, profile, config.image_cache)
            for n in range(rounds):
                t0 = time.perf_counter()
                info = await gw.create_sandbox(backend=backend, profile=profile)
                times[kind].append(time.perf_counter() - t0)
                print(f"  {kind} #{n + 1}: ready in {times[kind][-1]:.2f} s", flush=True)
                await gw.destroy_sandbox(info.id)
    return times


def main(argv: list[str] | None = None) -> int:
    """Run, print a table with the targets, write bench/results/ready-<time>.json."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--kinds", default=",".join(KINDS),
                   help=f"comma-separated: {', '.join(KINDS)}")
    args = p.parse_args(argv)
    kinds = [k for k in args.kinds.split(",") if k]
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        print(f"ready: unknown kinds {unknown}; known: {', '.join(KINDS)}", file=sys.stderr)
        return 2
    if os.geteuid() != 0:
        print("ready: must run as root (namespaces, bridges, TAP): sudo make bench",
              file=sys.stderr)
        return 2
    if any(KINDS[k][0] == "qemu" for k in kinds) and not shutil.which("qemu-system-x86_64"):
        print("ready: qemu-system-x86_64 missing: apt-get install qemu-system-x86 (or run "
              "`make setup`)", file=sys.stderr)
        return 2
    state_dir = Path(tempfile.mkdtemp(prefix="sp-bench-ready-"))
    try:
        times = asyncio.run(measure(kinds, args.rounds, state_dir))
    finally:
        shutil.rmtree(state_dir, ignore_errors=True)
    print(f"\ncreate -> ready, median of {args.rounds} (s):")
    rows = []
    for kind in kinds:
        med = median(list(times[kind]))
        target = KINDS[kind][2]
        verdict = "" if target is None or med is None else (
            f"target <= {target:g} s {'PASS' if med <= target else 'MISS'}")
        rows.append({"kind": kind, "median_s": med, "runs_s": times[kind], "target_s": target})
        print(f"  {kind:<14} {fmt(med, '6.2f')}   runs {', '.join(f'{t:.2f}' for t in times[kind])}"
              f"   {verdict}")
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    out = REPO / "bench" / "results" / f"ready-{stamp}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"rows": rows, "machine": machine_info(("sandport",))}, indent=2))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
