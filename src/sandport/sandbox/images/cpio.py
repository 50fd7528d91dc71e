"""cpio "newc": the archive format the kernel's initramfs unpacker reads.

Owns: the newc header (:class:`NewcHeader`, pure bytes in and out), reading an archive
back (:func:`read_cpio`, pure) and writing one entry by entry to a binary stream
(:class:`CpioWriter`, the only part that does I/O: it streams host files and trees).

Must not touch: what goes into an image (the root, the seed, the kernel), the image cache
or host programs. It knows archives, not guests.

The format (man 5 cpio, "New ASCII Format")::

    Each entry: a 110-byte ASCII header, the NUL-terminated name, zero padding to a
    multiple of 4, the data, zero padding to a multiple of 4. Header = "070701" and 13
    fields of 8 hex digits:

    ino mode uid gid nlink mtime filesize devmajor devminor rdevmajor rdevminor namesize check

    A symlink's data is its target. The archive ends with an entry named "TRAILER!!!".
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO

from sandport.errors import SandportError

NEWC_MAGIC = b"070701"
NEWC_FIELD_LEN = 8  # hex digits per field
NEWC_FIELDS = ("ino", "mode", "uid", "gid", "nlink", "mtime", "filesize", "devmajor",
               "devminor", "rdevmajor", "rdevminor", "namesize", "check")
NEWC_HEADER_LEN = len(NEWC_MAGIC) + NEWC_FIELD_LEN * len(NEWC_FIELDS)  # 110
CPIO_TRAILER = "TRAILER!!!"
#: How much of a file is read (or decompressed) at a time.
COPY_CHUNK = 1 << 20


def pad4(n: int) -> bytes:
    """The zero bytes that bring ``n`` bytes to a multiple of 4."""
    return b"\0" * (-n % 4)


@dataclass(frozen=True, slots=True, kw_only=True)
class NewcHeader:
    """The 110-byte header of one newc entry (the name follows it).

    The format's 13 fields, in order, with each major/minor and uid/gid pair as one
    attribute; every number fits 32 bits.

    Attributes:
        ino: the inode number (entries with one number are hard links).
        mode: file type and permission bits (``stat.S_IFREG | 0o644``).
        owner: (uid, gid).
        nlink: the link count.
        mtime: modification time, seconds since the epoch.
        filesize: the data's length (a symlink: its target's).
        dev: (major, minor) of the device the file was on.
        rdev: (major, minor) of a device node.
        namesize: the name's length, its NUL included.
        check: always 0 in "070701" archives.
    """

    ino: int = 0
    mode: int = 0
    owner: tuple[int, int] = (0, 0)
    nlink: int = 1
    mtime: int = 0
    filesize: int = 0
    dev: tuple[int, int] = (0, 0)
    rdev: tuple[int, int] = (0, 0)
    namesize: int = 0
    check: int = 0

    def fields(self) -> tuple[int, ...]:
        """The 13 numbers in header order (:data:`NEWC_FIELDS`)."""
        return (self.ino, self.mode, *self.owner, self.nlink, self.mtime, self.filesize,
                *self.dev, *self.rdev, self.namesize, self.check)

    def __bytes__(self) -> bytes:
        return NEWC_MAGIC + "".join(f"{v:08X}" for v in self.fields()).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> NewcHeader:
        """Parse the first :data:`NEWC_HEADER_LEN` bytes of ``data``.

        Raises:
            ValueError: too short, no newc magic, or a field is not hex.
        """
        if len(data) < NEWC_HEADER_LEN or data[:len(NEWC_MAGIC)] != NEWC_MAGIC:
            raise ValueError("no newc header")
        digits = data[len(NEWC_MAGIC):NEWC_HEADER_LEN]
        try:
            v = [int(digits[i:i + NEWC_FIELD_LEN], 16)
                 for i in range(0, len(digits), NEWC_FIELD_LEN)]
        except ValueError:
            raise ValueError("bad newc header") from None
        return cls(ino=v[0], mode=v[1], owner=(v[2], v[3]), nlink=v[4], mtime=v[5],
                   filesize=v[6], dev=(v[7], v[8]), rdev=(v[9], v[10]), namesize=v[11],
                   check=v[12])


def entry_head(header: NewcHeader, name: str) -> bytes:
    """``header`` (its ``namesize`` set from ``name``), the name and its padding.

    Raises:
        ValueError: ``name`` is empty, absolute or holds a NUL.
    """
    if not name or name.startswith("/") or "\0" in name:
        raise ValueError(f"bad cpio entry name {name!r}")
    encoded = name.encode() + b"\0"
    head = bytes(replace(header, namesize=len(encoded)))
    return head + encoded + pad4(NEWC_HEADER_LEN + len(encoded))


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
        try:
            header = NewcHeader.from_bytes(data[pos:pos + NEWC_HEADER_LEN])
        except ValueError as exc:
            raise ValueError(f"{exc} at offset {pos}") from None
        name_end = pos + NEWC_HEADER_LEN + header.namesize
        name = data[pos + NEWC_HEADER_LEN:name_end - 1].decode()
        body = name_end + len(pad4(NEWC_HEADER_LEN + header.namesize))
        end = body + header.filesize
        if end > len(data):
            raise ValueError(f"entry {name!r} runs past the end of the archive")
        if name == CPIO_TRAILER:
            return entries
        entries.append(CpioEntry(name=name, mode=header.mode, data=data[body:end],
                                 rdev=header.rdev))
        pos = end + len(pad4(end))


class CpioWriter:
    """Writes a newc cpio archive to a binary stream, entry by entry.

    Names are guest paths without the leading ``/`` (``etc/passwd``); a parent directory
    must come before what it holds (the kernel does not create missing parents). Owner is
    always root. Call :meth:`finish` to write the trailer.

    Attributes:
        written: bytes written so far.
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
        self._ino += 1
        header = NewcHeader(ino=self._ino, mode=mode, nlink=nlink,
                            mtime=max(0, mtime) & 0xFFFFFFFF, filesize=size, rdev=rdev)
        self._write(entry_head(header, name))

    def add_dir(self, name: str, perm: int = 0o755, mtime: int = 0) -> None:
        """A directory."""
        self._header(name, stat.S_IFDIR | perm, 0, nlink=2, mtime=mtime)

    def add_file(self, name: str, data: bytes, perm: int = 0o644, mtime: int = 0) -> None:
        """A regular file with ``data``."""
        self._header(name, stat.S_IFREG | perm, len(data), mtime=mtime)
        self._write(data + pad4(len(data)))

    def add_host_file(self, name: str, path: Path, st: os.stat_result) -> None:
        """A regular file copied from ``path`` (``st``: its lstat), streamed.

        Raises:
            SandportError: the file shrank while it was read.
        """
        self._header(name, stat.S_IFREG | stat.S_IMODE(st.st_mode), st.st_size,
                     mtime=int(st.st_mtime))
        left = st.st_size
        with path.open("rb") as f:
            while left:
                chunk = f.read(min(left, COPY_CHUNK))
                if not chunk:
                    raise SandportError(f"{path} shrank while it was archived")
                self._write(chunk)
                left -= len(chunk)
        self._write(pad4(st.st_size))

    def add_symlink(self, name: str, target: str, mtime: int = 0) -> None:
        """A symbolic link to ``target``."""
        data = target.encode()
        self._header(name, stat.S_IFLNK | 0o777, len(data), mtime=mtime)
        self._write(data + pad4(len(data)))

    def add_char_device(self, name: str, perm: int, major: int, minor: int) -> None:
        """A character device node (``dev/console``: no mknod, so no root, needed)."""
        self._header(name, stat.S_IFCHR | perm, 0, rdev=(major, minor))

    def add_tree(self, root: Path, progress: Callable[[float], None] | None = None) -> None:
        """Everything below ``root`` (not ``root`` itself), parents first, sorted.

        Symlinks are archived as links, never followed.

        Raises:
            SandportError: something below ``root`` is not a file, link or directory.
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
