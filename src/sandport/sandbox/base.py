"""The interface every sandbox backend implements, and the records it works on.

A backend turns a :class:`SandboxSpec` into a running guest: :meth:`Backend.create` makes
the isolated network endpoint, :meth:`Backend.start` runs the profile's guest services,
:meth:`Backend.stop` stops them, :meth:`Backend.destroy` removes everything (also for a
sandbox a crashed gateway left behind: it needs nothing but the spec), and
:meth:`Backend.inspect` reports what exists. The gateway, the data plane and readiness
only ever see this interface, so a QEMU backend slots in beside the netns one.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

#: The guest agent's port inside every sandbox that runs it (namespace or VM).
AGENT_PORT = 7412


@dataclass(frozen=True, slots=True, kw_only=True)
class GuestPort:
    """A port a guest service listens on.

    Attributes:
        name: short name users and URLs use (``vnc``).
        port: the port inside the guest.
        protocol: what readiness speaks to it: ``rfb``, ``http`` or ``tcp``.
        path: a Unix socket on the host that serves it instead of the guest's address
            (a VM's console: QEMU's own VNC display); ``port`` is then 0.
    """

    name: str
    port: int
    protocol: str = "tcp"
    path: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class SandboxSpec:
    """Everything a backend needs to build, run and later remove one sandbox.

    Attributes:
        id: short random hex id; every name the backend creates derives from it.
        profile: the guest profile (``desktop``).
        address: the guest's address with the pool's prefix length.
        gateway: the bridge address (the guest's default route).
        bridge: the host bridge the guest's link joins.
        workdir: host directory for this sandbox's files and logs.
        secrets: per-sandbox secrets: the profile's (``vnc_password``) and the guest
            agent's token (``agent_token``).
        agent_url: where the guest agent reports (the gateway's agent listener on the
            bridge); "" runs no agent.
        memory_mb, vcpus: a VM's limits (None: the profile's default); a namespace
            shares the host's.
        name: an attached target's name (its owner's word for it).
        interface: the host interface an attached target is reached through ("": the
            route's).
        target_port: an attached ``tcp``/``http`` target's primary port.
        netns: the network namespace (its file) an attached target lives in (a
            container's), "" for the host's: its address is an address in there.
    """

    id: str
    profile: str
    address: ipaddress.IPv4Interface
    gateway: ipaddress.IPv4Address
    bridge: str
    workdir: Path
    secrets: dict[str, str] = field(default_factory=dict)
    agent_url: str = ""
    memory_mb: int | None = None
    vcpus: int | None = None
    name: str = ""
    interface: str = ""
    target_port: int = 0
    netns: str = ""

    @property
    def ip(self) -> ipaddress.IPv4Address:
        """The guest's address."""
        return self.address.ip


@dataclass(frozen=True, slots=True, kw_only=True)
class Inspection:
    """What a backend finds of a sandbox on the machine.

    Attributes:
        exists: the isolation unit (namespace, VM) exists.
        link_up: the host end of the guest's link exists and is up.
        services: guest service name -> running.
        pids: processes that belong to the sandbox.
    """

    exists: bool
    link_up: bool
    services: dict[str, bool]
    pids: tuple[int, ...]


class Backend(Protocol):
    """A way to run sandboxes (netns, qemu, external)."""

    name: str
    #: Whether the readiness monitor restarts guest services that exited (netns), or a
    #: sandbox whose guest died is failed with the reason (a VM: QEMU exited).
    restarts_services: bool

    def runs_agent(self, profile: str) -> bool:
        """Whether its sandboxes of ``profile`` run the guest agent (credentials, /health)."""
        ...

    async def create(self, spec: SandboxSpec) -> None:
        """Create the isolated guest and its network link."""
        ...

    async def start(self, spec: SandboxSpec) -> None:
        """Start the profile's guest services."""
        ...

    async def stop(self, spec: SandboxSpec) -> None:
        """Stop the guest services; the network stays."""
        ...

    async def destroy(self, spec: SandboxSpec) -> None:
        """Remove everything the backend made for ``spec``; idempotent."""
        ...

    async def inspect(self, spec: SandboxSpec) -> Inspection:
        """Report what exists of ``spec`` on this machine."""
        ...

    def ports(self, spec: SandboxSpec) -> tuple[GuestPort, ...]:
        """The guest ports the profile serves."""
        ...

    def host_link(self, spec: SandboxSpec) -> str:
        """The host end of the sandbox's link, a port of the bridge (veth end, TAP)."""
        ...

    async def adopt(self, spec: SandboxSpec) -> str | None:
        """Take over a sandbox a gateway that died left running.

        Returns None when its isolation unit and every essential service still run (they
        are this backend's again: :meth:`stop`, :meth:`failure` work on them), else why not.
        """
        ...

    def diagnostics(self, spec: SandboxSpec) -> str:
        """The guest's last words for an error message (a VM's serial console), or ""."""
        ...

    async def revive_agent(self, spec: SandboxSpec) -> bool:
        """Restart the guest agent if it exited, leaving the guest services alone; True
        if it had to."""
        ...

    def failure(self, spec: SandboxSpec, *, agent: bool = False) -> str | None:
        """Why the guest can no longer become ready (an essential service exited; with
        ``agent``, also the guest agent), or None.

        Readiness probes stop waiting as soon as this says something.
        """
        ...
