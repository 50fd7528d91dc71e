"""Inputs and keys: what an image is made from, and its content address.

Owns: what each profile copies from the host (:data:`PLANS`: programs with every library
``ldd`` names, data paths), resolving that to host paths (:func:`host_paths`), the
Debian packages that own them and their versions, and the image's inputs and key
(:func:`image_inputs`, :func:`image_key`, :data:`BUILDER_VERSION`).

Must not touch: the cache directory (beyond the kernel memo that
:func:`~sandport.sandbox.images.kernel.resolve_kernel` keeps) and the image files. It only
reads the host; it never writes.

**Content address.** :func:`image_inputs` lists everything the image is made from: this
builder's version, a digest of the generated files (``/init``, the guest scripts ...),
the kernel package and version apt would fetch now, and the version of every installed
Debian package whose files are copied in (found with ``dpkg-query -S``; a file no package
owns counts with its SHA-256). The key is the SHA-256 of that list. So an ``apt-get
upgrade`` of Xvnc's libraries, a new kernel ABI after ``apt-get update``, or a changed
guest script each give a new key, and the old image is no longer found: stale images
cannot be booted by mistake.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from sandport.config import DEFAULT_IMAGE_CACHE
from sandport.errors import MissingPackage, SandportError
from sandport.sandbox.images.host import file_sha256, program, run, tail
from sandport.sandbox.images.kernel import VIRTIO_MODULES, resolve_kernel
from sandport.sandbox.images.scripts import check_profile, guest_files

#: Bump when the image layout changes in a way the other inputs do not capture.
BUILDER_VERSION = "3"  # 2, 3: the desktop image runs the guest agent
#: The top-level directories Debian 12 merged into /usr (``/lib -> usr/lib``).
MERGED = ("bin", "sbin", "lib", "lib64", "lib32", "libx32")


@dataclass(frozen=True, slots=True)
class HostPlan:
    """What a profile copies from the host.

    Attributes:
        programs: program names (on PATH); each with every library ``ldd`` lists.
        paths: files or directories copied at their real paths (whole trees).
        optional: like ``paths``, skipped when the host lacks them.
    """

    programs: tuple[str, ...]
    paths: tuple[str, ...] = ()
    optional: tuple[str, ...] = ()


PLANS = {
    "echo": HostPlan(programs=("busybox", "socat")),
    "desktop": HostPlan(
        # python3.11 (Debian's) runs the guest agent; its stdlib is copied pruned
        # (build.PYTHON_SKIP).
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


@functools.lru_cache(maxsize=256)
def _ldd_cached(path: str, _ino: int, _mtime_ns: int) -> tuple[str, ...]:
    done = run(f"list the libraries of {path}", ["ldd", path], ok=(0, 1))
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
        raise SandportError(f"ldd {path} failed: {tail(done.stderr + done.stdout)}")
    return tuple(libs)


def _ldd(path: str) -> tuple[str, ...]:
    """The shared libraries (and dynamic loader) ``path`` loads, as ldd names them."""
    st = os.stat(path)
    return _ldd_cached(path, st.st_ino, st.st_mtime_ns)


def host_paths(profile: str) -> list[str]:
    """Every host path the profile's root copies: programs, their libraries, data.

    Raises:
        MissingPackage: a program, library or data path is missing.
    """
    plan = PLANS[profile]
    paths: list[str] = []
    for name in plan.programs:
        found = program(name)
        paths += [found, *_ldd(found)]
    for path in plan.paths:
        if not os.path.exists(path):
            package = _PATH_PACKAGES.get(path, "the package that provides it")
            raise MissingPackage(f"{path} is missing (the {profile} image copies it)",
                                 hint=f"apt-get install {package}")
        paths.append(path)
    paths += [p for p in plan.optional if os.path.exists(p)]
    return list(dict.fromkeys(paths))


def _dpkg_names(path: str) -> set[str]:
    """The names dpkg may know a file by: as given and resolved, each with and without
    the ``/usr`` prefix (Debian 12 merged /bin, /lib... into /usr; dpkg's database still
    records whichever path each package shipped)."""
    names = {path, os.path.realpath(path)}
    for name in list(names):
        top = name.split("/")[1:3]
        if top and top[0] in MERGED:
            names.add("/usr" + name)
        elif len(top) == 2 and top[0] == "usr" and top[1] in MERGED:
            names.add(name.removeprefix("/usr"))
    return names


def _tree_sha256(path: str) -> str:
    """SHA-256 of a file, or of a directory's names, link targets and file contents."""
    if not os.path.isdir(path):
        return file_sha256(Path(path))
    digest = hashlib.sha256()
    for p in sorted(Path(path).rglob("*")):
        digest.update(str(p).encode() + b"\0")
        if p.is_symlink():
            digest.update(os.readlink(p).encode())
        elif p.is_file():
            digest.update(file_sha256(p).encode())
    return digest.hexdigest()


