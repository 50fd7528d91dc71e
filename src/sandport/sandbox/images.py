"""Guest images for QEMU microVM sandboxes: a Debian kernel and a busybox initramfs.

An image is two files in ``<cache>/<profile>-<key[:16]>/``:

``vmlinux``
    The kernel of Debian's ``linux-image-amd64`` (its current ABI package, fetched with
    ``apt-get download``, never installed). Debian ships ``vmlinuz``: a boot stub plus the
    kernel as an xz stream. We keep the decompressed ELF: QEMU boots an ELF with
    ``-kernel`` through its PVH entry point, which skips the stub's decompression (about 6 s
    under TCG).
``initramfs.cpio``
    The whole root file system as a cpio archive ("newc" format, written here in Python),
    compressed with ``lz4 -l`` (the *legacy* frame: the only lz4 format the kernel's
    initramfs unpacker reads; it unpacks ~3x faster than gzip in a TCG guest). The kernel
    unpacks it into a ramfs (``rootfstype=ramfs``: a tmpfs root is capped at half the RAM)
    and runs ``/init``.

What goes into the root, for every profile: busybox (its applets as symlinks), the virtio
drivers Debian builds as modules (``virtio_mmio`` is the bus of QEMU's ``-M microvm``;
``virtio_net`` needs ``net_failover``), and ``/init``, a busybox shell script (see
:func:`init_script`). Per profile:

``echo``
    TCP echo on port 7 (busybox ``nc -ll -e cat``), UDP echo on port 7 (``socat``
    ``UDP4-LISTEN:7,fork PIPE``: one process per sender, not per datagram, which a
    loaded TCG guest answers in time; each datagram goes back to its sender; Debian's
    busybox has no inetd and its ``nc`` no UDP), and busybox ``httpd`` on port 80 serving
    ``sandport echo <sandbox id>``.
``desktop``
    TigerVNC's ``Xvnc`` on display :1 / port 5901 with VNC Authentication, then
    ``xsetroot`` (the sandbox's colour), ``openbox`` and an ``xmessage`` naming the sandbox,
    like the netns backend's desktop. These programs, every library ``ldd`` names for them
    and the data they read (XKB, fontconfig, two DejaVu fonts, an openbox theme) are copied
    from the host's installed Debian packages, at their real paths.

**Content address.** :func:`image_inputs` lists everything the image is made from: this
builder's version, a digest of the generated files (``/init`` ...), the kernel package
and version apt would fetch now, and the version of every installed Debian package whose
files are copied in (found with ``dpkg-query -S``; a file no package owns counts with
its SHA-256). The key is the SHA-256 of that list. So an ``apt-get upgrade`` of Xvnc's
libraries, a new kernel ABI after ``apt-get update``, or a changed init script each give
a new key, and :func:`find_image` no longer finds the old image: stale images cannot be
booted by mistake. Unchanged inputs make :func:`build_image` return the existing image
without writing anything.

**Per-sandbox seed.** The image is shared; what differs per sandbox travels in a second,
uncompressed cpio archive (:func:`seed_archive`) that the backend appends to a copy of
``initramfs.cpio``. Linux unpacks concatenated archives in order, later files overwriting
earlier ones. The seed holds ``/etc/sandport/seed.env`` (shell ``KEY=VALUE`` lines, see
:func:`seed_env`: ``SANDPORT_SANDBOX_ID``, ``SANDPORT_COLOUR``, ``SANDPORT_DESKTOP_NAME``)
and, for a desktop, ``/etc/sandport/vncpasswd`` (TigerVNC's obfuscated password file,
mode 0600). Secrets thus never appear on QEMU's command line, which ``ps`` shows. The
built ``initramfs.cpio`` already ends in zero padding to a 4-byte boundary: the kernel's
lz4 decoder stops at a zero chunk length, and an appended archive must start 4-aligned.

**Booting** (what the QEMU backend does)::

    qemu-system-x86_64 -M microvm -accel tcg -m 256 -smp 1 -nodefaults -display none \\
      -no-reboot -kernel vmlinux -initrd <initramfs.cpio + seed> -serial file:serial.log \\
      -append "<KERNEL_CMDLINE> tsc_early_khz=<host kHz> ip=<guest>::<gw>:<mask>::eth0:off" \\
      -netdev tap,id=n0,ifname=<tap>,script=no,downscript=no \\
      -device virtio-net-device,netdev=n0,mac=<mac>

``ip=`` takes the kernel's own form (Documentation/admin-guide/nfs/nfsroot.rst) or
``ip=dhcp`` (busybox ``udhcpc``); Debian's kernel has no IP autoconfiguration, so
``/init`` reads it. The guest reports on the serial console, one line each
(:data:`MARKER`)::

    SANDPORT-GUEST net eth0 10.201.250.2/24 gw 10.201.250.1   (gw none: no gateway given)
    SANDPORT-GUEST services echo started      (once every service's port is bound)
    SANDPORT-GUEST error <what failed>        (the guest stays up, for inspection)
    SANDPORT-GUEST warning <what is odd>      (a missing seed: defaults are used)

**The cache directory**::

    <cache>/echo-<key[:16]>/{vmlinux,initramfs.cpio,manifest.json}   an image
    <cache>/kernels/<package>_<version>/   vmlinux + virtio modules, extracted once
                                           (images hard-link its vmlinux)
    <cache>/downloads/<package>.deb        the kernel package, downloaded once
    <cache>/kernel-candidate.json          apt's last answer (see resolve_kernel)
    <cache>/.lock                          held by the one builder at work
    <cache>/.tmp-*                         a build in progress (or killed: removed later)
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import io
import json
import logging
import lzma
import os
import platform
import re
import secrets
import shlex
import shutil
import stat
import subprocess
import tarfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from sandport.errors import MissingPackage, SandportError, UsageError
from sandport.sandbox.base import AGENT_PORT
from sandport.sandbox.profiles import DESKTOP_GEOMETRY, VNC_DISPLAY, VNC_PORT

log = logging.getLogger(__name__)

#: Bump when the image layout changes in a way the other inputs do not capture.
BUILDER_VERSION = "3"  # 2, 3: the desktop image runs the guest agent
DEFAULT_IMAGE_CACHE = Path("/var/cache/sandport/images")
#: The profiles an image can be built for.
IMAGE_PROFILES = ("echo", "desktop")
#: The kernel command line every image boots with; the backend appends
#: ``tsc_early_khz=<host kHz>`` (microvm under TCG has no way to calibrate the TSC) and
#: ``ip=...``. ``rootfstype=ramfs``: the root may use all of the RAM (tmpfs: half).
KERNEL_CMDLINE = (
    "console=ttyS0 panic=-1 mitigations=off init_on_alloc=0 apparmor=0 security=none "
    "audit=0 tsc=reliable cryptomgr.notests rootfstype=ramfs"
)
#: The Debian metapackage that names the current kernel ABI package.
KERNEL_METAPACKAGE = "linux-image-amd64"
#: Kernel modules /init loads, in dependency order (Debian builds them as modules).
VIRTIO_MODULES = ("virtio_ring", "virtio", "virtio_mmio", "failover", "net_failover",
                  "virtio_net")
#: Where the modules live in the guest.
GUEST_MODULE_DIR = "/usr/lib/sandport/modules"
#: The prefix of every line /init writes for the backend.
MARKER = "SANDPORT-GUEST"
SEED_ENV = "/etc/sandport/seed.env"
#: The guest agent in the desktop image (``sandport/agent.py``, stdlib only; on AGENT_PORT).
GUEST_AGENT = "/usr/lib/sandport/agent.py"
AGENT_SOURCE = Path(__file__).resolve().parent.parent / "agent.py"
SEED_VNC_PASSWORD = "/etc/sandport/vncpasswd"  # noqa: S105 - a path, not a password
ECHO_PORT = 7
HTTP_PORT = 80
#: Xvnc counts failed logins per client address and blocks it: never, here (the same as
#: the netns backend).
XVNC_BLACKLIST_THRESHOLD = 1_000_000
#: Default background when the seed names no colour.
DEFAULT_COLOUR = "#1e90ff"

MANIFEST = "manifest.json"
KERNEL_FILE = "vmlinux"
INITRD_FILE = "initramfs.cpio"
DOWNLOADS = "downloads"
KERNELS = "kernels"
LOCK_FILE = ".lock"
KERNEL_MEMO = "kernel-candidate.json"
_TMP_PREFIX = ".tmp-"
_DIR_RE = re.compile(r"^(?P<profile>[a-z]+)-(?P<key>[0-9a-f]{16})$")

Progress = Callable[[str, float | None], None]

#: A program the builder copies or runs -> the Debian package that provides it.
PACKAGES = {
    "busybox": "busybox-static",
    "socat": "socat",
    "Xvnc": "tigervnc-standalone-server",
    "xkbcomp": "x11-xkb-utils",
    "openbox": "openbox",
    "xmessage": "x11-utils",
    "xsetroot": "x11-xserver-utils",
    "lz4": "lz4",
    "dpkg-deb": "dpkg",
    "dpkg-query": "dpkg",
    "apt-get": "apt",
    "apt-cache": "apt",
    "ldd": "libc-bin",
}


@dataclass(frozen=True, slots=True, kw_only=True)
class Image:
    """A built guest image (see the module docstring).

    Attributes:
        profile: ``echo`` or ``desktop``.
        key: hex SHA-256 of :func:`image_inputs`: the image's content address.
        dir: ``<cache>/<profile>-<key[:16]>/``.
        kernel: ``dir/vmlinux``, an uncompressed ELF kernel (QEMU boots it via PVH).
        initrd: ``dir/initramfs.cpio``, the root: newc cpio in an lz4 legacy frame,
            zero-padded to a 4-byte boundary (append a seed archive as is).
        manifest: ``dir/manifest.json``: profile, key, inputs, kernel_version, sizes,
            built_at, build_seconds, cmdline.
    """

    profile: str
    key: str
    dir: Path
    kernel: Path
    initrd: Path
    manifest: dict[str, Any]


@dataclass(frozen=True, slots=True)
class _HostPlan:
    """What a profile copies from the host.

    Attributes:
        programs: program names (on PATH); each with every library ``ldd`` lists.
        paths: files or directories copied at their real paths (whole trees).
        optional: like ``paths``, skipped when the host lacks them.
    """

    programs: tuple[str, ...]
    paths: tuple[str, ...] = ()
    optional: tuple[str, ...] = ()


_PLANS = {
    "echo": _HostPlan(programs=("busybox", "socat")),
    "desktop": _HostPlan(
        # python3.11 (Debian's) runs the guest agent; its stdlib is copied pruned
        # (:data:`_PYTHON_SKIP`).
        programs=("busybox", "Xvnc", "xkbcomp", "openbox", "xmessage", "xsetroot",
                  "python3.11"),
        paths=(
            "/usr/lib/python3.11",
            "/usr/share/X11/xkb",  # keymaps: Xvnc runs xkbcomp on them at start
            "/usr/share/X11/locale",  # Xlib's locale database (xmessage)
            "/etc/fonts",  # fontconfig (openbox draws its titles with it)
            "/usr/share/fontconfig/conf.avail",  # where /etc/fonts/conf.d links point
            "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
            "/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf",
            "/etc/xdg/openbox",  # rc.xml, menu.xml
            "/usr/share/themes/Clearlooks",  # rc.xml's theme
            # iconv from Latin-1 (X window titles) for openbox's GLib: not built into glibc.
            "/usr/lib/x86_64-linux-gnu/gconv/gconv-modules",
            "/usr/lib/x86_64-linux-gnu/gconv/gconv-modules.d",
            "/usr/lib/x86_64-linux-gnu/gconv/ISO8859-1.so",
        ),
        optional=("/usr/lib/xorg/protocol.txt",),  # names in X error messages
    ),
}
#: Data path -> the Debian package that provides it (for the error message).
_PATH_PACKAGES = {
    "/usr/lib/python3.11": "libpython3.11-stdlib",
    "/usr/share/X11/xkb": "xkb-data",
    "/usr/share/X11/locale": "libx11-data",
    "/etc/fonts": "fontconfig-config",
    "/usr/share/fontconfig/conf.avail": "fontconfig-config",
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf": "fonts-dejavu-core",
    "/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf": "fonts-dejavu-core",
    "/etc/xdg/openbox": "openbox",
    "/usr/share/themes/Clearlooks": "openbox",
    "/usr/lib/x86_64-linux-gnu/gconv/gconv-modules": "libc6",
    "/usr/lib/x86_64-linux-gnu/gconv/gconv-modules.d": "libc6",
    "/usr/lib/x86_64-linux-gnu/gconv/ISO8859-1.so": "libc6",
}


# --------------------------------------------------------------------------------------------
# cpio "newc": the archive format the kernel's initramfs unpacker reads.
# --------------------------------------------------------------------------------------------
#
#   Each entry: a 110-byte ASCII header, the NUL-terminated name, zero padding to a multiple
#   of 4, the data, zero padding to a multiple of 4. Header = "070701" and 13 fields of
#   8 hex digits (man 5 cpio, "New ASCII Format"):
#
#   ino mode uid gid nlink mtime filesize devmajor devminor rdevmajor rdevminor namesize check
#
#   A symlink's data is its target. The archive ends with an entry named "TRAILER!!!".

NEWC_MAGIC = b"070701"
NEWC_HEADER_LEN = 110
NEWC_FIELDS = ("ino", "mode", "uid", "gid", "nlink", "mtime", "filesize", "devmajor",
               "devminor", "rdevmajor", "rdevminor", "namesize", "check")
CPIO_TRAILER = "TRAILER!!!"
_COPY_CHUNK = 1 << 20


def _pad4(n: int) -> bytes:
    return b"\0" * (-n % 4)


class CpioWriter:
    """Writes a newc cpio archive to a binary stream, entry by entry.

    Names are guest paths without the leading ``/`` (``etc/passwd``); a parent directory
    must come before what it holds (the kernel does not create missing parents). Owner is
    always root. Call :meth:`finish` to write the trailer.
    """

    def __init__(self, out: IO[bytes]) -> None:
        self._out = out
        self._ino = 0
        self.written = 0

    def _write(self, data: bytes) -> None:
        self._out.write(data)
        self.written += len(data)

    def _header(self, name: str, mode: int, size: int, *, nlink: int = 1, mtime: int = 0,
                rdev: tuple[int, int] = (0, 0)) -> None:
        if not name or name.startswith("/") or "\0" in name:
            raise ValueError(f"bad cpio entry name {name!r}")
        self._ino += 1
        encoded = name.encode() + b"\0"
        values = (self._ino, mode, 0, 0, nlink, max(0, mtime) & 0xFFFFFFFF, size, 0, 0,
                  rdev[0], rdev[1], len(encoded), 0)
        header = NEWC_MAGIC + "".join(f"{v:08X}" for v in values).encode()
        self._write(header + encoded + _pad4(NEWC_HEADER_LEN + len(encoded)))

    def add_dir(self, name: str, perm: int = 0o755, mtime: int = 0) -> None:
        """A directory."""
        self._header(name, stat.S_IFDIR | perm, 0, nlink=2, mtime=mtime)

    def add_file(self, name: str, data: bytes, perm: int = 0o644, mtime: int = 0) -> None:
        """A regular file with ``data``."""
        self._header(name, stat.S_IFREG | perm, len(data), mtime=mtime)
        self._write(data + _pad4(len(data)))

    def add_host_file(self, name: str, path: Path, st: os.stat_result) -> None:
        """A regular file copied from ``path`` (``st``: its lstat), streamed."""
        self._header(name, stat.S_IFREG | stat.S_IMODE(st.st_mode), st.st_size,
                     mtime=int(st.st_mtime))
        left = st.st_size
        with path.open("rb") as f:
            while left:
                chunk = f.read(min(left, _COPY_CHUNK))
                if not chunk:
                    raise SandportError(f"{path} shrank while it was archived")
                self._write(chunk)
                left -= len(chunk)
        self._write(_pad4(st.st_size))

    def add_symlink(self, name: str, target: str, mtime: int = 0) -> None:
        """A symbolic link to ``target``."""
        data = target.encode()
        self._header(name, stat.S_IFLNK | 0o777, len(data), mtime=mtime)
        self._write(data + _pad4(len(data)))

    def add_char_device(self, name: str, perm: int, major: int, minor: int) -> None:
        """A character device node (``dev/console``: no mknod, so no root, needed)."""
        self._header(name, stat.S_IFCHR | perm, 0, rdev=(major, minor))

    def add_tree(self, root: Path, progress: Callable[[float], None] | None = None) -> None:
        """Everything below ``root`` (not ``root`` itself), parents first, sorted.

        Symlinks are archived as links, never followed.
        """
        total = sum(p.lstat().st_size for p in root.rglob("*") if p.is_file()) or 1
        done = 0
        for dirpath, dirnames, filenames in os.walk(root):
            here = Path(dirpath)
            subdirs = []
            for entry in sorted(dirnames + filenames):
                path = here / entry
                name = path.relative_to(root).as_posix()
                st = path.lstat()
                if stat.S_ISLNK(st.st_mode):
                    self.add_symlink(name, os.readlink(path), int(st.st_mtime))
                elif stat.S_ISDIR(st.st_mode):
                    self.add_dir(name, stat.S_IMODE(st.st_mode), int(st.st_mtime))
                    subdirs.append(entry)
                elif stat.S_ISREG(st.st_mode):
                    self.add_host_file(name, path, st)
                    done += st.st_size
                    if progress is not None:
                        progress(done / total)
                else:
                    raise SandportError(f"cannot archive {path}: not a file, link or dir")
            dirnames[:] = sorted(subdirs)  # os.walk descends into these, in this order

    def finish(self) -> None:
        """The trailer entry that ends the archive."""
        self._header(CPIO_TRAILER, 0, 0, nlink=1)


@dataclass(frozen=True, slots=True, kw_only=True)
class CpioEntry:
    """One entry read back by :func:`read_cpio`."""

    name: str
    mode: int
    data: bytes
    rdev: tuple[int, int] = (0, 0)


def read_cpio(data: bytes) -> list[CpioEntry]:
    """The entries of an uncompressed newc archive, up to its trailer (which is left out).

    Raises:
        ValueError: ``data`` is not a complete newc archive.
    """
    entries: list[CpioEntry] = []
    pos = 0
    while True:
        header = data[pos:pos + NEWC_HEADER_LEN]
        if len(header) < NEWC_HEADER_LEN or header[:6] != NEWC_MAGIC:
            raise ValueError(f"no newc header at offset {pos}")
        try:
            fields = dict(zip(NEWC_FIELDS, (int(header[6 + 8 * i:14 + 8 * i], 16)
                                            for i in range(13)), strict=True))
        except ValueError:
            raise ValueError(f"bad newc header at offset {pos}") from None
        name_end = pos + NEWC_HEADER_LEN + fields["namesize"]
        name = data[pos + NEWC_HEADER_LEN:name_end - 1].decode()
        body = name_end + (-(NEWC_HEADER_LEN + fields["namesize"]) % 4)
        end = body + fields["filesize"]
        if end > len(data):
            raise ValueError(f"entry {name!r} runs past the end of the archive")
        if name == CPIO_TRAILER:
            return entries
        entries.append(CpioEntry(name=name, mode=fields["mode"], data=data[body:end],
                                 rdev=(fields["rdevmajor"], fields["rdevminor"])))
        pos = end + (-end % 4)


# --------------------------------------------------------------------------------------------
# The per-sandbox seed.
# --------------------------------------------------------------------------------------------

_ENV_NAME = re.compile(r"^[A-Z_][A-Z0-9_]*$")


def _guest_name(path: str) -> str:
    """``/etc/x`` -> ``etc/x``; refuses empty, ``.`` and ``..`` components."""
    parts = path.strip("/").split("/")
    if not path.strip("/") or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"bad guest path {path!r}")
    return "/".join(parts)


def seed_archive(files: dict[str, tuple[bytes, int]]) -> bytes:
    """An uncompressed newc archive with ``files`` to append to an image's initramfs.

    Args:
        files: guest path (``/etc/sandport/seed.env``) -> (content, permission bits such as
            ``0o600``). Parent directories are added (mode 0755) before their files.

    Returns:
        The archive, trailer included; its length is a multiple of 4.

    Raises:
        ValueError: a path is empty or has ``.``/``..`` components.
    """
    buf = io.BytesIO()
    writer = CpioWriter(buf)
    made: set[str] = set()
    for path in sorted(files):
        name = _guest_name(path)
        content, mode = files[path]
        parts = name.split("/")
        for i in range(1, len(parts)):
            parent = "/".join(parts[:i])
            if parent not in made:
                writer.add_dir(parent, 0o755)
                made.add(parent)
        writer.add_file(name, content, stat.S_IMODE(mode))
    writer.finish()
    return buf.getvalue()


def seed_env(values: Mapping[str, str]) -> bytes:
    """The content of ``/etc/sandport/seed.env``: ``KEY='value'`` lines /init sources.

    Values are shell-quoted, so any text (spaces, quotes, ``$``) arrives unchanged.

    Raises:
        ValueError: a key is not an upper-case shell name, or a value contains NUL.
    """
    lines = []
    for key, value in values.items():
        if not _ENV_NAME.match(key):
            raise ValueError(f"bad seed variable name {key!r}")
        if "\0" in value:
            raise ValueError(f"seed variable {key} contains NUL")
        lines.append(f"{key}={shlex.quote(value)}\n")
    return "".join(lines).encode()


def write_initrd(image: Image, seed: bytes, dest: Path) -> None:
    """Write ``dest``: the image's initramfs followed by ``seed`` (mode 0600: it may hold
    a password file)."""
    tmp = dest.with_name(f"{dest.name}.tmp")
    with tmp.open("wb") as out:
        os.fchmod(out.fileno(), 0o600)
        with image.initrd.open("rb") as src:
            shutil.copyfileobj(src, out, _COPY_CHUNK)
        out.write(seed)
    tmp.replace(dest)


# --------------------------------------------------------------------------------------------
# /init and the other generated files.
# --------------------------------------------------------------------------------------------

_INIT_COMMON = r"""#!/bin/sh
# /init of a sandport microVM guest, profile @PROFILE@ (written by sandport.sandbox.images).
# PID 1: mounts, virtio drivers, network from ip= on the kernel command line, the
# per-sandbox seed, the profile's services. Lines starting with @MARKER@ on the serial
# console are read by sandport's QEMU backend.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root USER=root LOGNAME=root LANG=C
set -f  # no globbing: words from /proc/cmdline and the seed are data

