"""``make fuzz``: every target of ``fuzz/targets.py`` under atheris, a million inputs each.

    .venv/bin/python fuzz/run.py                      # all targets, 10**6 inputs each
    .venv/bin/python fuzz/run.py --runs 20000 rfb     # one target, a short run
    .venv/bin/python fuzz/run.py --help

Each target runs as its own libFuzzer process (``fuzz/harness.py``), ``--jobs`` at a time
(2: one per core here), coverage-guided, starting from its committed seed corpus
(``fuzz/corpus/<target>/``, read only: new inputs go to a scratch directory), with a
per-input timeout (``--timeout``): an input that runs longer is a hang. A crash or a hang
writes the input to ``--artifacts`` (``fuzz/artifacts/``, not committed) and stops that
target. Prints per target the inputs run, exec/s, coverage (libFuzzer's ``cov`` edges and
``ft`` features), corpus size, crashes and hangs, then one PASS/MISS line against
"at least --goal inputs, 0 crashes, 0 hangs", and writes the figures as JSON to
``bench/results/fuzz-<UTC timestamp>.json``. Exit status 1 on any crash, hang or MISS, 2 for
bad arguments or a missing atheris.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:0] = [str(HERE), str(REPO / "bench")]

import report  # noqa: E402 - bench/report.py: machine_info() and to_json() of the benches

TARGET_NAMES = ("rfb", "rfbwatch", "proxyproto", "wsframes", "packets", "tokenfile", "http1",
                "rewrite")
GOAL = 1_000_000
_STAT = re.compile(rb"^stat::(\w+):\s+(\d+)", re.M)
_COV = re.compile(rb"cov: (\d+) ft: (\d+) corp: (\d+)/")


@dataclass
class Outcome:
    """One target's run."""

    target: str
    runs: int
    seconds: float
    exec_per_s: float
    cov: int | None
    ft: int | None
    corpus: int | None
    seeds: int
    crashes: int
    hangs: int
    exit_code: int
    artifact: str | None
    verdict: str = ""


