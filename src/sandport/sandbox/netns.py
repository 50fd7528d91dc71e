"""The netns backend: a sandbox is a network namespace on the sandport bridge.

Names derive from the sandbox id alone, so :meth:`NetnsBackend.destroy` can remove what a
crashed gateway left behind from the store's record: namespace ``sp-<id>``, host veth end
``sp-<id>-v`` (an isolated port of the bridge), guest end ``eth0``.

Guest programs run unprivileged: in a crun container per sandbox (named like its
namespace; :mod:`sandport.sandbox.container` says what it sees), each ``crun exec``'d into
it, with the workdir's ``tmp`` as its /tmp and ``guest`` (files the gateway writes, never
a path a guest can write) read-only on /run/sandport. Only the explicit opt-in
:data:`HOST_ROOT_UNSAFE` runs them as host root through :mod:`sandport.sandbox.nsexec`
(a network namespace and a private /tmp, nothing else).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import os
import shutil
import sys
from pathlib import Path

from sandport.errors import SandboxFailed
from sandport.net import netlink
from sandport.net.antispoof import sandbox_mac
from sandport.proto.rfb import obfuscate_password
from sandport.sandbox import container, crun, procs
from sandport.sandbox.base import AGENT_PORT, GuestPort, Inspection, SandboxSpec
from sandport.sandbox.profiles import (
    DESKTOP_GEOMETRY,
    VNC_DISPLAY,
    VNC_PORT,
    colour_hex,
    desktop_colour,
    desktop_name,
    get_profile,
)

log = logging.getLogger(__name__)

NAME_PREFIX = "sp-"
GUEST_TMP = "/tmp"  # where a guest sees its workdir/tmp
AGENT = Path(__file__).resolve().parent.parent / "agent.py"  # stdlib only, run with -I -S
PIDS_FILE = "pids.json"  # in the workdir: the guest services, for adoption after a crash
X_SOCKET_TIMEOUT = 15.0
ONESHOT_TIMEOUT = 10.0
# Xvnc blacklists an address after 5 failed logins; every client reaches the guest from
# the gateway's address, so one person's typos would lock out everyone. Access control
# happens at the gateway (tokens); the VNC password is the second factor.
XVNC_BLACKLIST_THRESHOLD = 1_000_000
#: Guest programs run in an unprivileged container (the default).
UNPRIVILEGED = "unprivileged"
#: The opt-in that runs guest programs as host root (uid 0, every capability, the host's
#: /proc, /etc/shadow and state dir): a compromised guest program is a compromised host.
HOST_ROOT_UNSAFE = "host-root-UNSAFE"
GUEST_PRIVILEGES = (UNPRIVILEGED, HOST_ROOT_UNSAFE)
GUEST_FILES_DIR = "guest"  # in the workdir: what the gateway hands a contained guest


def netns_name(sandbox_id: str) -> str:
    """The sandbox's network namespace: ``sp-<id>``."""
    return f"{NAME_PREFIX}{sandbox_id}"


def host_ifname(sandbox_id: str) -> str:
    """The host end of the sandbox's veth: ``sp-<id>-v`` (at most 15 bytes)."""
    return f"{NAME_PREFIX}{sandbox_id}-v"


