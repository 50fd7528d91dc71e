"""The guest kernel: which Debian package, downloaded once, extracted once per version.

Owns: resolving the kernel ABI package apt would fetch now (:func:`resolve_kernel`, its
answer remembered in ``<cache>/kernel-candidate.json``), downloading its .deb into
``<cache>/downloads/``, extracting ``vmlinux`` and the virtio modules into
``<cache>/kernels/<package>_<version>/`` (:func:`extracted_kernel`), and the kernel command
line every image boots with.

Must not touch: the guest's root file system, the image directories, what the guest runs.
Callers hold the cache's build lock before :func:`extracted_kernel`.

Debian ships ``vmlinuz``: a boot stub plus the kernel as an xz stream. We keep the
decompressed ELF: QEMU boots an ELF with ``-kernel`` through its PVH entry point, which
skips the stub's decompression (about 6 s under TCG).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import lzma
import os
import re
import secrets
import shutil
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path

from sandport.errors import SandportError, UsageError
from sandport.sandbox.images.cpio import COPY_CHUNK
from sandport.sandbox.images.host import (
    TMP_PREFIX,
    Progress,
    file_sha256,
    make_dir,
    program,
    run,
    tail,
)

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
#: The uncompressed ELF kernel, in an extracted kernel's and in an image's directory.
KERNEL_FILE = "vmlinux"
DOWNLOADS = "downloads"
KERNELS = "kernels"
KERNEL_MEMO = "kernel-candidate.json"

_XZ_MAGIC = b"\xfd7zXZ\x00"
_ELF_MAGIC = b"\x7fELF"
_MODULE_RE = re.compile(r"^(?:usr/)?lib/modules/[^/]+/kernel/.+/(?P<name>[^/]+)\.ko"
                        r"(?P<xz>\.xz)?$")


@dataclass(frozen=True, slots=True, kw_only=True)
class KernelPackage:
    """The kernel ABI package apt would fetch now (``linux-image-6.1.0-57-amd64``)."""

    name: str
    version: str

    @property
    def file_name(self) -> str:
        """``<name>_<version>`` as a file name (an epoch's ``:`` escaped as apt does)."""
        return f"{self.name}_{self.version.replace(':', '%3a')}"


@dataclass(frozen=True, slots=True, kw_only=True)
class ExtractedKernel:
    """An extracted kernel: ``<cache>/kernels/<package>_<version>/``.

    Attributes:
        dir: the directory.
        release: the kernel release (``6.1.0-57-amd64``).
        deb_sha256: hex SHA-256 of the .deb it came from.
    """

    dir: Path
    release: str
    deb_sha256: str

    @property
    def vmlinux(self) -> Path:
        """The uncompressed ELF kernel."""
        return self.dir / KERNEL_FILE

    def module(self, name: str) -> Path:
        """The (uncompressed) module ``name``."""
        return self.dir / "modules" / f"{name}.ko"


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
    answer is kept in ``<cache_dir>/kernel-candidate.json`` together with a fingerprint
    of apt's state; it is asked again once apt's state changed.

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
    done = run(step, ["apt-cache", "show", "--no-all-versions", KERNEL_METAPACKAGE],
               ok=(0, 100))
    match = re.search(r"^Depends:.*?\b(linux-image-[0-9][^\s,(]*)\s*(?:\(= ([^)\s]+)\))?",
                      done.stdout, re.MULTILINE)
    if done.returncode != 0 or match is None:
        raise UsageError(
            f"{step}: apt lists no {KERNEL_METAPACKAGE} (and so no kernel for the guest): "
            f"{tail(done.stderr, 300) or 'no Depends: linux-image-... line'}",
            hint="run `apt-get update` (the image builder fetches Debian's kernel with apt)")
    name, version = match.group(1), match.group(2)
    if version is None:  # no exact version in the dependency: ask for the package itself
        shown = run(step, ["apt-cache", "show", "--no-all-versions", name])
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
    found = sorted(downloads.glob(f"{kernel.file_name}_*.deb"))
    if found:
        return found[0]
    step = f"download {kernel.name} {kernel.version}"
    progress(step, None)
    make_dir(downloads)
    tmp = downloads / f"{TMP_PREFIX}{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        run(step, ["apt-get", "download", "-q", f"{kernel.name}={kernel.version}"], cwd=tmp,
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
    argv = [program("dpkg-deb"), "--fsys-tarfile", str(deb)]
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
            raise SandportError(f"{step}: {exc}: {tail(proc.stderr.read().decode())}",
                                hint=f"delete {deb} to have it downloaded again") from None
        errors = proc.stderr.read().decode(errors="replace")
        if proc.wait() != 0:
            raise SandportError(f"{step}: dpkg-deb exited with status {proc.returncode}: "
                                f"{tail(errors)}",
                                hint=f"delete {deb} to have it downloaded again")
    if vmlinuz is None:
        raise SandportError(f"{step}: the package has no boot/vmlinuz-*")
    if wanted:
        raise SandportError(f"{step}: the package lacks the modules {', '.join(sorted(wanted))}"
                            " (built into this kernel, or renamed?)")
    decompress_vmlinuz(vmlinuz, dest / KERNEL_FILE, progress)
    return release


def decompress_vmlinuz(vmlinuz: bytes, dest: Path, progress: Progress) -> None:
    """bzImage -> ELF: the payload after the boot stub is an xz stream of the ELF kernel.

    Raises:
        SandportError: no xz stream, a truncated one, or a payload that is not ELF.
    """
    step = "decompress vmlinuz to vmlinux"
    progress(step, None)
    start = vmlinuz.find(_XZ_MAGIC)
    if start < 0:
        raise SandportError(f"{step}: no xz stream in vmlinuz (not an xz-compressed kernel)")
    decompressor = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
    with dest.open("wb") as out:
        pos = start
        while not decompressor.eof and pos < len(vmlinuz):
            out.write(decompressor.decompress(vmlinuz[pos:pos + COPY_CHUNK]))
            pos += COPY_CHUNK
    if not decompressor.eof:
        raise SandportError(f"{step}: the xz stream in vmlinuz is truncated")
    with dest.open("rb") as f:
        if f.read(4) != _ELF_MAGIC:
            raise SandportError(f"{step}: the payload is not an ELF kernel")


def extracted_kernel(cache_dir: Path, downloads: Path, package: KernelPackage,
                     progress: Progress) -> ExtractedKernel:
    """The extracted kernel for ``package``, extracted now unless it already was.

    Caller holds the build lock.

    Raises:
        SandportError: the download or the extraction failed.
    """
    kdir = cache_dir / KERNELS / package.file_name
    info = kdir / "kernel.json"
    with contextlib.suppress(OSError, ValueError, KeyError):
        doc = json.loads(info.read_text())
        kernel = ExtractedKernel(dir=kdir, release=doc["release"],
                                 deb_sha256=doc["deb_sha256"])
        if kernel.vmlinux.is_file() and all(kernel.module(m).is_file()
                                            for m in VIRTIO_MODULES):
            return kernel
    deb = _download_kernel(package, downloads, progress)
    tmp = kdir.parent / f"{TMP_PREFIX}{kdir.name}-{secrets.token_hex(4)}"
    try:
        release = _extract_kernel(deb, tmp, progress)
        doc = {"package": package.name, "version": package.version, "release": release,
               "deb": deb.name, "deb_sha256": file_sha256(deb)}
        (tmp / "kernel.json").write_text(json.dumps(doc, indent=2) + "\n")
        if kdir.exists():  # an incomplete one (a file missing): replace it
            shutil.rmtree(kdir)
        tmp.rename(kdir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ExtractedKernel(dir=kdir, release=release, deb_sha256=str(doc["deb_sha256"]))
