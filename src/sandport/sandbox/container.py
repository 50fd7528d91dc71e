"""The OCI container a netns sandbox's guest programs run in: its config, sans I/O.

Owns the *content* of the OCI bundle (``config.json``) and of each program's process
document (``crun exec --process``): namespaces, the unprivileged uid/gid mapping, the
file system view, capabilities, ``no_new_privs`` and the seccomp deny-list. It runs
nothing and touches no file: :mod:`sandport.sandbox.crun` writes these documents and runs
crun; :mod:`sandport.sandbox.netns` decides what runs.

What a guest sees (one container per sandbox, every guest program ``crun exec``'d into it,
so Xvnc and its clients share PID, IPC (MIT-SHM) and /tmp as on a desktop):

* a user namespace mapping its uids/gids 0..65535 onto an unprivileged host range of its
  own (:class:`IdRange`); no capabilities at all, ``no_new_privs``, a seccomp filter;
* its own PID, IPC, UTS and mount namespaces, the sandbox's network namespace;
* a read-only root holding only mount points: the host's /usr, /etc (its secrets masked)
  and the library directories read-only, a fresh /proc of its own PID namespace, a small
  /dev, its own writable /tmp (``workdir/tmp``) and, read-only, the files the gateway
  hands it (``workdir/guest`` on ``/run/sandport``: the VNC password file, the agent).
  No state dir, no other sandbox's files, no host /proc, no /sys, no /home, no /root.
"""

from __future__ import annotations

from dataclasses import dataclass

OCI_VERSION = "1.0.2"
#: Host uid/gid ranges for guests: slot ``n`` maps 0..ID_SIZE-1 onto ID_BASE + n*ID_SIZE.
ID_BASE = 1_000_000
ID_SIZE = 65536
ID_SLOTS = 4096  # ID_BASE + ID_SLOTS*ID_SIZE stays below 2**31
#: Where the gateway's read-only files for a guest appear inside it.
GUEST_FILES = "/run/sandport"
#: Mount points of the read-only root (the host directories bind-mounted onto them, and
#: the symlinks of a merged-/usr host, are made by :mod:`sandport.sandbox.crun`).
ROOT_DIRS = ("proc", "dev", "usr", "etc", "tmp", "run", "run/sandport", "var", "var/tmp")
#: Host directories a guest may see read-only besides /usr and /etc (when they are real
#: directories; on a merged-/usr host they are symlinks into /usr).
HOST_LIB_DIRS = ("bin", "sbin", "lib", "lib32", "lib64", "libx32")
#: Secrets under /etc (and kernel interfaces under /proc) a guest must not read.
MASKED_PATHS = (
    "/etc/shadow", "/etc/shadow-", "/etc/gshadow", "/etc/gshadow-", "/etc/security/opasswd",
    "/etc/ssh", "/etc/ssl/private", "/etc/sudoers", "/etc/sudoers.d", "/etc/sandport",
    "/proc/kcore", "/proc/keys", "/proc/timer_list", "/proc/sched_debug",
    "/proc/acpi", "/proc/scsi", "/proc/latency_stats",
)
READONLY_PATHS = ("/proc/asound", "/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys",
                  "/proc/sysrq-trigger")
#: Syscalls a guest gets EPERM for: the kernel attack surface no desktop program needs
#: (module and kexec loading, mounts, tracing, BPF, keyrings, handles that bypass the
#: mount view, clocks, swap, reboot) — Docker's default profile denies the same ones.
SECCOMP_DENIED = (
    "mount", "umount", "umount2", "pivot_root", "chroot", "move_mount", "open_tree",
    "fsopen", "fsconfig", "fsmount", "fspick", "mount_setattr",
    "ptrace", "process_vm_readv", "process_vm_writev", "kcmp", "pidfd_getfd",
    "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module",
    "create_module", "get_kernel_syms", "query_module",
    "bpf", "perf_event_open", "userfaultfd", "lookup_dcookie", "fanotify_init",
    "keyctl", "add_key", "request_key",
    "open_by_handle_at", "name_to_handle_at",
    "swapon", "swapoff", "reboot", "acct", "quotactl", "quotactl_fd", "nfsservctl",
    "setns", "clock_settime", "clock_settime64", "clock_adjtime", "clock_adjtime64",
    "settimeofday", "adjtimex", "stime", "iopl", "ioperm", "syslog", "vhangup",
    "uselib", "ustat", "sysfs", "_sysctl",
)
CLONE_NEWUSER = 0x10000000
EPERM = 1
ENOSYS = 38
#: PID 1 of the container: reaps orphans (a guest program's children), exits on SIGTERM
#: (the kernel then kills the rest of the PID namespace).
INIT_PROGRAM = (
    "import os, signal, sys\n"
    "watched = {signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP}\n"
    "signal.pthread_sigmask(signal.SIG_BLOCK, watched)\n"
    "while signal.sigwait(watched) == signal.SIGCHLD:\n"
    "    try:\n"
    "        while os.waitpid(-1, os.WNOHANG)[0]:\n"
    "            pass\n"
    "    except ChildProcessError:\n"
    "        pass\n"
)


