"""Running a sandbox's container with crun: bundles, ``run``, ``exec``, ``delete``, id slots.

Owns the host side of :mod:`sandport.sandbox.container`: the shared read-only root of
mount points (``/run/sandport/rootfs``), the per-gateway crun state (``--root
/run/sandport/crun/<hash of the state dir>``), each sandbox's bundle and process documents
(in its workdir, host-only), and the allocation of host uid/gid ranges: one file per slot
in ``/run/sandport/idmap`` naming the network namespace (or, for a VM's QEMU, the TAP
device) that holds it, so two sandboxes (of any gateway on the host) never share a range,
and a slot whose holder is gone is reused. It decides nothing about what runs in a
sandbox (that is netns.py's).

crun runs with ``--cgroup-manager=disabled``: sandport sets no resource limits, so a
container leaves no cgroup behind. On a host whose cgroup v2 hierarchy is mounted beside
v1 with controllers in it (hybrid mode, which crun 1.8 refuses), crun is started through
:mod:`sandport.sandbox.nsexec` in a private mount namespace that does not see that mount.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import sys
from pathlib import Path
from typing import IO

from sandport.errors import SandboxFailed
from sandport.sandbox import container

log = logging.getLogger(__name__)

RUN_DIR = Path("/run/sandport")
ROOTFS = RUN_DIR / "rootfs"
IDMAP_DIR = RUN_DIR / "idmap"
NSEXEC = Path(__file__).with_name("nsexec.py")
HYBRID_UNIFIED = Path("/sys/fs/cgroup/unified")
CRUN_TIMEOUT = 20.0


def state_root(state_dir: Path) -> Path:
    """The crun ``--root`` of the gateway that owns ``state_dir``."""
    digest = hashlib.sha256(str(state_dir.resolve()).encode()).hexdigest()[:16]
    return RUN_DIR / "crun" / digest


def ensure_rootfs(path: Path = ROOTFS) -> tuple[str, ...]:
    """Make the read-only root of mount points; return the host library directories that
    are real directories (bound), the others being symlinks copied as they are."""
    path.mkdir(mode=0o755, parents=True, exist_ok=True)
    path.chmod(0o755)  # every guest's root must traverse it (its path too: /run is 0755)
    for d in container.ROOT_DIRS:
        (path / d).mkdir(mode=0o755, exist_ok=True)
    real: list[str] = []
    for name in container.HOST_LIB_DIRS:
        host, mine = Path("/") / name, path / name
        if host.is_symlink():
            target = os.readlink(host)
            if not mine.is_symlink() or os.readlink(mine) != target:
                with contextlib.suppress(FileNotFoundError):
                    mine.unlink()
                mine.symlink_to(target)
        elif host.is_dir():
            mine.mkdir(mode=0o755, exist_ok=True)
            real.append(name)
    return tuple(real)


def claim_ids(owner: str) -> container.IdRange:
    """The id range of the network namespace ``owner``: the one it holds, else a free one.

    Raises:
        SandboxFailed: every slot is held by a live namespace.
    """
    IDMAP_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)
    for entry in os.listdir(IDMAP_DIR):
        if entry.isdigit() and _holder(IDMAP_DIR / entry) == owner:
            return container.IdRange(slot=int(entry))
    start = int(hashlib.sha256(owner.encode()).hexdigest(), 16) % container.ID_SLOTS
    for i in range(container.ID_SLOTS):
        slot = (start + i) % container.ID_SLOTS
        path = IDMAP_DIR / str(slot)
        for _ in range(2):
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                holder = _holder(path)
                if holder and not _holder_exists(holder):
                    with contextlib.suppress(FileNotFoundError):
                        path.unlink()  # its sandbox is gone: the range is free again
                    continue
                break
            with os.fdopen(fd, "w") as f:
                f.write(owner)
            return container.IdRange(slot=slot)
    raise SandboxFailed(f"no free guest uid range for {owner} ({container.ID_SLOTS} in use)",
                        hint=f"remove stale files in {IDMAP_DIR}")


def release_ids(owner: str) -> None:
    """Free the range ``owner`` holds, if any."""
    with contextlib.suppress(FileNotFoundError):
        for entry in os.listdir(IDMAP_DIR):
            if _holder(IDMAP_DIR / entry) == owner:
                with contextlib.suppress(FileNotFoundError):
                    (IDMAP_DIR / entry).unlink()


def _holder(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def _holder_exists(holder: str) -> bool:
    """A slot's holder: a sandbox's network namespace, or a VM's TAP device."""
    return Path(f"/run/netns/{holder}").exists() or Path(f"/sys/class/net/{holder}").exists()


