"""The soak's gateway: `sandport up` as a subprocess, as a user runs it, and what it costs.

:class:`UpProcess` starts ``sandport up`` with its own state dir, bridge, subnet and listen
address (optionally under ``prlimit``, which the run then says), reads its API address
from the state dir, and stops it with SIGTERM (the gateway removes every sandbox, link and
rule it made). If it does not stop, it is killed and started once more on the same state
dir, which adopts or removes what the killed one left, and stopped again.
:func:`leftovers` then lists anything still there.

The samplers read /proc: a process's RSS, PSS, open descriptors and limits; the kernel's
slab and socket memory; the gateway's ``/metrics`` as (name, labels, value) samples.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from testbed import BenchError, Proc, sh

from sandport.client import ApiError, Client

START_TIMEOUT = 90.0
STOP_TIMEOUT = 60.0
_DESCRIPTORS_LINE = re.compile(r"descriptors: (\d+) \((?:[^;)]*; )?about (\d+) connections")
_SAMPLE = re.compile(r'^(\w+)(?:\{(.*)\})? (\S+)$')
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


@dataclass(frozen=True, slots=True)
class ProcSample:
    """One process at one moment (KiB, counts)."""

    pid: int
    alive: bool
    rss_kib: int | None = None
    pss_kib: int | None = None
    fds: int | None = None
    nofile_soft: int | None = None
    nofile_hard: int | None = None

    def as_dict(self) -> dict[str, Any]:
        """For the JSON."""
        return asdict(self)


def _kib(text: str, key: str) -> int | None:
    m = re.search(rf"^{key}:\s+(\d+) kB", text, re.MULTILINE)
    return int(m.group(1)) if m else None


def sample_process(pid: int) -> ProcSample:
    """RSS (VmRSS), PSS (smaps_rollup), open descriptors and RLIMIT_NOFILE of ``pid``."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
        fds = len(os.listdir(f"/proc/{pid}/fd"))
        limits = Path(f"/proc/{pid}/limits").read_text()
    except OSError:
        return ProcSample(pid=pid, alive=False)
    m = re.search(r"^Max open files\s+(\S+)\s+(\S+)", limits, re.MULTILINE)
    soft = hard = None
    if m:
        soft, hard = (int(v) if v.isdigit() else None for v in m.groups())
    return ProcSample(pid=pid, alive=True, rss_kib=_kib(status, "VmRSS"),
                      pss_kib=_kib(rollup, "Pss"), fds=fds, nofile_soft=soft,
                      nofile_hard=hard)


def sockstat(netns: str | None = None) -> dict[str, int]:
    """TCP counters of /proc/net/sockstat (``inuse``, ``orphan``, ``tw``, ``alloc`` are the
    namespace's; ``mem`` is pages for all of TCP, host-wide)."""
    if netns is None:
        text = Path("/proc/net/sockstat").read_text()
    else:
        text = sh(["ip", "netns", "exec", netns, "cat", "/proc/net/sockstat"], check=False)
    for line in text.splitlines():
        if line.startswith("TCP:"):
            parts = line.split()[1:]
            return {k: int(v) for k, v in zip(parts[::2], parts[1::2], strict=False)}
    return {}


def listen_overflows(netns: str | None = None) -> int | None:
    """TcpExt ListenOverflows of a namespace (host: None): connections a listener's full
    accept queue dropped; the client then waits for SYN-ACK retransmits (1, 2, 4 ... s)."""
    if netns is None:
        text = Path("/proc/net/netstat").read_text()
    else:
        text = sh(["ip", "netns", "exec", netns, "cat", "/proc/net/netstat"], check=False)
    lines = [ln.split() for ln in text.splitlines() if ln.startswith("TcpExt:")]
    if len(lines) == 2 and "ListenOverflows" in lines[0]:
        return int(lines[1][lines[0].index("ListenOverflows")])
    return None


def listen_backlog(netns: str | None, port: int) -> int | None:
    """The accept-queue size a listener on ``port`` asked for (``ss``'s Send-Q)."""
    argv = ["ss", "-Hltn", f"sport = :{port}"]
    out = sh(["ip", "netns", "exec", netns, *argv] if netns else argv, check=False)
    sizes = [int(f[2]) for f in (ln.split() for ln in out.splitlines())
             if len(f) >= 3 and f[2].isdigit()]
    return min(sizes) if sizes else None


def kernel_sample() -> dict[str, int | None]:
    """Host-wide kernel memory: Slab and SUnreclaim (KiB), TCP socket memory (KiB)."""
    meminfo = Path("/proc/meminfo").read_text()
    tcp = sockstat()
    page_kib = os.sysconf("SC_PAGE_SIZE") // 1024
    return {"slab_kib": _kib(meminfo, "Slab"), "sunreclaim_kib": _kib(meminfo, "SUnreclaim"),
            "tcp_mem_kib": tcp["mem"] * page_kib if "mem" in tcp else None,
            "tcp_inuse_host_ns": tcp.get("inuse")}


def parse_metrics(text: str) -> list[tuple[str, dict[str, str], float]]:
    """Prometheus text exposition as (name, labels, value) samples."""
    out = []
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if not m or line.startswith("#"):
            continue
        with contextlib.suppress(ValueError):
            out.append((m.group(1), dict(_LABEL.findall(m.group(2) or "")),
                        float(m.group(3))))
    return out