class NetnsBackend:
    """Sandboxes as network namespaces with host programs running inside them."""

    name = "netns"
    restarts_services = True

    def __init__(self, programs: dict[str, str], *, state_dir: Path | None = None,
                 guest_privileges: str = UNPRIVILEGED) -> None:
        """Args:
        programs: resolved paths of the host programs profiles run (see preflight);
            ``crun`` among them unless ``guest_privileges`` is :data:`HOST_ROOT_UNSAFE`.
        state_dir: the gateway's state dir (its crun state root derives from it).
        guest_privileges: :data:`UNPRIVILEGED` or :data:`HOST_ROOT_UNSAFE`.
        """
        if guest_privileges not in GUEST_PRIVILEGES:
            raise ValueError(f"guest_privileges must be one of {GUEST_PRIVILEGES}")
        self._programs = programs
        self._procs: dict[str, list[procs.GuestProcess]] = {}
        self._crun: crun.Crun | None = None
        self._ids: dict[str, container.IdRange] = {}
        if guest_privileges == UNPRIVILEGED:
            root = crun.state_root(state_dir) if state_dir is not None \
                else crun.RUN_DIR / "crun" / "default"
            self._crun = crun.Crun(programs["crun"], root)
        else:
            log.warning("guest programs run as host root (%s): a compromised guest program "
                        "is a compromised host", HOST_ROOT_UNSAFE)

    def runs_agent(self, profile: str) -> bool:
        """Every namespace runs the guest agent."""
        return True

    def ports(self, spec: SandboxSpec) -> tuple[GuestPort, ...]:
        """The guest ports of the sandbox's profile (a namespace has no console)."""
        return get_profile(spec.profile).ports

    def host_link(self, spec: SandboxSpec) -> str:
        """The host end of the sandbox's veth pair."""
        return host_ifname(spec.id)

    async def create(self, spec: SandboxSpec) -> None:
        """Create namespace, veth and addresses; the host end joins the bridge isolated."""
        for sub in ("tmp", "logs", "tmp/home"):
            (spec.workdir / sub).mkdir(parents=True, exist_ok=True)
        (spec.workdir / "tmp").chmod(0o1777)
        await asyncio.to_thread(
            netlink.create_sandbox_link,
            netns_name=netns_name(spec.id),
            host_ifname=host_ifname(spec.id),
            bridge=spec.bridge,
            address=spec.address,
            gateway=spec.gateway,
            mac=sandbox_mac(spec.id),  # the one the bridge's anti-spoofing lets through
        )
        log.info("sandbox %s: netns %s, %s on %s", spec.id, netns_name(spec.id), spec.address,
                 spec.bridge)

    async def start(self, spec: SandboxSpec) -> None:
        """Start the profile's programs inside the namespace (in its container)."""
        profile = get_profile(spec.profile)
        if self._crun is not None:
            await self._start_container(spec, self._crun)
        if profile.name == "desktop":
            await self._start_desktop(spec)

        if spec.agent_url:
            await self._start_agent(spec)

    async def adopt(self, spec: SandboxSpec) -> str | None:
        """Take over the guest services a crashed gateway started (see :data:`PIDS_FILE`)."""
        if not netlink.netns_exists(netns_name(spec.id)):
            return f"its network namespace {netns_name(spec.id)} is gone"
        if not await asyncio.to_thread(netlink.link_exists, host_ifname(spec.id)):
            return f"its link {host_ifname(spec.id)} is gone"
        try:
            docs = json.loads((spec.workdir / PIDS_FILE).read_text())
        except (OSError, ValueError):
            return f"no record of its guest services ({spec.workdir / PIDS_FILE})"
        found: list[procs.GuestProcess] = []
        for doc in docs:
            proc = procs.GuestProcess.adopted(doc)
            if proc is not None:
                found.append(proc)
            elif doc.get("essential"):
                return f"{doc.get('name')} (pid {doc.get('pid')}) no longer runs"
        self._procs[spec.id] = found
        log.info("sandbox %s: adopted %s", spec.id,
                 ", ".join(f"{p.name} (pid {p.pid})" for p in found))
        return None

    def failure(self, spec: SandboxSpec, *, agent: bool = False) -> str | None:
        """The first essential guest program (or, with ``agent``, the guest agent) that
        exited, with its last words."""
        for proc in self._procs.get(spec.id, []):
            if (proc.essential or (agent and proc.name == "agent")) and not proc.running:
                tail = proc.log_tail(300).replace("\n", " | ")
                status = "exited" if proc.returncode is None else \
                    f"exited with status {proc.returncode}"
                return f"{proc.name} {status}: {tail}"
        return None

    def diagnostics(self, spec: SandboxSpec) -> str:
        """Nothing beyond :meth:`failure`: a guest program's own output is in its log."""
        return ""

    async def revive_agent(self, spec: SandboxSpec) -> bool:
        """Start the guest agent again if it exited (the desktop is left alone); True if
        it had to be."""
        if not spec.agent_url:
            return False
        running = self._procs.get(spec.id, [])
        agent = next((p for p in running if p.name == "agent"), None)
        if agent is not None and agent.running:
            return False
        if agent is not None:
            running.remove(agent)
        await self._start_agent(spec)
        return True

    async def _start_container(self, spec: SandboxSpec, runtime: crun.Crun) -> None:
        """(Re)create the sandbox's container: its init, nothing else yet."""
        name = netns_name(spec.id)
        ids = await asyncio.to_thread(crun.claim_ids, name)
        lib_dirs = await asyncio.to_thread(crun.ensure_rootfs)
        tmp = spec.workdir / "tmp"
        for path in (tmp, tmp / "home"):  # the guest's root owns its /tmp and home
            os.lchown(path, ids.host_base, ids.host_base)
        files = spec.workdir / GUEST_FILES_DIR
        files.mkdir(mode=0o755, exist_ok=True)
        files.chmod(0o755)  # the guest's root must enter it, whatever the gateway's umask
        config = container.bundle_config(
            rootfs=str(crun.ROOTFS), netns_path=f"/run/netns/{name}", tmpdir=str(tmp),
            guest_files=str(files), ids=ids, hostname=name,
            init_argv=[guest_python(contained=True), "-I", "-S", "-c", container.INIT_PROGRAM],
            lib_dirs=lib_dirs)
        await runtime.run(name, spec.workdir / "container", config,
                          log_path=spec.workdir / "logs" / "container.log")
        self._ids[spec.id] = ids

    def _guest_file(self, spec: SandboxSpec, name: str, data: bytes, mode: int) -> str:
        """Hand the guest a file the gateway writes; the path the guest sees it at.

        Contained: in ``workdir/guest`` (read-only on /run/sandport inside, never a path a
        guest can write, so no symlink of its own redirects this write), owned by the
        guest's root. host-root-UNSAFE: in its /tmp/.sandport as before.
        """
        if self._crun is None:
            secret_dir = spec.workdir / "tmp" / ".sandport"
            secret_dir.mkdir(mode=0o700, exist_ok=True)
            path = secret_dir / name
            path.touch(mode=mode)
            path.write_bytes(data)
            return f"{GUEST_TMP}/.sandport/{name}"
        ids = self._ids.get(spec.id) or crun.claim_ids(netns_name(spec.id))  # adopted
        path = spec.workdir / GUEST_FILES_DIR / name
        tmp = path.with_name(f".{name}.new")
        tmp.unlink(missing_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chown(tmp, ids.host_base, ids.host_base)
        tmp.replace(path)
        return f"{container.GUEST_FILES}/{name}"

    def _save_pids(self, spec: SandboxSpec) -> None:
        docs = [p.record() for p in self._procs.get(spec.id, [])]
        tmp = spec.workdir / f"{PIDS_FILE}.tmp"
        tmp.write_text(json.dumps(docs))
        tmp.replace(spec.workdir / PIDS_FILE)

    async def _start_agent(self, spec: SandboxSpec) -> None:
        """The guest agent (:mod:`sandport.agent`): /health, reports, credentials.

        It is copied into the sandbox (a guest sees only its own /tmp, and sandport may
        itself live under the host's /tmp, e.g. in a CI clone) and run by the system's
        Python: it needs nothing but the standard library.
        """
        inside = self._guest_file(spec, "agent.py", AGENT.read_bytes(), 0o400)
        python = guest_python(contained=self._crun is not None)
        argv = [python, "-I", "-S", inside]
        await self._spawn(spec, "agent", argv, extra_env={
            "SANDPORT_GATEWAY_URL": spec.agent_url,
            "SANDPORT_AGENT_TOKEN": spec.secrets.get("agent_token", ""),
            "SANDPORT_AGENT_LISTEN": f"0.0.0.0:{AGENT_PORT}",
        })

    async def _spawn(
        self, spec: SandboxSpec, name: str, argv: list[str], *, essential: bool = False,
        extra_env: dict[str, str] | None = None,
    ) -> procs.GuestProcess:
        env = {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "HOME": "/tmp/home",
            "LANG": "C.UTF-8",
            "DISPLAY": f":{VNC_DISPLAY}",
            "SANDPORT_SANDBOX_ID": spec.id,
            "SANDPORT_AGENT_URL": f"http://127.0.0.1:{AGENT_PORT}",
            **(extra_env or {}),
        }
        if self._crun is not None:
            proc = await procs.spawn_contained(
                name=name, runtime=self._crun, container=netns_name(spec.id),
                process=container.process_config(argv=argv, env=env),
                doc=spec.workdir / "container" / f"{name}.json",
                log_dir=spec.workdir / "logs", essential=essential)
        else:
            proc = await procs.spawn(
                name=name,
                argv=argv,
                netns=netns_name(spec.id),
                tmpdir=spec.workdir / "tmp",
                log_dir=spec.workdir / "logs",
                env=env,
                essential=essential,
            )
        self._procs.setdefault(spec.id, []).append(proc)
        self._save_pids(spec)
        return proc

    async def _start_desktop(self, spec: SandboxSpec) -> None:
        password_file = self._guest_file(
            spec, "vncpasswd", obfuscate_password(spec.secrets["vnc_password"]), 0o400)
        width, height = DESKTOP_GEOMETRY
        # A killed Xvnc leaves its socket and lock behind: a restart must not mistake them
        # for a running server (the socket's existence is how we wait for the display).
        for stale in (f".X11-unix/X{VNC_DISPLAY}", f".X{VNC_DISPLAY}-lock"):
            unlink_beneath(spec.workdir / "tmp", stale)
        xvnc = await self._spawn(spec, "Xvnc", [
            self._programs["Xvnc"], f":{VNC_DISPLAY}",
            "-rfbport", str(VNC_PORT),
            "-SecurityTypes", "VncAuth",
            "-PasswordFile", password_file,
            "-desktop", desktop_name(spec.id),
            "-geometry", f"{width}x{height}", "-depth", "24",
            "-AlwaysShared",  # every viewer shares the desktop; none kicks another out
            "-BlacklistThreshold", str(XVNC_BLACKLIST_THRESHOLD),
            "-nolisten", "tcp",
        ], essential=True)  # fmt: skip
        socket_path = spec.workdir / "tmp" / ".X11-unix" / f"X{VNC_DISPLAY}"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + X_SOCKET_TIMEOUT
        while not socket_path.exists():
            if not xvnc.running:
                raise SandboxFailed(
                    f"sandbox {spec.id}: Xvnc exited with status {xvnc.returncode}: "
                    f"{xvnc.log_tail()}",
                    hint=f"see {xvnc.log_path}",
                )
            if loop.time() > deadline:
                raise SandboxFailed(
                    f"sandbox {spec.id}: Xvnc did not open display :{VNC_DISPLAY} within "
                    f"{X_SOCKET_TIMEOUT:.0f} s",
                    hint=f"see {xvnc.log_path}",
                )
            await asyncio.sleep(0.02)
        colour = colour_hex(desktop_colour(spec.id))
        setroot = await self._spawn(
            spec, "xsetroot", [self._programs["xsetroot"], "-solid", colour]
        )
        try:
            await asyncio.wait_for(procs.wait_exit(setroot), ONESHOT_TIMEOUT)
            status = setroot.returncode if setroot.process is not None else 0  # contained:
        except TimeoutError:                                # not our child, status unknown
            status = -1
        if status != 0:
            log.warning("sandbox %s: xsetroot failed (%s): %s", spec.id, status,
                        setroot.log_tail())
        if not setroot.running:  # a one-shot that ran is not a service; a hung one is stopped
            self._procs[spec.id].remove(setroot)
            self._save_pids(spec)
        await self._spawn(spec, "openbox", [self._programs["openbox"]])
        await self._spawn(spec, "xmessage", [
            self._programs["xmessage"], "-center", "-buttons", "",
            "-title", desktop_name(spec.id), "-bg", "white", "-fg", "black",
            # xmessage speaks Latin-1: ASCII only.
            f"sandport sandbox {spec.id}\n{spec.ip}  -  background {colour}",
        ])  # fmt: skip

    async def stop(self, spec: SandboxSpec) -> None:
        """Stop the guest programs, last started first, then anything left in the netns."""
        for proc in reversed(self._procs.pop(spec.id, [])):
            await procs.terminate(proc)
        await procs.kill_netns_processes(netns_name(spec.id))
        if self._crun is not None:
            await self._crun.delete(netns_name(spec.id))

    async def destroy(self, spec: SandboxSpec) -> None:
        """Stop everything and remove namespace, veth and workdir; safe to repeat."""
        await self.stop(spec)
        self._ids.pop(spec.id, None)
        await asyncio.to_thread(crun.release_ids, netns_name(spec.id))
        await asyncio.to_thread(netlink.delete_netns, netns_name(spec.id))
        await asyncio.to_thread(netlink.delete_link, host_ifname(spec.id))
        await asyncio.to_thread(shutil.rmtree, spec.workdir, True)
        log.info("sandbox %s: destroyed", spec.id)

    async def inspect(self, spec: SandboxSpec) -> Inspection:
        """What exists of the sandbox now."""
        name = netns_name(spec.id)
        procs_now = self._procs.get(spec.id, [])
        return Inspection(
            exists=netlink.netns_exists(name),
            link_up=await asyncio.to_thread(netlink.link_exists, host_ifname(spec.id)),
            services={p.name: p.running for p in procs_now},
            pids=tuple(procs.pids_in_netns(name)),
        )


def guest_python(*, contained: bool = False) -> str:
    """A Python interpreter a guest can run: this one's base interpreter if a guest sees
    it, else the system's ``python3``. A host-root guest sees the host but its own /tmp
    (so not one under /tmp); a contained guest sees only /usr of the host's trees."""
    base = os.path.realpath(getattr(sys, "_base_executable", sys.executable))
    visible = base.startswith("/usr/") if contained else not base.startswith("/tmp/")
    if visible and os.path.exists(base):
        return base
    where = "under /usr" if contained else "outside /tmp"
    found = shutil.which("python3", path="/usr/local/bin:/usr/bin" + ("" if contained
                                                                        else ":/bin"))
    if found is None:
        raise SandboxFailed(f"no python3 {where} to run the guest agent",
                            hint="apt-get install python3")
    return found


def unlink_beneath(top: Path, relative: str) -> None:
    """Remove ``top/relative`` without following a symlink a guest put on the way."""
    *dirs, leaf = relative.split("/")
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(top, flags)
    except OSError:
        return
    try:
        for d in dirs:
            nxt = os.open(d, flags, dir_fd=fd)
            os.close(fd)
            fd = nxt
        os.unlink(leaf, dir_fd=fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def spec_from_record(
    *,
    sandbox_id: str,
    profile: str,
    ip: str,
    prefixlen: int,
    bridge: str,
    state_dir: Path,
    secrets: dict[str, str] | None = None,
    agent_url: str = "",
) -> SandboxSpec:
    """Rebuild a spec from a store record (with its unsealed secrets, to adopt it)."""
    address = ipaddress.IPv4Interface(f"{ip}/{prefixlen}")
    return SandboxSpec(
        id=sandbox_id,
        profile=profile,
        address=address,
        gateway=address.network.network_address + 1,
        bridge=bridge,
        workdir=state_dir / "sandboxes" / sandbox_id,
        secrets=dict(secrets or {}),
        agent_url=agent_url,
    )
