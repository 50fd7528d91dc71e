"""Exec a program inside a sandbox: its network namespace and a private /tmp.

Run as ``python -I -S nsexec.py NETNS TMPDIR -- PROGRAM ARGS...`` (no site, no sandport
import: it starts in a few milliseconds). It enters the named network namespace, makes a
private mount namespace whose /tmp is the sandbox's own TMPDIR (so X sockets and lock files
of two sandboxes never meet), and execs the program, which keeps this process's PID. Guests
outlive a gateway that crashes: the next gateway adopts them (or removes them). Python 3.11
has no os.setns, hence ctypes.

This is the launcher of the ``host-root-UNSAFE`` guest mode only. The default runs guests
in a crun container (:mod:`sandport.sandbox.crun`), which uses this file's other form,
``nsexec.py --hide-cgroup2 -- CRUN ARGS...``: exec crun in a private mount namespace
without the hybrid-mode cgroup v2 mount that crun 1.8 refuses to run beside.
"""

import ctypes
import os
import sys

CLONE_NEWNS = 0x00020000
CLONE_NEWNET = 0x40000000
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MNT_DETACH = 2
HYBRID_UNIFIED = b"/sys/fs/cgroup/unified"


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        sys.stderr.write(f"nsexec: {what}: {os.strerror(err)}\n")
        sys.exit(126)


def hide_cgroup2(program: list[str]) -> None:
    """Exec ``program`` in a private mount namespace without the hybrid cgroup v2 mount."""
    libc = ctypes.CDLL(None, use_errno=True)
    _check(libc.unshare(CLONE_NEWNS), "unshare mount namespace")
    _check(libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None), "make / private")
    libc.umount2(HYBRID_UNIFIED, MNT_DETACH)  # not mounted: nothing to hide
    try:
        os.execvp(program[0], program)
    except OSError as exc:
        sys.stderr.write(f"nsexec: cannot run {program[0]}: {exc.strerror}\n")
        sys.exit(127)


def main(argv: list[str]) -> None:
    """Enter the sandbox named in ``argv`` and exec its program."""
    if len(argv) >= 3 and argv[0] == "--hide-cgroup2" and argv[1] == "--":
        hide_cgroup2(argv[2:])
    if len(argv) < 4 or argv[2] != "--":
        sys.stderr.write("usage: nsexec.py NETNS TMPDIR -- PROGRAM [ARGS...]\n")
        sys.exit(2)
    netns, tmpdir, program = argv[0], argv[1], argv[3:]
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{netns}", os.O_RDONLY | os.O_CLOEXEC)
    _check(libc.setns(fd, CLONE_NEWNET), f"setns {netns}")
    os.close(fd)
    _check(libc.unshare(CLONE_NEWNS), "unshare mount namespace")
    _check(libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None), "make / private")
    _check(libc.mount(tmpdir.encode(), b"/tmp", None, MS_BIND, None), f"bind {tmpdir} on /tmp")
    os.chdir("/tmp")
    try:
        os.execvp(program[0], program)
    except OSError as exc:
        sys.stderr.write(f"nsexec: cannot run {program[0]}: {exc.strerror}\n")
        sys.exit(127)


if __name__ == "__main__":
    main(sys.argv[1:])