def _hybrid_cgroups() -> bool:
    try:
        return bool((HYBRID_UNIFIED / "cgroup.controllers").read_text().strip())
    except OSError:
        return False


class Crun:
    """crun with one gateway's state root."""

    def __init__(self, program: str, root: Path) -> None:
        self.program = program
        self.root = root

    def command(self, *args: str) -> list[str]:
        """The argv running ``crun ARGS`` for this root."""
        argv = [self.program, "--cgroup-manager=disabled", "--root", str(self.root), *args]
        if _hybrid_cgroups():
            return [sys.executable, "-I", "-S", str(NSEXEC), "--hide-cgroup2", "--", *argv]
        return argv

    async def _call(self, *args: str, log_path: Path | None = None) -> tuple[int, str]:
        """Run crun; its status and what it said (its stderr, or ``log_path``'s tail).

        A detached container process keeps crun's stdout and stderr: with ``log_path``
        they are that file (a pipe would never reach EOF while the guest runs).
        """
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        with contextlib.ExitStack() as stack:
            out: int | IO[bytes] = asyncio.subprocess.PIPE
            if log_path is not None:
                out = stack.enter_context(open(log_path, "ab"))  # noqa: ASYNC230 - local
            proc = await asyncio.create_subprocess_exec(
                *self.command(*args), stdin=asyncio.subprocess.DEVNULL, stdout=out,
                stderr=out, start_new_session=True)
            try:
                said, _ = await asyncio.wait_for(proc.communicate(), CRUN_TIMEOUT)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
                return -1, f"crun {args[0]} did not finish in {CRUN_TIMEOUT:.0f} s"
        if log_path is not None:
            with contextlib.suppress(OSError):
                said = log_path.read_bytes()[-400:]  # noqa: ASYNC240 - a local tail
        return proc.returncode or 0, (said or b"").decode(errors="replace").strip()

    async def run(self, name: str, bundle: Path, config: dict[str, object], *,
                  log_path: Path) -> None:
        """(Re)create container ``name`` from ``config`` and start its init, detached
        (its output, and crun's, in ``log_path``)."""
        await asyncio.to_thread(bundle.mkdir, mode=0o700, parents=True, exist_ok=True)
        _write_private(bundle / "config.json", config)
        await self.delete(name)
        status, said = await self._call("run", "--detach", "--bundle", str(bundle), name,
                                        log_path=log_path)
        if status != 0:
            raise SandboxFailed(f"container {name} did not start: {said}",
                                hint=f"see {log_path}")

    async def exec(self, name: str, process: dict[str, object], *, doc: Path,
                   log_path: Path) -> int:
        """Start ``process`` inside container ``name``, detached; its host pid.

        Its stdout and stderr are ``log_path``; ``doc`` (host-only, 0600) holds the
        process document, environment included, so no secret is on a command line.
        """
        _write_private(doc, process)
        pid_file = doc.with_suffix(".pid")
        pid_file.unlink(missing_ok=True)
        status, _ = await self._call("exec", "--detach", "--pid-file", str(pid_file),
                                     "--process", str(doc), name, log_path=log_path)
        try:
            pid = int(pid_file.read_text().strip())
        except (OSError, ValueError):
            pid = 0
        if status != 0 or pid <= 0:
            raise SandboxFailed(f"container {name}: cannot start {process.get('args')!r} "
                                f"(crun exec status {status})", hint=f"see {log_path}")
        return pid

    async def delete(self, name: str) -> None:
        """Kill and remove container ``name`` (its state under the root); safe to repeat."""
        if not (self.root / name).exists():
            return
        status, err = await self._call("delete", "--force", name)
        if status != 0 and (self.root / name).exists():
            log.warning("crun delete %s: %s", name, err)
        with contextlib.suppress(OSError):
            self.root.rmdir()  # the gateway's last container: leave no state behind


def _write_private(path: Path, doc: dict[str, object]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(doc, f)
    tmp.replace(path)