def _package_inputs(paths: list[str]) -> dict[str, str]:
    """``pkg:<name>`` -> version for each package owning one of ``paths``; ``file:<path>``
    -> SHA-256 for a path no package owns."""
    queries: dict[str, str] = {}
    for path in paths:
        for name in _dpkg_names(path):
            queries.setdefault(name, path)
    done = run("find the packages of the copied files", ["dpkg-query", "-S", *queries],
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
        shown = run("read package versions", ["dpkg-query", "-W", "-f",
                                              "${Package}\t${Version}\n", *sorted(packages)])
        for line in shown.stdout.splitlines():
            name, _, version = line.partition("\t")
            inputs[f"pkg:{name}"] = version
    for path in paths:
        if path not in owned:
            inputs[f"file:{path}"] = _tree_sha256(path)
    return inputs


def _sha256_text(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def image_inputs(profile: str, *, cache_dir: Path | None = DEFAULT_IMAGE_CACHE,
                 ) -> dict[str, str]:
    """Everything an image of ``profile`` is made from; its key is the SHA-256 of this.

    ``builder`` (:data:`BUILDER_VERSION`), ``profile``, ``arch``, ``kernel_package`` and
    ``kernel_version`` (what apt would fetch now), ``modules``, ``init_sha256`` (the
    ``/init`` text), ``files_sha256`` (every generated file: the guest scripts,
    ``image.env`` ...), ``plan_sha256`` (the list of host programs and paths copied), then
    ``pkg:<name>`` -> version for every Debian package owning a copied file (libraries
    included) and ``file:<path>`` -> SHA-256 for a copied file no package owns.

    Args:
        profile: ``echo`` or ``desktop``.
        cache_dir: where the kernel resolution is remembered (see
            :func:`~sandport.sandbox.images.kernel.resolve_kernel`); None: ask apt every
            time.

    Raises:
        UsageError: unknown profile, apt knows no kernel, a program or file is missing.
    """
    check_profile(profile)
    kernel = resolve_kernel(cache_dir)
    generated = guest_files(profile)
    files_digest = hashlib.sha256()
    for path in sorted(generated):
        content, mode = generated[path]
        files_digest.update(f"{path}\0{mode:o}\0{_sha256_text(content)}\n".encode())
    inputs = {
        "builder": BUILDER_VERSION,
        "profile": profile,
        "arch": platform.machine(),
        "kernel_package": kernel.name,
        "kernel_version": kernel.version,
        "modules": " ".join(VIRTIO_MODULES),
        "init_sha256": _sha256_text(generated["/init"][0]),
        "files_sha256": files_digest.hexdigest(),
        "plan_sha256": _sha256_text(repr(PLANS[profile]).encode()),
    }
    inputs.update(sorted(_package_inputs(host_paths(profile)).items()))
    return inputs


def image_key(inputs: Mapping[str, str]) -> str:
    """The content address of an image: SHA-256 of its inputs as canonical JSON."""
    canonical = json.dumps(dict(inputs), sort_keys=True, separators=(",", ":"))
    return _sha256_text(canonical.encode())