@dataclass(frozen=True, slots=True, kw_only=True)
class IdRange:
    """The host uids and gids a sandbox's user namespace maps its 0..size-1 onto."""

    slot: int

    @property
    def host_base(self) -> int:
        """The host uid (and gid) of the guest's root."""
        return ID_BASE + self.slot * ID_SIZE

    @property
    def size(self) -> int:
        """How many ids are mapped."""
        return ID_SIZE

    def mappings(self) -> list[dict[str, int]]:
        """The OCI ``uidMappings`` / ``gidMappings`` value."""
        return [{"containerID": 0, "hostID": self.host_base, "size": self.size}]


def seccomp_profile() -> dict[str, object]:
    """The OCI seccomp section: allow by default, deny :data:`SECCOMP_DENIED`.

    Only the native architecture is listed, so a 32-bit syscall entry (``int 0x80``) is
    killed outright rather than slipping past the names. New user namespaces are denied
    (``unshare``/``clone`` with CLONE_NEWUSER); ``clone3``, whose flags a filter cannot
    read, answers ENOSYS so the C library falls back to ``clone``.
    """
    newuser = [{"index": 0, "value": CLONE_NEWUSER, "valueTwo": CLONE_NEWUSER,
                "op": "SCMP_CMP_MASKED_EQ"}]
    return {
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64"],
        "syscalls": [
            {"names": list(SECCOMP_DENIED), "action": "SCMP_ACT_ERRNO", "errnoRet": EPERM},
            {"names": ["unshare", "clone"], "action": "SCMP_ACT_ERRNO", "errnoRet": EPERM,
             "args": newuser},
            {"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": ENOSYS},
        ],
    }


def process_config(*, argv: list[str], env: dict[str, str], cwd: str = "/tmp",
                   capabilities: tuple[str, ...] = ()) -> dict[str, object]:
    """An OCI ``process``: root of the user namespace, only ``capabilities`` (none by
    default) and ``no_new_privs``."""
    caps = list(capabilities)
    return {
        "terminal": False,
        "user": {"uid": 0, "gid": 0},
        "args": list(argv),
        "env": [f"{k}={v}" for k, v in env.items()],
        "cwd": cwd,
        "noNewPrivileges": True,
        "capabilities": {"bounding": caps, "effective": caps, "permitted": caps,
                         "inheritable": [], "ambient": []},
    }


def _bind(source: str, destination: str, *, writable: bool = False) -> dict[str, object]:
    options = ["rbind", "rw" if writable else "ro", "nosuid", "nodev"]
    return {"destination": destination, "type": "bind", "source": source, "options": options}


def bundle_config(
    *,
    rootfs: str,
    netns_path: str,
    tmpdir: str,
    guest_files: str,
    ids: IdRange,
    hostname: str,
    init_argv: list[str],
    lib_dirs: tuple[str, ...] = (),
) -> dict[str, object]:
    """The ``config.json`` of a sandbox's container (see the module docstring).

    Args:
        rootfs: the read-only root of mount points (made by :mod:`sandport.sandbox.crun`).
        netns_path: the sandbox's network namespace file (``/run/netns/sp-<id>``).
        tmpdir: the host directory that is the guest's /tmp.
        guest_files: the host directory shown read-only on :data:`GUEST_FILES`.
        ids: the host id range of this sandbox.
        hostname: the UTS name.
        init_argv: PID 1 (:data:`INIT_PROGRAM` run by a Python the guest can see).
        lib_dirs: which of :data:`HOST_LIB_DIRS` are real directories to bind.
    """
    mounts: list[dict[str, object]] = [
        {"destination": "/proc", "type": "proc", "source": "proc",
         "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
         "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
        {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
         "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
        {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
         "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=262144k"]},
        _bind("/usr", "/usr"),
        _bind("/etc", "/etc"),
        *(_bind(f"/{d}", f"/{d}") for d in lib_dirs),
        _bind(tmpdir, "/tmp", writable=True),
        {"destination": "/var/tmp", "type": "tmpfs", "source": "tmpfs",
         "options": ["nosuid", "nodev", "mode=1777", "size=65536k"]},
        _bind(guest_files, GUEST_FILES),
    ]
    return {
        "ociVersion": OCI_VERSION,
        "process": process_config(argv=init_argv, env={"PATH": "/usr/bin:/bin"}, cwd="/"),
        "root": {"path": rootfs, "readonly": True},
        "hostname": hostname,
        "mounts": mounts,
        "linux": {
            "uidMappings": ids.mappings(),
            "gidMappings": ids.mappings(),
            "namespaces": [{"type": "user"}, {"type": "pid"}, {"type": "ipc"},
                           {"type": "uts"}, {"type": "mount"},
                           {"type": "network", "path": netns_path}],
            "maskedPaths": list(MASKED_PATHS),
            "readonlyPaths": list(READONLY_PATHS),
            "seccomp": seccomp_profile(),
        },
    }