say() { echo "@MARKER@ $*"; }
alive() {  # a pid that runs (a zombie, exited but not reaped yet, does not)
  s=$(cut -d' ' -f3 "/proc/$1/stat" 2>/dev/null)
  [ -n "$s" ] && [ "$s" != Z ]
}
listening() {  # listening tcp|udp PORT: a socket is bound to PORT (tcp: in LISTEN, 0A)
  cat "/proc/net/$1" "/proc/net/${1}6" 2>/dev/null |
    awk -v port=":$(printf %04X "$2")" -v tcp="$([ "$1" = tcp ] && echo 1)" \
      'substr($2, length($2) - 4) == port && (!tcp || $4 == "0A") {found = 1}
       END {exit !found}'
}
await_ports() {  # await_ports tcp:7 udp:7 ...: until each is served (bounded: 20 s)
  for spec in "$@"; do
    i=0
    until listening "${spec%%:*}" "${spec#*:}"; do
      if [ $i -ge 2000 ]; then say "error services: nothing serves $spec after 20 s"; return 1; fi
      usleep 10000; i=$((i + 1))
    done
  done
}

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm /run/sandport
mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts /dev/pts
for m in @MODULES@; do
  insmod "@MODDIR@/$m.ko" || say "warning insmod $m failed"
