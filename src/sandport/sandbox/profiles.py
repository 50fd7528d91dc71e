"""Guest profiles: which services a sandbox runs and which ports they serve.

A profile is backend-neutral data; each backend knows how to run it (the netns backend
starts host programs inside the namespace, a QEMU backend bakes them into its image).
"""

from __future__ import annotations

import colorsys
import hashlib
import secrets
import string
from dataclasses import dataclass

from sandport.errors import UsageError
from sandport.sandbox.base import GuestPort

VNC_PORT = 5901
VNC_DISPLAY = 1
VNC_PASSWORD_LENGTH = 8  # VNC Authentication uses at most 8 characters (RFC 6143 7.2.2)
DESKTOP_GEOMETRY = (1280, 800)


@dataclass(frozen=True, slots=True, kw_only=True)
class Profile:
    """What a sandbox of this profile runs.

    Attributes:
        name: the profile's name.
        ports: the guest ports its services serve; the first is the one readiness
            probes, through a host forward made for it.
        summary: one line for ``--help`` and docs.
        backends: the backends that can run it.
    """

    name: str
    ports: tuple[GuestPort, ...]
    summary: str
    backends: tuple[str, ...] = ("netns", "qemu")

    @property
    def primary(self) -> GuestPort:
        """The port readiness is proven on (through its host forward, made for it)."""
        return self.ports[0]

    def new_secrets(self) -> dict[str, str]:
        """Fresh per-sandbox secrets for this profile."""
        if self.name == "desktop":
            alphabet = string.ascii_letters + string.digits
            return {
                "vnc_password": "".join(
                    secrets.choice(alphabet) for _ in range(VNC_PASSWORD_LENGTH)
                )
            }
        return {}


PROFILES: dict[str, Profile] = {
    "desktop": Profile(
        name="desktop",
        ports=(GuestPort(name="vnc", port=VNC_PORT, protocol="rfb"),),
        summary="Xvnc (VNC Authentication, random password) + openbox; "
        "a background colour and a window naming the sandbox",
        backends=("netns", "qemu", "external"),
    ),
    "echo": Profile(
        name="echo",
        ports=(GuestPort(name="http", port=80, protocol="http"),
               GuestPort(name="echo", port=7, protocol="tcp")),
        summary="TCP and UDP echo on port 7, an HTTP server on 80 naming the sandbox",
        backends=("qemu",),
    ),
    # Attached targets (sandport runs nothing in them): what readiness speaks.
    "http": Profile(
        name="http", ports=(GuestPort(name="http", port=80, protocol="http"),),
        summary="an attached target serving HTTP (on 80 or --port)",
        backends=("external",),
    ),
    "tcp": Profile(
        name="tcp", ports=(GuestPort(name="tcp", port=0, protocol="tcp"),),
        summary="an attached target serving TCP on --port (it must accept a connection)",
        backends=("external",),
    ),
}


def get_profile(name: str) -> Profile:
    """The profile called ``name``, or UsageError listing the known ones."""
    try:
        return PROFILES[name]
    except KeyError:
        raise UsageError(
            f"unknown profile {name!r}; known profiles: {', '.join(sorted(PROFILES))}"
        ) from None


def desktop_colour(sandbox_id: str) -> tuple[int, int, int]:
    """The solid background colour of a desktop sandbox, derived from its id.

    A hue from the id's hash at fixed saturation and value: never black or white, and two
    sandboxes side by side almost always differ visibly.
    """
    digest = hashlib.sha256(sandbox_id.encode()).digest()
    hue = int.from_bytes(digest[:2], "big") / 65536
    r, g, b = colorsys.hsv_to_rgb(hue, 0.7, 0.8)
    return round(r * 255), round(g * 255), round(b * 255)


def colour_hex(rgb: tuple[int, int, int]) -> str:
    """``(30, 144, 255)`` -> ``#1e90ff``."""
    return "#{:02x}{:02x}{:02x}".format(*rgb)


def desktop_name(sandbox_id: str) -> str:
    """The RFB desktop name a desktop sandbox announces (noVNC shows it)."""
    return f"sandport {sandbox_id}"
