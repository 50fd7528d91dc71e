"""Host programs and directories the image builder uses.

Owns: finding a host program (a missing one names its Debian package, :data:`PACKAGES`),
running one for a build step with its output in the error (:func:`run`), making a
directory the builder must write (:func:`make_dir`) and the prefix of its unfinished
ones (:data:`TMP_PREFIX`), hashing a file, and the progress callback type every build
step reports through.

Must not touch: what goes into an image, the kernel, the cache layout. This is the
builder's only door to ``subprocess`` besides ``dpkg-deb``'s stream in
:mod:`sandport.sandbox.images.kernel`.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

from sandport.errors import MissingPackage, SandportError, UsageError
from sandport.sandbox.images.cpio import COPY_CHUNK

#: ``progress(step, fraction done or None)``: how a build reports each step.
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
_SEARCH_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: The name of a directory (or file) the builder is still writing: renamed into place
#: when done, removed by the next build if the builder was killed.
TMP_PREFIX = ".tmp-"
_WRITE_HINT = "run as root, or choose a directory you can write (--cache-dir)"


def program(name: str) -> str:
    """The path of a host program.

    Raises:
        MissingPackage: it is not installed; the hint names its Debian package.
    """
    path = shutil.which(name, path=_SEARCH_PATH)
    if path is None:
        package = PACKAGES.get(name, name)
        raise MissingPackage(f"{name} is not installed (the image builder needs it)",
                             hint=f"apt-get install {package}   (or run scripts/setup.sh)")
    return path


def tail(text: str, limit: int = 2000) -> str:
    """The last ``limit`` characters of ``text``, stripped (``...`` marks a cut)."""
    text = text.strip()
    return text if len(text) <= limit else "..." + text[-limit:]


def run(step: str, argv: list[str], *, cwd: Path | None = None,
        ok: tuple[int, ...] = (0,), hint: str = "") -> subprocess.CompletedProcess[str]:
    """Run a host program for build step ``step``.

    Raises:
        MissingPackage: the program is not installed.
        SandportError: it cannot start, or its exit status is not in ``ok`` (the message
            holds the tail of its output).
    """
    argv = [program(argv[0]), *argv[1:]]
    try:
        done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False,
                              errors="replace")
    except OSError as exc:
        raise SandportError(f"{step}: cannot run {argv[0]}: {exc}") from None
    if done.returncode not in ok:
        output = tail(done.stderr + done.stdout) or "(no output)"
        raise SandportError(
            f"{step}: `{shlex.join(argv)}` exited with status {done.returncode}:\n{output}",
            hint=hint)
    return done


def make_dir(path: Path) -> None:
    """Create ``path`` (and parents) if needed; it must be writable.

    Raises:
        UsageError: it cannot be created or written (the hint suggests root or
            ``--cache-dir``).
    """
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create {path}: {exc.strerror}", hint=_WRITE_HINT) from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise UsageError(f"cannot write to {path}", hint=_WRITE_HINT)


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file's content, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(COPY_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()
