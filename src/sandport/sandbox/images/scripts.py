"""The files the builder writes into a guest's root: /init and the other guest scripts.

Owns: the image profiles (:data:`IMAGE_PROFILES`), the guest scripts shipped beside this
module in ``guest/`` (real ``.sh`` files, checked by shellcheck in ``make lint``), the
image's constants as a shell file (:func:`image_env`) and the full set of generated files
(:func:`guest_files`). The scripts are copied verbatim, never formatted: every value they
need comes from ``image.env``, whose values are shell-quoted (:func:`shell_env`).

Must not touch: host files, the kernel, the cache. What a script does is in the script;
this module only decides which script goes where.

In the guest::

    /init                               guest/init.sh: PID 1 (mounts, drivers, network,
                                        seed), then sources profile.sh
    /usr/share/sandport/image.env       generated: MARKER, ports, paths (see image_env)
    /usr/share/sandport/profile.sh      guest/echo.sh or guest/desktop.sh
    /usr/share/sandport/udhcpc.script   guest/udhcpc.sh (ip=dhcp)

/init reports on the serial console, one line each (:data:`MARKER`)::

    SANDPORT-GUEST net eth0 10.201.250.2/24 gw 10.201.250.1   (gw none: no gateway given)
    SANDPORT-GUEST services echo started      (once every service's port is bound)
    SANDPORT-GUEST error <what failed>        (the guest stays up, for inspection)
    SANDPORT-GUEST warning <what is odd>      (a missing seed: defaults are used)
"""

from __future__ import annotations

import importlib.resources
from importlib.resources.abc import Traversable
from pathlib import Path

from sandport.errors import UsageError
from sandport.sandbox.base import AGENT_PORT
from sandport.sandbox.images.kernel import VIRTIO_MODULES
from sandport.sandbox.images.seed import SEED_ENV, SEED_VNC_PASSWORD, shell_env
from sandport.sandbox.profiles import DESKTOP_GEOMETRY, VNC_DISPLAY, VNC_PORT

#: The profiles an image can be built for: each has ``guest/<profile>.sh``.
IMAGE_PROFILES = ("echo", "desktop")
#: The guest scripts, shipped as package data (pyproject.toml: package-data).
GUEST_SCRIPTS_DIR: Traversable = importlib.resources.files("sandport.sandbox.images") / "guest"
#: Guest paths /init (guest/init.sh) names literally; a unit test holds them in step.
GUEST_SHARE = "/usr/share/sandport"
IMAGE_ENV = f"{GUEST_SHARE}/image.env"
PROFILE_SCRIPT = f"{GUEST_SHARE}/profile.sh"
UDHCPC_SCRIPT = f"{GUEST_SHARE}/udhcpc.script"
#: Where the virtio modules live in the guest.
GUEST_MODULE_DIR = "/usr/lib/sandport/modules"
#: The prefix of every line /init writes for the backend.
MARKER = "SANDPORT-GUEST"
#: The guest agent in the desktop image (``sandport/agent.py``, stdlib only; on AGENT_PORT).
GUEST_AGENT = "/usr/lib/sandport/agent.py"
AGENT_SOURCE = Path(__file__).resolve().parents[2] / "agent.py"
ECHO_PORT = 7
HTTP_PORT = 80
#: Xvnc counts failed logins per client address and blocks it: never, here (the same as
#: the netns backend).
XVNC_BLACKLIST_THRESHOLD = 1_000_000
#: Default background when the seed names no colour.
DEFAULT_COLOUR = "#1e90ff"


def check_profile(profile: str) -> None:
    """Check that ``profile`` is one an image can be built for.

    Raises:
        UsageError: ``profile`` is not one of :data:`IMAGE_PROFILES`.
    """
    if profile not in IMAGE_PROFILES:
        raise UsageError(f"no image profile {profile!r}; image profiles: "
                         f"{', '.join(IMAGE_PROFILES)}")


def guest_script(name: str) -> bytes:
    """The content of ``guest/<name>`` (``init.sh``, ``echo.sh`` ...), as shipped."""
    return GUEST_SCRIPTS_DIR.joinpath(name).read_bytes()


def image_values() -> dict[str, str]:
    """The shell variables ``image.env`` sets, for every profile: name -> value."""
    width, height = DESKTOP_GEOMETRY
    return {
        "MARKER": MARKER,
        "VIRTIO_MODULES": " ".join(VIRTIO_MODULES),
        "MODULE_DIR": GUEST_MODULE_DIR,
        "DEFAULT_COLOUR": DEFAULT_COLOUR,
        "SEED_ENV": SEED_ENV,
        "SEED_VNC_PASSWORD": SEED_VNC_PASSWORD,
        "ECHO_PORT": str(ECHO_PORT),
        "HTTP_PORT": str(HTTP_PORT),
        "VNC_DISPLAY": str(VNC_DISPLAY),
        "VNC_PORT": str(VNC_PORT),
        "DESKTOP_GEOMETRY": f"{width}x{height}",
        "XVNC_BLACKLIST_THRESHOLD": str(XVNC_BLACKLIST_THRESHOLD),
        "AGENT_PORT": str(AGENT_PORT),
        "GUEST_AGENT": GUEST_AGENT,
    }


def image_env() -> bytes:
    """The content of ``/usr/share/sandport/image.env``: the image's constants as
    ``KEY='value'`` lines that /init sources before anything else."""
    header = b"# The image's constants (sandport.sandbox.images.scripts.image_env).\n"
    return header + shell_env(image_values(), what="image")


def init_script(profile: str) -> str:
    """The text of ``/init`` (``guest/init.sh``, the same for every profile; the
    profile's part is ``profile.sh``).

    Raises:
        UsageError: unknown profile.
    """
    check_profile(profile)
    return guest_script("init.sh").decode()


def guest_files(profile: str) -> dict[str, tuple[bytes, int]]:
    """The files the builder writes into the root itself: guest path -> (content, mode).

    Raises:
        UsageError: unknown profile.
    """
    check_profile(profile)
    return {
        "/init": (init_script(profile).encode(), 0o755),
        IMAGE_ENV: (image_env(), 0o644),
        PROFILE_SCRIPT: (guest_script(f"{profile}.sh"), 0o644),
        UDHCPC_SCRIPT: (guest_script("udhcpc.sh"), 0o755),
        "/etc/passwd": (b"root:x:0:0:root:/root:/bin/sh\n"
                        b"nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n", 0o644),
        "/etc/group": (b"root:x:0:\ntty:x:5:\nnogroup:x:65534:\n", 0o644),
        "/etc/hosts": (b"127.0.0.1 localhost\n", 0o644),
        "/etc/nsswitch.conf": (b"passwd: files\ngroup: files\nhosts: files\n", 0o644),
        **({GUEST_AGENT: (AGENT_SOURCE.read_bytes(), 0o644)} if profile == "desktop" else {}),
    }
