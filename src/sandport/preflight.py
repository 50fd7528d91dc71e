"""Checks that the machine can run sandboxes, with messages that name the fix."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from sandport.errors import MissingCapability, MissingPackage

# Linux capability numbers (include/uapi/linux/capability.h).
CAP_NET_ADMIN = 12
CAP_SYS_ADMIN = 21

#: program -> the Debian package that provides it.
PROGRAMS: dict[str, str] = {
    "Xvnc": "tigervnc-standalone-server",
    "openbox": "openbox",
    "xsetroot": "x11-xserver-utils",
    "xmessage": "x11-utils",
    "crun": "crun",  # the OCI runtime every netns sandbox's guest programs run in
}
NOVNC_DIRS = (Path("/usr/share/novnc"),)


def effective_capabilities() -> int:
    """The CapEff bit mask of this process, from /proc/self/status."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    return 0


def require_capabilities() -> None:
    """Raise MissingCapability naming each capability the netns backend needs."""
    caps = effective_capabilities()
    missing = [
        name
        for bit, name in ((CAP_NET_ADMIN, "CAP_NET_ADMIN"), (CAP_SYS_ADMIN, "CAP_SYS_ADMIN"))
        if not caps & (1 << bit)
    ]
    if missing:
        root = os.geteuid() == 0
        raise MissingCapability(
            f"sandport runs as {'root' if root else f'uid {os.geteuid()}'} without "
            f"{' and '.join(missing)}, which it needs to create network namespaces, veth "
            "links and the bridge",
            hint="this root lacks them (a container? run it with --privileged or add both "
            "capabilities)" if root else "run it as root (sudo sandport ...)",
        )


def find_program(name: str) -> str:
    """Return the path of ``name`` or raise MissingPackage naming its Debian package."""
    path = shutil.which(name)
    if path is None:
        package = PROGRAMS.get(name, name)
        raise MissingPackage(
            f"{name} is not installed (needed by netns sandboxes)",
            hint=f"apt-get install {package}   (or run `make demo`, which installs it)",
        )
    return path


def require_programs(names: tuple[str, ...] = tuple(PROGRAMS)) -> dict[str, str]:
    """Resolve every program, reporting all missing packages at once."""
    found: dict[str, str] = {}
    missing: list[str] = []
    for name in names:
        path = shutil.which(name)
        if path is None:
            missing.append(name)
        else:
            found[name] = path
    if missing:
        packages = sorted({PROGRAMS.get(n, n) for n in missing})
        raise MissingPackage(
            f"{', '.join(missing)} not installed (Debian package{'s' if len(packages) > 1 else ''}"
            f" {', '.join(packages)})",
            hint=f"apt-get install {' '.join(packages)}   (or run `make demo`)",
        )
    return found


def find_novnc() -> Path:
    """The directory holding noVNC's vnc.html, or MissingPackage."""
    for d in NOVNC_DIRS:
        if (d / "vnc.html").is_file():
            return d
    raise MissingPackage(
        "noVNC is not installed (no vnc.html in /usr/share/novnc)",
        hint="apt-get install novnc",
    )
