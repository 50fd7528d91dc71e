"""The build: assembling a profile's root, packing it, and the image cache it lives in.

Owns: the image cache directory and its layout, the :class:`Image` found there
(:func:`find_image`, :func:`list_images`), the one-builder-at-a-time lock, assembling the
guest's root from host files, the kernel's modules and the generated files, writing it as
a cpio archive compressed with ``lz4 -l``, and :func:`build_image`, which ties the steps
together.

What goes into the root, for every profile: busybox (its applets as symlinks), the virtio
drivers Debian builds as modules (``virtio_mmio`` is the bus of QEMU's ``-M microvm``;
``virtio_net`` needs ``net_failover``), and the generated files of
:func:`~sandport.sandbox.images.scripts.guest_files` (``/init`` ...). The programs of the
profile's plan (:data:`~sandport.sandbox.images.inputs.PLANS`), every library ``ldd``
names for them and their data are copied from the host's installed Debian packages at
their real paths, each symlink on the way reproduced as a symlink.

Must not touch: what the inputs are (:mod:`~sandport.sandbox.images.inputs`), what the
guest scripts say (:mod:`~sandport.sandbox.images.scripts`), how the kernel is fetched
(:mod:`~sandport.sandbox.images.kernel`), the per-sandbox seed
(:mod:`~sandport.sandbox.images.seed`).

The cache directory::

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
import json
import logging
import os
import re
import secrets
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sandport.config import DEFAULT_IMAGE_CACHE
from sandport.errors import SandportError
from sandport.sandbox.images.cpio import CpioWriter
from sandport.sandbox.images.host import TMP_PREFIX, Progress, make_dir, program, run
from sandport.sandbox.images.inputs import MERGED, host_paths, image_inputs, image_key
from sandport.sandbox.images.kernel import (
    DOWNLOADS,
    KERNEL_CMDLINE,
    KERNEL_FILE,
    KERNELS,
    VIRTIO_MODULES,
    ExtractedKernel,
    extracted_kernel,
    resolve_kernel,
)
from sandport.sandbox.images.scripts import GUEST_MODULE_DIR, check_profile, guest_files

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
INITRD_FILE = "initramfs.cpio"
LOCK_FILE = ".lock"
_DIR_RE = re.compile(r"^(?P<profile>[a-z]+)-(?P<key>[0-9a-f]{16})$")


@dataclass(frozen=True, slots=True, kw_only=True)
class Image:
    """A built guest image (see :mod:`sandport.sandbox.images`).

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


def _image_dir(cache_dir: Path, profile: str, key: str) -> Path:
    """Where the image of ``profile`` with ``key`` lives in ``cache_dir``."""
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
    if path != _image_dir(path.parent, profile, key) or not (image.kernel.is_file()
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
                if p.name.startswith(TMP_PREFIX):
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
            skip = PYTHON_SKIP if str(host).startswith("/usr/lib/python3") else None
            shutil.copytree(host, guest, symlinks=True, dirs_exist_ok=True, ignore=skip)
        elif not os.path.lexists(guest):
            shutil.copy2(host, guest)


#: Parts of Python's stdlib the guest agent never imports: tests, tools, the static library.
PYTHON_SKIP = shutil.ignore_patterns(
    "test", "tests", "idlelib", "tkinter", "turtledemo", "ensurepip", "lib2to3",
    "pydoc_data", "distutils", "config-3.*", "dist-packages", "site-packages")


def _assemble_root(root: Path, profile: str, kernel: ExtractedKernel) -> None:
    """Lay out the guest's root file system in ``root`` (see the module docstring): the
    merged-/usr links, the empty directories, the host files of the profile's plan, the
    virtio modules, the generated files, then busybox's applets."""
    root.mkdir()
    for top in MERGED:  # merged /usr: the host's top-level links, as links
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
    for path in host_paths(profile):
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
    busybox = os.path.realpath(program("busybox"))
    applets = run("list busybox applets", ["busybox", "--list-full"]).stdout.split()
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
    run("compress the initramfs", ["lz4", "-l", "-9", "-q", "-f", str(raw), str(dest)])
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
    check_profile(profile)
    make_dir(cache_dir)  # first: image_inputs remembers apt's answer there
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
        downloads = downloads_dir or cache_dir / DOWNLOADS
        kernel = extracted_kernel(cache_dir, downloads, package, report)
        work = cache_dir / f"{TMP_PREFIX}{profile}-{secrets.token_hex(4)}"
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
                old = cache_dir / f"{TMP_PREFIX}old-{final.name}-{secrets.token_hex(4)}"
                final.rename(old)
            out.rename(final)
        finally:
            shutil.rmtree(work, ignore_errors=True)
            for p in cache_dir.glob(f"{TMP_PREFIX}old-{final.name}-*"):
                shutil.rmtree(p, ignore_errors=True)
    image = _load_image(final)
    if image is None:
        raise SandportError(f"the image built in {final} cannot be read back")
    log.info("built the %s image %s in %.1f s", profile, key[:16], time.monotonic() - t0)
    report("built", 1.0)
    return image
