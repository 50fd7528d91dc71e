"""The per-sandbox seed: what differs per sandbox, appended to a shared image's initramfs.

Owns: the seed's guest paths (:data:`SEED_ENV`, :data:`SEED_VNC_PASSWORD`), shell
``KEY='value'`` files (:func:`shell_env`, also used for the image's own ``image.env``),
the seed archive (:func:`seed_archive`) and the initrd a VM boots (:func:`write_initrd`).

Must not touch: the image cache, the build, host programs. The backend decides what a seed
holds; this module only encodes it.

Linux unpacks concatenated archives in order, later files overwriting earlier ones, so
the seed (an uncompressed newc archive) simply follows the image's ``initramfs.cpio``,
which already ends 4-aligned (see :mod:`sandport.sandbox.images.build`).
"""

from __future__ import annotations

import io
import os
import re
import shlex
import shutil
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from sandport.sandbox.images.cpio import COPY_CHUNK, CpioWriter

if TYPE_CHECKING:
    from sandport.sandbox.images.build import Image

#: Shell ``KEY='value'`` lines /init sources: SANDPORT_SANDBOX_ID, SANDPORT_COLOUR, ...
SEED_ENV = "/etc/sandport/seed.env"
#: TigerVNC's obfuscated password file (desktop), mode 0600.
SEED_VNC_PASSWORD = "/etc/sandport/vncpasswd"  # noqa: S105 - a path, not a password

_ENV_NAME = re.compile(r"^[A-Z_][A-Z0-9_]*$")


def shell_env(values: Mapping[str, str], *, what: str) -> bytes:
    """``KEY='value'`` lines for a shell to source; values are shell-quoted, so any text
    (spaces, quotes, ``$``, backquotes) arrives unchanged and nothing in it runs.

    Args:
        values: variable name -> value, in the order to write them.
        what: what the file is, for the error message (``seed``, ``image``).

    Raises:
        ValueError: a key is not an upper-case shell name, or a value contains NUL.
    """
    lines = []
    for key, value in values.items():
        if not _ENV_NAME.match(key):
            raise ValueError(f"bad {what} variable name {key!r}")
        if "\0" in value:
            raise ValueError(f"{what} variable {key} contains NUL")
        lines.append(f"{key}={shlex.quote(value)}\n")
    return "".join(lines).encode()


def seed_env(values: Mapping[str, str]) -> bytes:
    """The content of ``/etc/sandport/seed.env``: ``KEY='value'`` lines /init sources.

    Values are shell-quoted, so any text (spaces, quotes, ``$``) arrives unchanged.

    Raises:
        ValueError: a key is not an upper-case shell name, or a value contains NUL.
    """
    return shell_env(values, what="seed")


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


def write_initrd(image: Image, seed: bytes, dest: Path) -> None:
    """Write ``dest``: the image's initramfs followed by ``seed`` (mode 0600: it may hold
    a password file)."""
    tmp = dest.with_name(f"{dest.name}.tmp")
    with tmp.open("wb") as out:
        os.fchmod(out.fileno(), 0o600)
        with image.initrd.open("rb") as src:
            shutil.copyfileobj(src, out, COPY_CHUNK)
        out.write(seed)
    tmp.replace(dest)
