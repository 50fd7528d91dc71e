"""Guest processes of a netns sandbox: start inside it, stop them, find strays.

Every process is started in a session of its own (a Ctrl-C at the gateway's terminal does
not hit guests directly; the gateway stops them in order): by default ``crun exec``'d into
the sandbox's container (:func:`spawn_contained`, see :mod:`sandport.sandbox.crun`), in the
``host-root-UNSAFE`` mode through :mod:`sandport.sandbox.nsexec` (:func:`spawn`).
Guests outlive a gateway killed with ``kill -9``: each is known by pid *and* start time
(:func:`start_time`), so the next gateway adopts exactly the processes it started
(:meth:`GuestProcess.adopted`), never a recycled pid. Whatever escapes (a child of a
child) is still found by its network namespace: :func:`pids_in_netns` reads ``/proc/*/ns/net``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

from sandport.net.netlink import netns_inode
from sandport.sandbox.crun import Crun

log = logging.getLogger(__name__)

NSEXEC = Path(__file__).with_name("nsexec.py")
STOP_GRACE = 2.0


@dataclass(slots=True)
class GuestProcess:
    """A running guest program and where its output goes.

    ``process`` is the asyncio handle when this gateway started it; None for a process
    adopted from a gateway that died (then ``pid`` and ``started`` identify it).
    """

    name: str
    pid: int
    started: int
    log_path: Path
    essential: bool = False
    process: asyncio.subprocess.Process | None = None

    @property
    def running(self) -> bool:
        """True while the program has not exited."""
        if self.process is not None:
            return self.process.returncode is None
        return _alive(self.pid) and start_time(self.pid) == self.started

    @property
    def returncode(self) -> int | None:
        """Its exit status (None while it runs, and for an adopted process: unknown)."""
        return self.process.returncode if self.process is not None else None

    def record(self) -> dict[str, object]:
        """What :meth:`adopted` needs to find this process again."""
        return {"name": self.name, "pid": self.pid, "started": self.started,
                "log": str(self.log_path), "essential": self.essential}

    @classmethod
    def adopted(cls, doc: dict[str, object]) -> GuestProcess | None:
        """The process a :meth:`record` names, if it still runs (same pid, same start)."""
        try:
            pid, started = int(str(doc["pid"])), int(str(doc["started"]))
            proc = cls(name=str(doc["name"]), pid=pid, started=started,
                       log_path=Path(str(doc["log"])), essential=bool(doc["essential"]))
        except (KeyError, ValueError):
            return None
        return proc if proc.running else None

    def log_tail(self, limit: int = 800) -> str:
        """The last ``limit`` characters the program printed, for error messages."""
        try:
            data = self.log_path.read_bytes()[-limit:]
        except OSError:
            return ""
        return data.decode(errors="replace").strip()


async def spawn(
    *,
    name: str,
    argv: list[str],
    netns: str,
    tmpdir: Path,
    log_dir: Path,
    env: dict[str, str],
    essential: bool = False,
) -> GuestProcess:
    """Start ``argv`` inside the sandbox; stdout and stderr go to ``log_dir/name.log``."""
    log_path = log_dir / f"{name}.log"
    with open(log_path, "ab") as out:  # noqa: ASYNC230 - opening a local log file is instant
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-I",
            "-S",
            str(NSEXEC),
            netns,
            str(tmpdir),
            "--",
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            env=env,
            start_new_session=True,
        )
    log.debug("%s: started %s pid %d", netns, name, process.pid)
    return GuestProcess(name=name, pid=process.pid, started=start_time(process.pid) or 0,
                        log_path=log_path, essential=essential, process=process)


async def spawn_contained(
    *,
    name: str,
    runtime: Crun,
    container: str,
    process: dict[str, object],
    doc: Path,
    log_dir: Path,
    essential: bool = False,
) -> GuestProcess:
    """Start OCI ``process`` in ``container``; stdout and stderr go to ``log_dir/name.log``.

    The program is not this process's child (crun detaches it; the container's init or
    the host's reaps it), so it is known by pid and start time from the start.
    """
    log_path = log_dir / f"{name}.log"
    pid = await runtime.exec(container, process, doc=doc, log_path=log_path)
    log.debug("%s: started %s pid %d", container, name, pid)
    return GuestProcess(name=name, pid=pid, started=start_time(pid) or 0, log_path=log_path,
                        essential=essential)


async def terminate(proc: GuestProcess, *, grace: float = STOP_GRACE) -> None:
    """SIGTERM the program's process group, SIGKILL it after ``grace`` seconds."""
    if not proc.running:
        return
    try:  # its own session's group: crun exec makes one led by a pid that is gone
        group = os.getpgid(proc.pid)
    except ProcessLookupError:
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, sig)
        try:
            await asyncio.wait_for(wait_exit(proc), grace)
            return
        except TimeoutError:
            log.warning("%s (pid %d) ignored %s", proc.name, proc.pid, sig.name)
    await wait_exit(proc)


async def wait_exit(proc: GuestProcess) -> None:
    """Until ``proc`` has exited (our child: waited for; adopted: polled)."""
    if proc.process is not None:
        await proc.process.wait()
        return
    while proc.running:  # not our child: poll (its parent, or init, reaps it)
        await asyncio.sleep(0.02)


def pids_in_netns(netns: str) -> list[int]:
    """PIDs of every process whose network namespace is the named one."""
    target = netns_inode(netns)
    if target is None:
        return []
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            st = os.stat(f"/proc/{entry}/ns/net")
        except OSError:
            continue
        if (st.st_dev, st.st_ino) == target:
            pids.append(int(entry))
    return pids


async def kill_netns_processes(netns: str, *, timeout: float = 3.0) -> int:
    """SIGKILL every process inside ``netns`` and wait until they are gone.

    Returns the number of processes killed. Zombies of our own children are reaped by
    asyncio's child watcher; others by their parents. A process stuck in the kernel
    (state D) is reported but does not block the caller past ``timeout``.
    """
    pids = pids_in_netns(netns)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while (alive := [p for p in pids if _alive(p)]) and loop.time() < deadline:
        await asyncio.sleep(0.02)
    if alive:
        log.warning("%s: processes %s did not die after SIGKILL", netns, alive)
    return len(pids)


def start_time(pid: int) -> int | None:
    """When ``pid`` started, in clock ticks since boot (``/proc/PID/stat`` field 22)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in (b"Z", b"X")