def run_target(target: str, args: argparse.Namespace, scratch: Path) -> Outcome:
    seeds = HERE / "corpus" / target
    work = scratch / target
    work.mkdir(parents=True, exist_ok=True)
    args.artifacts.mkdir(parents=True, exist_ok=True)
    prefix = args.artifacts / f"{target}-"
    before = set(args.artifacts.glob(f"{target}-*"))
    cmd = [sys.executable, str(HERE / "harness.py"), target, f"-runs={args.runs}",
           f"-timeout={args.timeout}", f"-max_len={args.max_len}", "-print_final_stats=1",
           f"-artifact_prefix={prefix}", f"-rss_limit_mb={args.rss_limit_mb}", str(work),
           str(seeds)]
    started = time.monotonic()
    with open(scratch / f"{target}.log", "wb") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, check=False)
    seconds = time.monotonic() - started
    out = (scratch / f"{target}.log").read_bytes()
    stats = {k.decode(): int(v) for k, v in _STAT.findall(out)}
    cov = _COV.findall(out)
    hang = proc.returncode == 70 or b"libFuzzer: timeout" in out
    crash = proc.returncode != 0 and not hang
    new = sorted(set(args.artifacts.glob(f"{target}-*")) - before)
    if proc.returncode != 0:
        tail = out.decode(errors="replace").splitlines()[-25:]
        print(f"--- {target}: exit {proc.returncode}; the end of its log:", *tail, sep="\n  ",
              flush=True)
    runs = stats.get("number_of_executed_units", 0)
    return Outcome(
        target=target, runs=runs, seconds=round(seconds, 1),
        exec_per_s=round(runs / seconds if seconds else 0.0, 1),
        cov=int(cov[-1][0]) if cov else None, ft=int(cov[-1][1]) if cov else None,
        corpus=int(cov[-1][2]) if cov else None, seeds=len(list(seeds.iterdir())),
        crashes=int(crash), hangs=int(hang), exit_code=proc.returncode,
        artifact=str(new[0]) if new else None,
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("targets", nargs="*", help=f"targets (default: all: {' '.join(TARGET_NAMES)})")
    ap.add_argument("--runs", type=int, default=GOAL, help="inputs per target (default 10**6)")
    ap.add_argument("--goal", type=int, default=GOAL, help="inputs a target must run to PASS")
    ap.add_argument("--jobs", type=int, default=2, help="targets run at once (default 2)")
    ap.add_argument("--timeout", type=int, default=10,
                    help="seconds one input may take before it counts as a hang (default 10)")
    ap.add_argument("--max-len", type=int, default=4096, help="longest input (default 4096)")
    ap.add_argument("--rss-limit-mb", type=int, default=2048)
    ap.add_argument("--artifacts", type=Path, default=HERE / "artifacts",
                    help="where crashing and hanging inputs go (default fuzz/artifacts)")
    ap.add_argument("--out-dir", type=Path, default=REPO / "bench" / "results",
                    help="where the JSON result goes (default bench/results)")
    ap.add_argument("--no-json", action="store_true", help="print only")
    args = ap.parse_args()
    targets = args.targets or list(TARGET_NAMES)
    unknown = [t for t in targets if t not in TARGET_NAMES]
    if unknown:
        print(f"fuzz: unknown target(s) {' '.join(unknown)}; known: {' '.join(TARGET_NAMES)}",
              file=sys.stderr)
        return 2
    if importlib.util.find_spec("atheris") is None:
        print("fuzz: atheris is not installed (make setup installs it)", file=sys.stderr)
        return 2
    started = dt.datetime.now(dt.UTC)
    machine = report.machine_info(("atheris", "hypothesis"))
    print(f"fuzz: {len(targets)} target(s), {args.runs} inputs each, {args.jobs} at a time, "
          f"timeout {args.timeout} s per input", flush=True)
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="sandport-fuzz-") as tmp, \
            ThreadPoolExecutor(args.jobs) as pool:
        futures = [pool.submit(run_target, t, args, Path(tmp)) for t in targets]
        outcomes = []
        for future in futures:
            o = future.result()
            ok = o.runs >= args.goal and not o.crashes and not o.hangs
            o.verdict = "PASS" if ok else "MISS"
            outcomes.append(o)
            print(f"{o.target}: {o.runs} inputs in {o.seconds:.0f} s ({o.exec_per_s:.0f}/s), "
                  f"cov {o.cov} ft {o.ft}, corpus {o.seeds} seeds -> {o.corpus}, "
                  f"crashes {o.crashes} hangs {o.hangs}", flush=True)
    wall = time.monotonic() - t0
    print()
    print(f"{'target':<11} {'inputs':>9} {'exec/s':>7} {'cov':>5} {'ft':>6} {'corpus':>7} "
          f"{'crashes':>7} {'hangs':>5}")
    for o in outcomes:
        print(f"{o.target:<11} {o.runs:>9} {o.exec_per_s:>7.0f} {o.cov or 0:>5} {o.ft or 0:>6} "
              f"{o.corpus or 0:>7} {o.crashes:>7} {o.hangs:>5}")
    print()
    for o in outcomes:
        why = f" (artifact: {o.artifact})" if o.artifact else ""
        print(f"{o.verdict} {o.target}: {o.runs} >= {args.goal} inputs, {o.crashes} crashes, "
              f"{o.hangs} hangs{why}")
    print(f"wall time {wall:.0f} s for {sum(o.runs for o in outcomes)} inputs "
          f"({args.jobs} at a time)")
    if not args.no_json:
        result = {
            "kind": "fuzz",
            "timestamp": started.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "machine": machine,
            "settings": {"runs": args.runs, "goal": args.goal, "jobs": args.jobs,
                         "timeout_s": args.timeout, "max_len": args.max_len},
            "wall_seconds": round(wall, 1),
            "targets": [asdict(o) for o in outcomes],
            "pass": all(o.verdict == "PASS" for o in outcomes),
        }
        args.out_dir.mkdir(parents=True, exist_ok=True)
        path = args.out_dir / f"fuzz-{started.strftime('%Y%m%dT%H%M%SZ')}.json"
        path.write_text(report.to_json(result))
        print(f"wrote {path.relative_to(REPO) if path.is_relative_to(REPO) else path}")
    return 0 if all(o.verdict == "PASS" for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