done
dmesg -n 4  # the console is for our lines now; kernel warnings still show
ip link set lo up

# --- the seed (appended per sandbox by the backend) ---------------------------------------
SANDPORT_SANDBOX_ID=unseeded
SANDPORT_COLOUR='@DEFAULT_COLOUR@'
SANDPORT_DESKTOP_NAME=
SANDPORT_AGENT_TOKEN=
SANDPORT_GATEWAY_URL=
if [ ! -r @SEED_ENV@ ]; then
  say "warning no @SEED_ENV@: defaults in use"
elif ! sh -n @SEED_ENV@ 2>/dev/console; then
  say "warning @SEED_ENV@ is not valid shell: defaults in use"
else
  . @SEED_ENV@
fi
[ -n "$SANDPORT_DESKTOP_NAME" ] || SANDPORT_DESKTOP_NAME="sandport $SANDPORT_SANDBOX_ID"
export SANDPORT_SANDBOX_ID SANDPORT_COLOUR SANDPORT_DESKTOP_NAME

# --- network: ip=<client>:<server>:<gw>:<netmask>:<host>:<dev>:<autoconf> or ip=dhcp ------
IP_ARG=
for a in $(cat /proc/cmdline); do
  case "$a" in ip=*) IP_ARG=${a#ip=} ;; esac
done
NET_ADDR=
net_up() {
  CLIENT= SERVER= GW= MASK= HOST= DEV= AUTO=
  case "$IP_ARG" in
    ""|off|none) say "net none (no ip= on the kernel command line)"; return 0 ;;
    dhcp|on|any|both|bootp|rarp) AUTO=dhcp ;;
    *) IFS=: read -r CLIENT SERVER GW MASK HOST DEV AUTO <<EOF