class UpProcess:
    """`sandport up` (proxy forwards) as a subprocess with its own names.

    Args:
        workdir: where its output goes (``gateway.out``).
        nofile: run it under ``prlimit --nofile=N:N`` (soft and hard); None: as a user's
            plain `sandport up` gets it.
        metrics_timeout: /metrics must answer within this (a gateway out of descriptors
            may not accept at all).
    """

    def __init__(self, *, state_dir: Path, bridge: str, subnet: str, listen: str,
                 workdir: Path, nofile: int | None = None,
                 metrics_timeout: float = 10.0) -> None:
        self.metrics_timeout = metrics_timeout
        self.state_dir = state_dir
        self.bridge = bridge
        self.argv = [sys.executable, "-m", "sandport", "up", "--forward-mode", "proxy",
                     "--state-dir", str(state_dir), "--bridge", bridge, "--subnet", subnet,
                     "--listen", listen, "--vnc-port", "0"]
        if nofile is not None:
            self.argv = ["prlimit", f"--nofile={nofile}:{nofile}", "--", *self.argv]
        self.workdir = workdir
        self.proc: Proc | None = None
        self.api: Client | None = None
        self.sandbox_ids: list[str] = []
        self.metrics_errors: list[str] = []

    @property
    def pid(self) -> int:
        """The gateway's pid (prlimit execs it: the same pid)."""
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> Client:
        """Start it and wait until it serves its API; raise :class:`BenchError`."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.proc = Proc("gateway", self.argv, self.workdir / "gateway.out").start()
        self.proc.wait_for(r"Press Ctrl-C", timeout=START_TIMEOUT)
        self.api = Client.from_state_dir(self.state_dir)
        return self.api

    def descriptor_line(self) -> tuple[int, int] | None:
        """(limit, relayed connections) from the gateway's own log line, once said."""
        with contextlib.suppress(OSError):
            m = _DESCRIPTORS_LINE.search((self.state_dir / "gateway.log").read_text())
            if m:
                return int(m.group(1)), int(m.group(2))
        return None

    def metrics(self) -> list[tuple[str, dict[str, str], float]]:
        """Its /metrics now; empty (and the reason kept in ``metrics_errors``) when it does
        not answer within ``metrics_timeout`` seconds."""
        assert self.api is not None
        quick = Client(self.api.url, self.api.admin_token, timeout=self.metrics_timeout)
        try:
            return parse_metrics(quick.call("GET", "/metrics")[0].decode())
        except ApiError as exc:
            self.metrics_errors.append(f"{time.strftime('%H:%M:%S')} {exc}")
            return []

    def stop(self) -> list[str]:
        """SIGTERM, wait; if it does not stop: SIGKILL and a recovering start + stop.

        Returns what went wrong (empty: it stopped and removed its sandboxes itself).
        """
        errors: list[str] = []
        if self.proc is None or not self.proc.alive():
            return errors
        popen = self.proc.popen
        assert popen is not None
        popen.send_signal(signal.SIGTERM)
        try:
            rc = popen.wait(timeout=STOP_TIMEOUT)
            if rc != 0:
                errors.append(f"gateway exited {rc} on SIGTERM: {self.proc.log_tail()}")
            return errors
        except subprocess.TimeoutExpired:
            errors.append(f"gateway did not stop within {STOP_TIMEOUT:g} s of SIGTERM; "
                          "killed, leftovers removed by a recovering start")
        self.proc.stop()  # SIGKILL after its grace
        again = Proc("gateway-recover", self.argv, self.workdir / "gateway-recover.out")
        try:
            again.start().wait_for(r"Press Ctrl-C", timeout=START_TIMEOUT)
            assert again.popen is not None
            again.popen.send_signal(signal.SIGTERM)
            again.popen.wait(timeout=STOP_TIMEOUT)
        except (BenchError, subprocess.TimeoutExpired) as exc:
            errors.append(f"recovering start: {exc}")
        finally:
            again.stop()
        return errors

    def leftovers(self) -> list[str]:
        """Namespaces, links and nft chains of this gateway that are still there."""
        out = []
        netns = sh(["ip", "netns", "list"], check=False)
        for sid in self.sandbox_ids:
            if re.search(rf"^sp-{sid}\b", netns, re.MULTILINE):
                out.append(f"netns sp-{sid}")
        links = sh(["ip", "-o", "link", "show"], check=False)
        out += [f"link {m}" for m in re.findall(rf"^\d+: ({self.bridge}\S*?)[:@]", links,
                                                 re.MULTILINE)]
        rules = sh(["nft", "list", "tables"], check=False)
        for table in rules.splitlines():
            family_table = table.split()[1:]
            if len(family_table) == 2 and family_table[1] == "sandport":
                text = sh(["nft", "list", "table", *family_table], check=False)
                if re.search(rf"\b\w+-{re.escape(self.bridge)}\b", text):
                    out.append(f"nft chains of {self.bridge} in {' '.join(family_table)}")
        for sid in self.sandbox_ids:
            pids = sh(["pgrep", "-f", f"sp-{sid}"], check=False).split()
            out += [f"process {p} (sp-{sid})" for p in pids if int(p) != os.getpid()]
        return out


async def wait_until(check: Callable[[], bool], timeout: float,
                     interval: float = 0.2) -> bool:
    """Poll ``check()`` until it is true or ``timeout`` seconds passed; its last answer."""
    deadline = time.monotonic() + timeout
    while True:
        if check():
            return True
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(interval)