$IP_ARG
EOF
  esac
  DEV=${DEV:-eth0}
  [ -n "$HOST" ] && hostname "$HOST"
  i=0
  while [ ! -e "/sys/class/net/$DEV" ]; do
    if [ $i -ge 500 ]; then
      say "error net: no $DEV within 5 s (is there a -device virtio-net-device?)"
      return 1
    fi
    usleep 10000; i=$((i + 1))
  done
  ip link set "$DEV" up
  case "$AUTO" in
    dhcp|on|any|both|bootp|rarp)
      if ! udhcpc -i "$DEV" -s /usr/share/sandport/udhcpc.script -t 10 -T 1 -n \
          ${HOST:+-x hostname:$HOST} >/dev/console 2>&1; then
        say "error net: no DHCP lease on $DEV"
        return 1
      fi
      read -r NET_ADDR GW </run/sandport/net.dhcp ;;
    *)
      if [ -z "$CLIENT" ]; then say "net $DEV none (no address in ip=)"; return 0; fi
      PREFIX=
      eval "$(ipcalc -p "$CLIENT" $MASK)"
      if [ -z "$PREFIX" ] || ! ip addr add "$CLIENT/$PREFIX" dev "$DEV"; then
        say "error net: cannot set address $CLIENT netmask ${MASK:-(class)} on $DEV"
        return 1
      fi
      NET_ADDR=$CLIENT/$PREFIX
      if [ -n "$GW" ] && ! ip route add default via "$GW" dev "$DEV"; then
        say "error net: cannot add the default route via $GW"
        return 1
      fi ;;
  esac
  say "net $DEV $NET_ADDR gw ${GW:-none}"
}
net_up
[ -n "$HOST" ] || hostname "sp-$SANDPORT_SANDBOX_ID"
echo "127.0.0.1 localhost $(hostname)" >/etc/hosts
"""

_INIT_ECHO = r"""
# --- profile echo: TCP+UDP echo on @ECHO_PORT@, HTTP on @HTTP_PORT@ -----------------------------
mkdir -p /www
echo "sandport echo $SANDPORT_SANDBOX_ID" >/www/index.html
nc -ll -p @ECHO_PORT@ -e /bin/cat </dev/null >/dev/console 2>&1 &
socat UDP4-LISTEN:@ECHO_PORT@,fork PIPE </dev/null >/dev/console 2>&1 &
httpd -f -p @HTTP_PORT@ -h /www </dev/null >/dev/console 2>&1 &
await_ports tcp:@ECHO_PORT@ udp:@ECHO_PORT@ tcp:@HTTP_PORT@ && say "services echo started"
"""

_INIT_DESKTOP = r"""
# --- profile desktop: Xvnc :@DISPLAY@ (VncAuth), background colour, openbox, a window -----------
export DISPLAY=:@DISPLAY@ XDG_RUNTIME_DIR=/run
start_desktop() {
  [ -r @SEED_VNC_PASSWORD@ ] ||
    say "warning no @SEED_VNC_PASSWORD@: VNC Authentication will refuse every password"
  rm -f /tmp/.X11-unix/X@DISPLAY@ /tmp/.X@DISPLAY@-lock
  Xvnc :@DISPLAY@ -rfbport @VNC_PORT@ -SecurityTypes VncAuth \
    -PasswordFile @SEED_VNC_PASSWORD@ -desktop "$SANDPORT_DESKTOP_NAME" \
    -geometry @GEOMETRY@ -depth 24 -AlwaysShared -BlacklistThreshold @BLACKLIST@ \
    -nolisten tcp </dev/null >/dev/console 2>&1 &
  XVNC=$!
  i=0
  while [ ! -S /tmp/.X11-unix/X@DISPLAY@ ]; do
    if ! alive $XVNC; then say "error desktop: Xvnc exited (its output is above)"; return 1; fi
    if [ $i -ge 3000 ]; then say "error desktop: no display :@DISPLAY@ within 30 s"; return 1; fi
    usleep 10000; i=$((i + 1))
  done
  xsetroot -solid "$SANDPORT_COLOUR" </dev/null >/dev/console 2>&1 ||
    say "warning xsetroot -solid $SANDPORT_COLOUR failed"
  openbox </dev/null >/dev/console 2>&1 &
  # xmessage speaks Latin-1: ASCII only.
  xmessage -center -buttons "" -title "$SANDPORT_DESKTOP_NAME" -bg white -fg black \
    "$(printf 'sandport sandbox %s\n%s  -  background %s' "$SANDPORT_SANDBOX_ID" \
       "${NET_ADDR%/*}" "$SANDPORT_COLOUR")" </dev/null >/dev/console 2>&1 &
  await_ports tcp:@VNC_PORT@ && say "services desktop started"
}
# The guest agent (/health, credentials to the gateway) when the seed names its gateway;
# started first: Python's start-up overlaps the desktop's.
AGENT=
if [ -n "$SANDPORT_AGENT_TOKEN" ] && [ -n "$SANDPORT_GATEWAY_URL" ]; then
  SANDPORT_AGENT_TOKEN=$SANDPORT_AGENT_TOKEN SANDPORT_GATEWAY_URL=$SANDPORT_GATEWAY_URL \
    SANDPORT_AGENT_LISTEN=0.0.0.0:@AGENT_PORT@ \
    python3.11 -I -S @GUEST_AGENT@ </dev/null >/dev/console 2>&1 &
  AGENT=1
fi
start_desktop
[ -z "$AGENT" ] || { await_ports tcp:@AGENT_PORT@ && say "services agent started"; }
"""

_INIT_END = r"""
# PID 1 must never exit (the kernel would panic); waiting also reaps orphaned children.
while :; do
  wait
  sleep 3600
done
"""

_UDHCPC_SCRIPT = r"""#!/bin/sh
# udhcpc event script: configure $interface from the lease; /init reads net.dhcp.
case "$1" in
  deconfig)
    ip -4 addr flush dev "$interface"
    ip link set "$interface" up ;;
  bound|renew)
    prefix=$mask
    [ -n "$prefix" ] || prefix=$(ipcalc -p "$ip" "$subnet" | cut -d= -f2)
    if ! ip -4 addr show dev "$interface" | grep -q "inet $ip/$prefix "; then
      ip -4 addr flush dev "$interface"
      ip addr add "$ip/$prefix" dev "$interface"
    fi
    gw=none
    for r in $router; do gw=$r; break; done
    [ "$gw" = none ] || ip route replace default via "$gw" dev "$interface"
    echo "$ip/$prefix $gw" >/run/sandport/net.dhcp ;;
esac
exit 0
"""


def init_script(profile: str) -> str:
    """The text of ``/init`` for ``profile`` (a busybox ``sh`` script; see the module
    docstring for what it does and prints)."""
    _check_profile(profile)
    body = _INIT_COMMON + (_INIT_ECHO if profile == "echo" else _INIT_DESKTOP) + _INIT_END
    width, height = DESKTOP_GEOMETRY
    values = {
        "PROFILE": profile, "MARKER": MARKER, "MODULES": " ".join(VIRTIO_MODULES),
        "MODDIR": GUEST_MODULE_DIR, "DEFAULT_COLOUR": DEFAULT_COLOUR, "SEED_ENV": SEED_ENV,
        "SEED_VNC_PASSWORD": SEED_VNC_PASSWORD, "ECHO_PORT": str(ECHO_PORT),
        "HTTP_PORT": str(HTTP_PORT), "DISPLAY": str(VNC_DISPLAY), "VNC_PORT": str(VNC_PORT),
        "GEOMETRY": f"{width}x{height}", "BLACKLIST": str(XVNC_BLACKLIST_THRESHOLD),
        "AGENT_PORT": str(AGENT_PORT), "GUEST_AGENT": GUEST_AGENT,
    }
    for name, value in values.items():
        body = body.replace(f"@{name}@", value)
    left = re.search(r"@[A-Z_]+@", body)
    if left:  # a typo in a template above
        raise AssertionError(f"init template placeholder {left.group()} has no value")
    return body


def guest_files(profile: str) -> dict[str, tuple[bytes, int]]:
    """The files the builder writes into the root itself: guest path -> (content, mode)."""
    hosts = "127.0.0.1 localhost\n"
    return {
        "/init": (init_script(profile).encode(), 0o755),
        "/usr/share/sandport/udhcpc.script": (_UDHCPC_SCRIPT.encode(), 0o755),
        "/etc/passwd": (b"root:x:0:0:root:/root:/bin/sh\n"
                        b"nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n", 0o644),
        "/etc/group": (b"root:x:0:\ntty:x:5:\nnogroup:x:65534:\n", 0o644),
        "/etc/hosts": (hosts.encode(), 0o644),
        "/etc/nsswitch.conf": (b"passwd: files\ngroup: files\nhosts: files\n", 0o644),
        **({GUEST_AGENT: (AGENT_SOURCE.read_bytes(), 0o644)} if profile == "desktop" else {}),
    }


# --------------------------------------------------------------------------------------------
# Running host programs.
# --------------------------------------------------------------------------------------------


def _program(name: str) -> str:
    """The path of a host program, or MissingPackage naming its Debian package."""
    path = shutil.which(name, path="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    if path is None:
        package = PACKAGES.get(name, name)
        raise MissingPackage(f"{name} is not installed (the image builder needs it)",
                             hint=f"apt-get install {package}   (or run scripts/setup.sh)")
    return path


def _tail(text: str, limit: int = 2000) -> str:
    text = text.strip()
    return text if len(text) <= limit else "..." + text[-limit:]


def _run(step: str, argv: list[str], *, cwd: Path | None = None,
         ok: tuple[int, ...] = (0,), hint: str = "") -> subprocess.CompletedProcess[str]:
    """Run a host program for build step ``step``; SandportError with its output if the
    exit status is not in ``ok``."""
    argv = [_program(argv[0]), *argv[1:]]
    try:
        done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False,
                              errors="replace")
    except OSError as exc:
        raise SandportError(f"{step}: cannot run {argv[0]}: {exc}") from None
    if done.returncode not in ok:
        output = _tail(done.stderr + done.stdout) or "(no output)"
        raise SandportError(
            f"{step}: `{shlex.join(argv)}` exited with status {done.returncode}:\n{output}",
            hint=hint)
    return done


# --------------------------------------------------------------------------------------------
# The kernel: which package, downloaded once, extracted once per version.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class KernelPackage:
    """The kernel ABI package apt would fetch now (``linux-image-6.1.0-57-amd64``)."""

    name: str
    version: str


def _apt_fingerprint() -> str:
    """A digest of everything apt's answer about a candidate version depends on: its
    package lists, sources, preferences and configuration, and dpkg's status (name, size
    and mtime of each file, not contents: cheap)."""
    digest = hashlib.sha256(os.environ.get("APT_CONFIG", "").encode())
    roots = [Path("/var/lib/apt/lists"), Path("/etc/apt"), Path("/var/lib/dpkg/status")]
    for top in roots:
        paths = [top] if top.is_file() else sorted(p for p in top.rglob("*") if p.is_file())
        for path in paths:
            with contextlib.suppress(OSError):
                st = path.stat()
                digest.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def resolve_kernel(cache_dir: Path | None = None) -> KernelPackage:
    """The kernel package ``linux-image-amd64`` depends on now, and its version.

    ``apt-cache`` takes about 0.6 s on a machine without apt's binary cache, so the
    answer is kept in ``<cache_dir>/kernel-candidate.json`` together with
    :func:`_apt_fingerprint`; it is asked again once apt's state changed.

    Raises:
        UsageError: apt knows no such package (its lists are empty: run apt-get update).
    """
    memo = cache_dir / KERNEL_MEMO if cache_dir is not None else None
    fingerprint = _apt_fingerprint()
    if memo is not None:
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            doc = json.loads(memo.read_text())
            if doc["fingerprint"] == fingerprint:
                return KernelPackage(name=str(doc["name"]), version=str(doc["version"]))
    step = f"resolve the kernel package ({KERNEL_METAPACKAGE})"
    done = _run(step, ["apt-cache", "show", "--no-all-versions", KERNEL_METAPACKAGE],
                ok=(0, 100))
    match = re.search(r"^Depends:.*?\b(linux-image-[0-9][^\s,(]*)\s*(?:\(= ([^)\s]+)\))?",
                      done.stdout, re.MULTILINE)
    if done.returncode != 0 or match is None:
        raise UsageError(
            f"{step}: apt lists no {KERNEL_METAPACKAGE} (and so no kernel for the guest): "
            f"{_tail(done.stderr, 300) or 'no Depends: linux-image-... line'}",
            hint="run `apt-get update` (the image builder fetches Debian's kernel with apt)")
    name, version = match.group(1), match.group(2)
    if version is None:  # no exact version in the dependency: ask for the package itself
        shown = _run(step, ["apt-cache", "show", "--no-all-versions", name])
        found = re.search(r"^Version: (\S+)", shown.stdout, re.MULTILINE)
        if found is None:
            raise UsageError(f"{step}: apt shows no version of {name}",
                             hint="run `apt-get update`")
        version = found.group(1)
    kernel = KernelPackage(name=name, version=version)
    if memo is not None and memo.parent.is_dir():
        with contextlib.suppress(OSError):
            tmp = memo.with_name(f"{memo.name}.{secrets.token_hex(4)}")
            tmp.write_text(json.dumps({"fingerprint": fingerprint, "name": name,
                                       "version": version}))
            tmp.replace(memo)
    return kernel


def _download_kernel(kernel: KernelPackage, downloads: Path, progress: Progress) -> Path:
    """The kernel's .deb in ``downloads`` (fetched with ``apt-get download`` unless there).

    Fetched into a temporary directory and renamed: a killed download never looks done.
    """
    pattern = f"{kernel.name}_{kernel.version.replace(':', '%3a')}_*.deb"
    found = sorted(downloads.glob(pattern))
    if found:
        return found[0]
    step = f"download {kernel.name} {kernel.version}"
    progress(step, None)
    _make_dir(downloads)
    tmp = downloads / f"{_TMP_PREFIX}{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        _run(step, ["apt-get", "download", "-q", f"{kernel.name}={kernel.version}"], cwd=tmp,
             hint="apt must reach its package archive; or put the .deb into "
                  f"{downloads} yourself")
        debs = sorted(tmp.glob("*.deb"))
        if len(debs) != 1:
            raise SandportError(f"{step}: apt-get left {len(debs)} .deb files in {tmp}")
        final = downloads / debs[0].name
        debs[0].replace(final)
        return final
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@dataclass(frozen=True, slots=True, kw_only=True)
class _Kernel:
    """An extracted kernel: ``<cache>/kernels/<package>_<version>/``."""

    dir: Path
    release: str  # 6.1.0-57-amd64
    deb_sha256: str

    @property
    def vmlinux(self) -> Path:
        return self.dir / KERNEL_FILE

    def module(self, name: str) -> Path:
        return self.dir / "modules" / f"{name}.ko"


_XZ_MAGIC = b"\xfd7zXZ\x00"
_ELF_MAGIC = b"\x7fELF"
_MODULE_RE = re.compile(r"^(?:usr/)?lib/modules/[^/]+/kernel/.+/(?P<name>[^/]+)\.ko"
                        r"(?P<xz>\.xz)?$")


def _extract_kernel(deb: Path, dest: Path, progress: Progress) -> str:
    """Write ``dest/vmlinux`` and ``dest/modules/<name>.ko`` from a linux-image .deb;
    return the kernel release. ``dpkg-deb --fsys-tarfile`` streams the package's files
    as a tar; we keep the few we need."""
    step = f"extract the kernel and virtio modules from {deb.name}"
    progress(step, None)
    (dest / "modules").mkdir(parents=True)
    vmlinuz: bytes | None = None
    release = ""
    wanted = set(VIRTIO_MODULES)
    argv = [_program("dpkg-deb"), "--fsys-tarfile", str(deb)]
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        assert proc.stdout is not None  # PIPE: set
        assert proc.stderr is not None
        try:
            with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
                for member in tar:
                    name = member.name.removeprefix("./")
                    if not member.isfile():
                        continue
                    boot = re.fullmatch(r"boot/vmlinuz-(.+)", name)
                    module = _MODULE_RE.match(name)
                    if boot or (module and module.group("name") in wanted):
                        f = tar.extractfile(member)
                        data = f.read() if f is not None else b""
                    else:
                        continue
                    if boot:
                        vmlinuz, release = data, boot.group(1)
                    elif module:
                        if module.group("xz"):
                            data = lzma.decompress(data)
                        (dest / "modules" / f"{module.group('name')}.ko").write_bytes(data)
                        wanted.discard(module.group("name"))
        except (tarfile.TarError, lzma.LZMAError, EOFError) as exc:
            proc.kill()
            raise SandportError(f"{step}: {exc}: {_tail(proc.stderr.read().decode())}",
                                hint=f"delete {deb} to have it downloaded again") from None
        errors = proc.stderr.read().decode(errors="replace")
        if proc.wait() != 0:
            raise SandportError(f"{step}: dpkg-deb exited with status {proc.returncode}: "
                                f"{_tail(errors)}",
                                hint=f"delete {deb} to have it downloaded again")
    if vmlinuz is None:
        raise SandportError(f"{step}: the package has no boot/vmlinuz-*")
    if wanted:
        raise SandportError(f"{step}: the package lacks the modules {', '.join(sorted(wanted))}"
                            " (built into this kernel, or renamed?)")
    _decompress_vmlinuz(vmlinuz, dest / KERNEL_FILE, progress)
    return release


def _decompress_vmlinuz(vmlinuz: bytes, dest: Path, progress: Progress) -> None:
    """bzImage -> ELF: the payload after the boot stub is an xz stream of the ELF kernel."""
    step = "decompress vmlinuz to vmlinux"
    progress(step, None)
    start = vmlinuz.find(_XZ_MAGIC)
    if start < 0:
        raise SandportError(f"{step}: no xz stream in vmlinuz (not an xz-compressed kernel)")
    decompressor = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
    with dest.open("wb") as out:
        pos = start
        while not decompressor.eof and pos < len(vmlinuz):
            out.write(decompressor.decompress(vmlinuz[pos:pos + _COPY_CHUNK]))
            pos += _COPY_CHUNK
    if not decompressor.eof:
        raise SandportError(f"{step}: the xz stream in vmlinuz is truncated")
    with dest.open("rb") as f:
        if f.read(4) != _ELF_MAGIC:
            raise SandportError(f"{step}: the payload is not an ELF kernel")


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(_COPY_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _kernel(cache_dir: Path, downloads: Path, package: KernelPackage,
            progress: Progress) -> _Kernel:
    """The extracted kernel for ``package``, extracted now unless it already was.

    Caller holds the build lock.
    """
    kdir = cache_dir / KERNELS / f"{package.name}_{package.version.replace(':', '%3a')}"
    info = kdir / "kernel.json"
    with contextlib.suppress(OSError, ValueError, KeyError):
        doc = json.loads(info.read_text())
        kernel = _Kernel(dir=kdir, release=doc["release"], deb_sha256=doc["deb_sha256"])
        if kernel.vmlinux.is_file() and all(kernel.module(m).is_file()
                                            for m in VIRTIO_MODULES):
            return kernel
    deb = _download_kernel(package, downloads, progress)
    tmp = kdir.parent / f"{_TMP_PREFIX}{kdir.name}-{secrets.token_hex(4)}"
    try:
        release = _extract_kernel(deb, tmp, progress)
        doc = {"package": package.name, "version": package.version, "release": release,
               "deb": deb.name, "deb_sha256": _file_sha256(deb)}
        (tmp / "kernel.json").write_text(json.dumps(doc, indent=2) + "\n")
        if kdir.exists():  # an incomplete one (a file missing): replace it
            shutil.rmtree(kdir)
        tmp.rename(kdir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return _Kernel(dir=kdir, release=release, deb_sha256=str(doc["deb_sha256"]))


# --------------------------------------------------------------------------------------------
# Host files: which ones, which packages own them.
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=256)
def _ldd_cached(path: str, _ino: int, _mtime_ns: int) -> tuple[str, ...]:
    done = _run(f"list the libraries of {path}", ["ldd", path], ok=(0, 1))
    if "not a dynamic executable" in done.stderr + done.stdout:
        return ()  # static: nothing to copy
    libs = []
    for raw in done.stdout.splitlines():
        line = raw.strip()
        if "statically linked" in line:
            return ()
        if "=> not found" in line:
            raise MissingPackage(f"{path} needs {line.split()[0]}, which is not installed",
                                 hint="reinstall the package that provides it")
        if "=>" in line:
            target = line.split("=>", 1)[1].split("(")[0].strip()
            if target:
                libs.append(target)
        elif line.startswith("/"):
            libs.append(line.split()[0])  # the dynamic loader
    if done.returncode != 0 and not libs:
        raise SandportError(f"ldd {path} failed: {_tail(done.stderr + done.stdout)}")
    return tuple(libs)


def _ldd(path: str) -> tuple[str, ...]:
    """The shared libraries (and dynamic loader) ``path`` loads, as ldd names them."""
    st = os.stat(path)
    return _ldd_cached(path, st.st_ino, st.st_mtime_ns)


def _host_paths(profile: str) -> list[str]:
    """Every host path the profile's root copies: programs, their libraries, data."""
    plan = _PLANS[profile]
    paths: list[str] = []
    for name in plan.programs:
        program = _program(name)
        paths += [program, *_ldd(program)]
    for path in plan.paths:
        if not os.path.exists(path):
            package = _PATH_PACKAGES.get(path, "the package that provides it")
            raise MissingPackage(f"{path} is missing (the {profile} image copies it)",
                                 hint=f"apt-get install {package}")
        paths.append(path)
    paths += [p for p in plan.optional if os.path.exists(p)]
    return list(dict.fromkeys(paths))


_MERGED = ("bin", "sbin", "lib", "lib64", "lib32", "libx32")


def _dpkg_names(path: str) -> set[str]:
    """The names dpkg may know a file by: as given and resolved, each with and without
    the ``/usr`` prefix (Debian 12 merged /bin, /lib... into /usr; dpkg's database still
    records whichever path each package shipped)."""
    names = {path, os.path.realpath(path)}
    for name in list(names):
        top = name.split("/")[1:3]
        if top and top[0] in _MERGED:
            names.add("/usr" + name)
        elif len(top) == 2 and top[0] == "usr" and top[1] in _MERGED:
            names.add(name.removeprefix("/usr"))
    return names


def _tree_sha256(path: str) -> str:
    """SHA-256 of a file, or of a directory's names, link targets and file contents."""
    if not os.path.isdir(path):
        return _file_sha256(Path(path))
    digest = hashlib.sha256()
    for p in sorted(Path(path).rglob("*")):
        digest.update(str(p).encode() + b"\0")
        if p.is_symlink():
            digest.update(os.readlink(p).encode())
        elif p.is_file():
            digest.update(_file_sha256(p).encode())
    return digest.hexdigest()


def _package_inputs(paths: list[str]) -> dict[str, str]:
    """``pkg:<name>`` -> version for each package owning one of ``paths``; ``file:<path>``
    -> SHA-256 for a path no package owns."""
    queries: dict[str, str] = {}
    for path in paths:
        for name in _dpkg_names(path):
            queries.setdefault(name, path)
    done = _run("find the packages of the copied files", ["dpkg-query", "-S", *queries],
                ok=(0, 1))
    owned: set[str] = set()
    packages: set[str] = set()
    for line in done.stdout.splitlines():
        owners, sep, path = line.partition(": ")
        if not sep or path not in queries or owners.startswith("diversion by"):
            continue
        owned.add(queries[path])
        packages.update(o.strip().split(":")[0] for o in owners.split(","))
    inputs: dict[str, str] = {}
    if packages:
        shown = _run("read package versions", ["dpkg-query", "-W", "-f",
                                               "${Package}\t${Version}\n", *sorted(packages)])
        for line in shown.stdout.splitlines():
            name, _, version = line.partition("\t")
            inputs[f"pkg:{name}"] = version
    for path in paths:
        if path not in owned:
            inputs[f"file:{path}"] = _tree_sha256(path)
    return inputs


# --------------------------------------------------------------------------------------------
# Inputs, keys, finding and listing images.
# --------------------------------------------------------------------------------------------


def _check_profile(profile: str) -> None:
    if profile not in IMAGE_PROFILES:
        raise UsageError(f"no image profile {profile!r}; image profiles: "
                         f"{', '.join(IMAGE_PROFILES)}")


def _sha256_text(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def image_inputs(profile: str, *, cache_dir: Path | None = DEFAULT_IMAGE_CACHE,
                 ) -> dict[str, str]:
    """Everything an image of ``profile`` is made from; its key is the SHA-256 of this.

    ``builder`` (:data:`BUILDER_VERSION`), ``profile``, ``arch``, ``kernel_package`` and
    ``kernel_version`` (what apt would fetch now), ``modules``, ``init_sha256`` (the
    ``/init`` text), ``files_sha256`` (every generated file), ``plan_sha256`` (the list
    of host programs and paths copied), then ``pkg:<name>`` -> version for every Debian
    package owning a copied file (libraries included) and ``file:<path>`` -> SHA-256 for
    a copied file no package owns.

    Args:
        profile: ``echo`` or ``desktop``.
        cache_dir: where the kernel resolution is remembered (see :func:`resolve_kernel`);
            None: ask apt every time.

    Raises:
        UsageError: unknown profile, apt knows no kernel, a program or file is missing.
    """
    _check_profile(profile)
    kernel = resolve_kernel(cache_dir)
    generated = guest_files(profile)
    files_digest = hashlib.sha256()
    for path in sorted(generated):
        content, mode = generated[path]
        files_digest.update(f"{path}\0{mode:o}\0{_sha256_text(content)}\n".encode())
    plan = _PLANS[profile]
    inputs = {
        "builder": BUILDER_VERSION,
        "profile": profile,
        "arch": platform.machine(),
        "kernel_package": kernel.name,
        "kernel_version": kernel.version,
        "modules": " ".join(VIRTIO_MODULES),
        "init_sha256": _sha256_text(generated["/init"][0]),
        "files_sha256": files_digest.hexdigest(),
        "plan_sha256": _sha256_text(repr(plan).encode()),
    }
    inputs.update(sorted(_package_inputs(_host_paths(profile)).items()))
    return inputs


def image_key(inputs: Mapping[str, str]) -> str:
    """The content address of an image: SHA-256 of its inputs as canonical JSON."""
    canonical = json.dumps(dict(inputs), sort_keys=True, separators=(",", ":"))
    return _sha256_text(canonical.encode())


def _image_dir(cache_dir: Path, profile: str, key: str) -> Path:
    return cache_dir / f"{profile}-{key[:16]}"


def _load_image(path: Path) -> Image | None:
    """The image in ``path``, or None if it is not a complete image."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        profile, key = str(manifest["profile"]), str(manifest["key"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    image = Image(profile=profile, key=key, dir=path, kernel=path / KERNEL_FILE,
                  initrd=path / INITRD_FILE, manifest=manifest)
    if path.name != f"{profile}-{key[:16]}" or not (image.kernel.is_file()
                                                     and image.initrd.is_file()):
        return None
    return image


def find_image(profile: str, cache_dir: Path = DEFAULT_IMAGE_CACHE) -> Image | None:
    """The image for ``profile``'s *current* inputs, if it was built; else None.

    An image built from older inputs (an upgraded package, a new kernel) is not returned.

    Raises:
        UsageError: as :func:`image_inputs`.
    """
    key = image_key(image_inputs(profile, cache_dir=cache_dir))
    image = _load_image(_image_dir(cache_dir, profile, key))
    return image if image is not None and image.key == key else None


def list_images(cache_dir: Path = DEFAULT_IMAGE_CACHE) -> list[Image]:
    """Every complete image in ``cache_dir`` (current or not), by profile, newest first."""
    try:
        entries = sorted(cache_dir.iterdir())
    except OSError:
        return []
    images = [img for p in entries if _DIR_RE.match(p.name) and p.is_dir()
              if (img := _load_image(p)) is not None]
    images.sort(key=lambda i: str(i.manifest.get("built_at", "")), reverse=True)
    images.sort(key=lambda i: i.profile)
    return images


# --------------------------------------------------------------------------------------------
# Building.
# --------------------------------------------------------------------------------------------


def _make_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create {path}: {exc.strerror}",
                         hint="run as root, or choose a directory you can write "
                              "(--cache-dir)") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise UsageError(f"cannot write to {path}",
                         hint="run as root, or choose a directory you can write "
                              "(--cache-dir)")


@contextlib.contextmanager
def _build_lock(cache_dir: Path, progress: Progress) -> Iterator[None]:
    """Hold ``<cache>/.lock``: one builder at a time per cache (flock: released when the
    process dies, so a killed build never blocks the next)."""
    fd = os.open(cache_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            progress("wait for another build of this cache", None)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _remove_stale(cache_dir: Path) -> None:
    """Temporary directories of killed builds (only called under the lock)."""
    for parent in (cache_dir, cache_dir / KERNELS):
        with contextlib.suppress(OSError):
            for p in parent.iterdir():
                if p.name.startswith(_TMP_PREFIX):
                    shutil.rmtree(p, ignore_errors=True)


def _within(root: Path, guest: str) -> Path:
    """Where guest path ``guest`` lives inside ``root``, following the root's own
    symlinks (absolute targets are relative to ``root``); missing directories are made.
    The last component is not followed."""
    parts = [p for p in guest.split("/") if p]
    current = root
    hops = 0
    while len(parts) > 1:
        part = parts.pop(0)
        candidate = current / part
        if candidate.is_symlink():
            hops += 1
            if hops > 40:
                raise SandportError(f"symlink loop at {candidate} in the image root")
            target = os.readlink(candidate)
            if target.startswith("/"):
                current = root
            parts[:0] = [p for p in target.split("/") if p]
            continue
        if part == "..":
            current = current.parent if current != root else root
            continue
        candidate.mkdir(exist_ok=True)
        current = candidate
    return current / parts[0] if parts else current


def _mirror(root: Path, host_path: str) -> None:
    """Copy ``host_path`` into ``root`` at the same path, reproducing each symlink on the
    way as a symlink (``/usr/bin/Xvnc -> /etc/alternatives/Xvnc -> /usr/bin/Xtigervnc``;
    ``/lib -> usr/lib``), so every name the programs use resolves in the guest too.
    Directories are copied whole (links inside stay links)."""
    todo = [p for p in host_path.split("/") if p]
    resolved = Path("/")  # the host path walked so far, free of symlinks
    hops = 0
    while todo:
        part = todo.pop(0)
        if part in (".", ""):
            continue
        if part == "..":
            resolved = resolved.parent
            continue
        host = resolved / part
        guest = root / host.relative_to("/")
        if host.is_symlink():
            hops += 1
            if hops > 40:
                raise SandportError(f"symlink loop at {host}")
            target = os.readlink(host)
            if not os.path.lexists(guest):
                guest.symlink_to(target)
            if target.startswith("/"):
                resolved = Path("/")
            todo[:0] = [p for p in target.split("/") if p]
            continue
        if todo:  # a directory on the way
            if not os.path.lexists(guest):
                guest.mkdir()
                shutil.copystat(host, guest)
            resolved = host
        elif host.is_dir():
            skip = _PYTHON_SKIP if str(host).startswith("/usr/lib/python3") else None
            shutil.copytree(host, guest, symlinks=True, dirs_exist_ok=True, ignore=skip)
        elif not os.path.lexists(guest):
            shutil.copy2(host, guest)


#: Parts of Python's stdlib the guest agent never imports: tests, tools, the static library.
_PYTHON_SKIP = shutil.ignore_patterns(
    "test", "tests", "idlelib", "tkinter", "turtledemo", "ensurepip", "lib2to3",
    "pydoc_data", "distutils", "config-3.*", "dist-packages", "site-packages")


def _assemble_root(root: Path, profile: str, kernel: _Kernel) -> None:
    """Lay out the guest's root file system in ``root`` (see the module docstring)."""
    root.mkdir()
    for top in _MERGED:  # merged /usr: the host's top-level links, as links
        host = Path("/") / top
        if host.is_symlink():
            (root / top).symlink_to(os.readlink(host))
    for d in ("dev", "proc", "sys", "run", "root", "etc", "tmp", "var/lib/xkb", "usr/bin",
              "usr/sbin", "usr/share/sandport"):
        _within(root, d + "/x").parent.mkdir(parents=True, exist_ok=True)
    (root / "root").chmod(0o700)
    (root / "tmp").chmod(0o1777)
    if profile == "desktop":
        (root / "tmp" / ".X11-unix").mkdir(mode=0o1777)
        (root / "tmp" / ".X11-unix").chmod(0o1777)
    for path in _host_paths(profile):
        _mirror(root, path)
    modules = _within(root, f"{GUEST_MODULE_DIR}/x").parent
    modules.mkdir(parents=True, exist_ok=True)
    for name in VIRTIO_MODULES:
        shutil.copyfile(kernel.module(name), modules / f"{name}.ko")
    for path, (content, mode) in guest_files(profile).items():
        dest = _within(root, path)
        dest.write_bytes(content)
        dest.chmod(mode)
    # busybox's applets as links to it, where no real program of that name was copied.
    busybox = os.path.realpath(_program("busybox"))
    applets = _run("list busybox applets", ["busybox", "--list-full"]).stdout.split()
    for applet in applets:
        if applet == "linuxrc":
            continue
        link = _within(root, applet)
        if not os.path.lexists(link):
            link.symlink_to(busybox)


def _write_initramfs(root: Path, work: Path, dest: Path, progress: Progress) -> int:
    """cpio the root, lz4 it into ``dest``, pad it; return the uncompressed size."""
    raw = work / "initramfs.raw"
    with raw.open("wb") as f:
        writer = CpioWriter(f)
        writer.add_tree(root, lambda fraction: progress("write the cpio archive", fraction))
        writer.add_char_device("dev/console", 0o600, 5, 1)  # init's stdio before devtmpfs
        writer.finish()
        unpacked = writer.written
    progress("compress it (lz4 -l -9)", None)
    _run("compress the initramfs", ["lz4", "-l", "-9", "-q", "-f", str(raw), str(dest)])
    raw.unlink()
    # Zeros to a 4-byte boundary, and 4 more: the kernel's lz4 decoder ends at a zero
    # chunk length, and a seed archive appended after this starts 4-aligned, as the
    # initramfs unpacker requires.
    size = dest.stat().st_size
    with dest.open("ab") as f:
        f.write(b"\0" * (-size % 4 + 4))
    return unpacked


def build_image(profile: str, cache_dir: Path = DEFAULT_IMAGE_CACHE, *, force: bool = False,
                progress: Progress | None = None,
                downloads_dir: Path | None = None) -> Image:
    """The image for ``profile``'s current inputs: the cached one at once if it exists
    (nothing is written then), else built now.

    Steps (each reported as ``progress(step, fraction or None)``; a cached image reports
    ``("cached", 1.0)``): resolve the kernel package, download it (once, into
    ``downloads_dir``), extract vmlinux and the virtio modules (once per kernel version,
    into ``<cache>/kernels/``), assemble the root in a temporary directory in the cache,
    write the cpio archive, compress it, then rename the finished directory into place.
    A lock file serializes builders of one cache; a killed build leaves only a temporary
    directory, which the next build removes.

    Args:
        profile: ``echo`` or ``desktop``.
        cache_dir: the image cache.
        force: build even if the image exists (it is replaced).
        progress: called with each step's name and a fraction done (None: unknown).
        downloads_dir: where kernel .debs are kept; default ``<cache_dir>/downloads``.

    Raises:
        UsageError: unknown profile, no kernel known to apt, a program or file missing,
            the cache not writable.
        SandportError: a step failed (the message names it and shows the output).
    """
    report: Progress = progress or (lambda _step, _fraction: None)
    t0 = time.monotonic()
    report("check inputs", None)
    _check_profile(profile)
    _make_dir(cache_dir)  # first: image_inputs remembers apt's answer there
    inputs = image_inputs(profile, cache_dir=cache_dir)
    key = image_key(inputs)
    final = _image_dir(cache_dir, profile, key)
    if not force and (found := _load_image(final)) is not None and found.key == key:
        report("cached", 1.0)
        return found
    with _build_lock(cache_dir, report):
        if not force and (found := _load_image(final)) is not None and found.key == key:
            report("cached", 1.0)  # another builder finished it while we waited
            return found
        _remove_stale(cache_dir)
        report("resolve the kernel package", None)
        package = resolve_kernel(cache_dir)
        if (package.name, package.version) != (inputs["kernel_package"],
                                               inputs["kernel_version"]):
            raise SandportError("apt's kernel changed during the build (apt-get update?)",
                                hint="build again")
        kernel = _kernel(cache_dir, downloads_dir or cache_dir / DOWNLOADS, package, report)
        work = cache_dir / f"{_TMP_PREFIX}{profile}-{secrets.token_hex(4)}"
        work.mkdir()
        try:
            report("assemble the root", None)
            root = work / "root"
            _assemble_root(root, profile, kernel)
            out = work / "image"
            out.mkdir()
            unpacked = _write_initramfs(root, work, out / INITRD_FILE, report)
            report("install", None)
            try:
                os.link(kernel.vmlinux, out / KERNEL_FILE)  # one copy per kernel version
            except OSError:
                shutil.copyfile(kernel.vmlinux, out / KERNEL_FILE)
            manifest = {
                "profile": profile,
                "key": key,
                "inputs": inputs,
                "kernel_version": kernel.release,
                "kernel_deb_sha256": kernel.deb_sha256,
                "cmdline": KERNEL_CMDLINE,
                "sizes": {
                    "vmlinux": (out / KERNEL_FILE).stat().st_size,
                    "initramfs": (out / INITRD_FILE).stat().st_size,
                    "unpacked": unpacked,
                },
                "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "build_seconds": round(time.monotonic() - t0, 2),
            }
            (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
            if final.exists():  # force: move the old one aside, then swap
                old = cache_dir / f"{_TMP_PREFIX}old-{final.name}-{secrets.token_hex(4)}"
                final.rename(old)
            out.rename(final)
        finally:
            shutil.rmtree(work, ignore_errors=True)
            for p in cache_dir.glob(f"{_TMP_PREFIX}old-{final.name}-*"):
                shutil.rmtree(p, ignore_errors=True)
    image = _load_image(final)
    if image is None:
        raise SandportError(f"the image built in {final} cannot be read back")
    log.info("built the %s image %s in %.1f s", profile, key[:16], time.monotonic() - t0)
    report("built", 1.0)
    return image
