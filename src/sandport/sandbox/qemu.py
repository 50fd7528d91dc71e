"""The qemu backend: a sandbox is a QEMU microVM on a TAP port of the sandport bridge.

The guest is a :mod:`sandport.sandbox.images` image (a Debian kernel booted straight
through PVH and an initramfs with busybox and the profile's services). Per sandbox:

- TAP ``sp-<id>-t``, an isolated port of the bridge, like a netns sandbox's veth end; the
  guest's address comes from the same pool and reaches the guest on the kernel command
  line in the kernel's own form (``ip=<guest>::<gateway>:<mask>::eth0:off``);
- a *seed* archive appended to a copy of the image's initramfs: the sandbox id, its
  colour, its VNC password file (never on QEMU's command line, which ``ps`` shows);
- ``<workdir>/logs/serial.log`` (the guest console), ``qemu.log`` (QEMU's stderr),
  ``qmp.sock`` (QEMU's monitor: status, clean shutdown);
- the QEMU process, known by pid and start time like any guest process
  (:mod:`sandport.sandbox.procs`), so a restarted gateway adopts it. It starts as root
  (to open the TAP), then runs as an unprivileged host uid of the sandbox's own
  (``-runas``, the same id ranges as netns guests) under QEMU's seccomp ``-sandbox``.

Acceleration: ``kvm`` where ``/dev/kvm`` is usable and is not the paravirtual ``kvm_pvm``
(which runs stock kernels far slower than emulation), else ``tcg``; the choice and why
are logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
from pathlib import Path

from sandport.errors import MissingPackage
from sandport.net import netlink
from sandport.net.antispoof import sandbox_mac
from sandport.proto.rfb import obfuscate_password
from sandport.sandbox import crun, images, procs
from sandport.sandbox.base import GuestPort, Inspection, SandboxSpec
from sandport.sandbox.profiles import colour_hex, desktop_colour, desktop_name, get_profile

log = logging.getLogger(__name__)

QEMU = "qemu-system-x86_64"
PIDS_FILE = "pids.json"
CONSOLE_SOCKET = "console.sock"  # in the workdir: QEMU's VNC display of the VM
STOP_GRACE = 5.0
#: Guest memory by profile: the whole root is a ramfs, so the image must fit twice
#: (the archive and what it unpacks to) with room for the services.
MEMORY_MB = {"echo": 256, "desktop": 512}
#: vCPUs by profile: a desktop starts Xvnc, openbox and the agent's Python at once, and
#: QEMU's multi-threaded TCG runs them on two host cores (about 6 s to ready, not 8).
VCPUS = {"desktop": 2}
#: QEMU's own seccomp filter once the guest runs (``elevateprivileges`` must stay allowed
#: for ``-runas`` to drop root after it is installed).
QEMU_SANDBOX = "on,obsolete=deny,spawn=deny,resourcecontrol=deny"


def tap_name(sandbox_id: str) -> str:
    """The VM's TAP device: ``sp-<id>-t`` (at most 15 bytes)."""
    return f"sp-{sandbox_id}-t"


def guest_mac(sandbox_id: str) -> str:
    """The VM NIC's MAC: the one the bridge's anti-spoofing lets through
    (:func:`~sandport.net.antispoof.sandbox_mac`, QEMU's 52:54:00 prefix)."""
    return sandbox_mac(sandbox_id)


def choose_accel(dev_kvm: Path = Path("/dev/kvm"),
                 kvm_pvm: Path = Path("/sys/module/kvm_pvm")) -> tuple[str, str]:
    """``(accel, why)``: kvm when it is usable and real, else QEMU's own TCG."""
    if kvm_pvm.exists():
        return "tcg", "/dev/kvm is paravirtual kvm_pvm (slower than emulation for VMs)"
    if dev_kvm.exists() and os.access(dev_kvm, os.R_OK | os.W_OK):
        return "kvm", "/dev/kvm is usable"
    return "tcg", "no usable /dev/kvm"


def host_khz() -> int:
    """The host CPU's clock in kHz (``tsc_early_khz``: microvm under TCG needs it)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("cpu MHz"):
                return int(float(line.split(":")[1]) * 1000)
    return 2_000_000


def kernel_ip_arg(spec: SandboxSpec) -> str:
    """The kernel's own static form: ``ip=<guest>::<gateway>:<netmask>::eth0:off``."""
    return f"ip={spec.ip}::{spec.gateway}:{spec.address.network.netmask}::eth0:off"


async def qmp(path: Path, command: str, timeout: float = 3.0) -> dict[str, object]:
    """Run one QMP command on QEMU's monitor socket; its ``return`` (or raise OSError)."""
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_unix_connection(str(path))
        try:
            await reader.readline()  # the greeting
            for cmd in ("qmp_capabilities", command):
                writer.write(json.dumps({"execute": cmd}).encode() + b"\n")
                await writer.drain()
                while True:  # skip asynchronous events
                    doc = json.loads(await reader.readline() or b"{}")
                    if "return" in doc or "error" in doc or not doc:
                        break
            if "error" in doc:
                raise OSError(f"QMP {command}: {doc['error']}")
            answer = doc.get("return", {})
            return answer if isinstance(answer, dict) else {}
        finally:
            writer.close()


class QemuBackend:
    """Sandboxes as QEMU microVMs (see the module docstring)."""

    name = "qemu"
    restarts_services = False  # a VM that exits is failed with QEMU's last words

    def __init__(self, *, image_cache: Path = images.DEFAULT_IMAGE_CACHE,
                 accel: str = "auto", unprivileged: bool = True) -> None:
        self.image_cache = image_cache
        self._accel = accel
        self.unprivileged = unprivileged
        self._procs: dict[str, procs.GuestProcess] = {}

    def ports(self, spec: SandboxSpec) -> tuple[GuestPort, ...]:
        """The guest ports of the sandbox's profile, and ``console``: QEMU's own VNC
        display of the VM (it works for a guest with no network, too)."""
        console = GuestPort(name="console", port=0, protocol="rfb",
                            path=str(spec.workdir / CONSOLE_SOCKET))
        return (*get_profile(spec.profile).ports, console)

    def host_link(self, spec: SandboxSpec) -> str:
        """The VM's TAP device."""
        return tap_name(spec.id)

    def _qemu(self) -> str:
        path = shutil.which(QEMU)
        if path is None:
            raise MissingPackage(f"{QEMU} is not installed (Debian package qemu-system-x86)",
                                 hint="apt-get install qemu-system-x86   (or run `make demo`)")
        return path

    def runs_agent(self, profile: str) -> bool:
        """The desktop image carries the guest agent (and Python for it); echo does not."""
        return profile == "desktop"

    def accel(self) -> tuple[str, str]:
        """The accelerator for new VMs, and why."""
        if self._accel != "auto":
            return self._accel, "asked for"
        return choose_accel()

    async def create(self, spec: SandboxSpec) -> None:
        """The TAP port on the bridge, and the workdir."""
        self._qemu()
        (spec.workdir / "logs").mkdir(parents=True, exist_ok=True)
        await asyncio.to_thread(netlink.create_tap, tap_name(spec.id), spec.bridge)
        log.info("sandbox %s: tap %s on %s", spec.id, tap_name(spec.id), spec.bridge)

    def _seed(self, spec: SandboxSpec) -> bytes:
        values = {"SANDPORT_SANDBOX_ID": spec.id,
                  "SANDPORT_COLOUR": colour_hex(desktop_colour(spec.id)),
                  "SANDPORT_DESKTOP_NAME": desktop_name(spec.id)}
        if spec.agent_url:  # the desktop image's guest agent
            values |= {"SANDPORT_GATEWAY_URL": spec.agent_url,
                       "SANDPORT_AGENT_TOKEN": spec.secrets.get("agent_token", "")}
        env = images.seed_env(values)
        files = {images.SEED_ENV: (env, 0o600)}
        if "vnc_password" in spec.secrets:
            files[images.SEED_VNC_PASSWORD] = (
                obfuscate_password(spec.secrets["vnc_password"]), 0o600)
        return images.seed_archive(files)

    async def start(self, spec: SandboxSpec) -> None:
        """Boot the VM (building its image first if it was never built)."""
        qemu = self._qemu()
        image = images.find_image(spec.profile, self.image_cache)
        if image is None:
            log.info("sandbox %s: building the %s image (once)", spec.id, spec.profile)
            image = await asyncio.to_thread(images.build_image, spec.profile, self.image_cache)
        initrd = spec.workdir / "initrd.cpio"
        await asyncio.to_thread(images.write_initrd, image, self._seed(spec), initrd)
        accel, why = self.accel()
        logs = spec.workdir / "logs"
        serial = logs / "serial.log"
        serial.unlink(missing_ok=True)
        qmp_path = spec.workdir / "qmp.sock"
        qmp_path.unlink(missing_ok=True)
        (spec.workdir / CONSOLE_SOCKET).unlink(missing_ok=True)
        cmdline = (f"{images.KERNEL_CMDLINE} tsc_early_khz={host_khz()} "
                   f"{kernel_ip_arg(spec)}")
        argv = [
            qemu, "-M", "microvm", "-accel", f"{accel},tb-size=64" if accel == "tcg" else accel,
            "-m", str(spec.memory_mb or MEMORY_MB.get(spec.profile, 256)),
            "-smp", str(spec.vcpus or VCPUS.get(spec.profile, 1)),
            "-nodefaults", "-display", "none", "-no-reboot", "-no-user-config",
            "-name", f"sandport-{spec.id}",
            "-kernel", str(image.kernel), "-initrd", str(initrd), "-append", cmdline,
            # The serial console on QEMU's own display (the console port) and in a file.
            "-chardev", f"vc,id=console,logfile={serial},logappend=off",
            "-serial", "chardev:console",
            "-qmp", f"unix:{qmp_path},server=on,wait=off",
            "-vnc", f"unix:{spec.workdir / CONSOLE_SOCKET}",
            "-netdev", f"tap,id=n0,ifname={tap_name(spec.id)},script=no,downscript=no",
            "-device", f"virtio-net-device,netdev=n0,mac={guest_mac(spec.id)}",
        ]
        if accel == "kvm":
            argv[5:5] = ["-cpu", "host"]
        if self.unprivileged:
            # QEMU opens the TAP, sockets and files as root, then, before the guest runs,
            # becomes a host uid of the sandbox's own (see crun.claim_ids) under its own
            # seccomp filter (no exec, no obsolete or resource-control syscalls).
            ids = await asyncio.to_thread(crun.claim_ids, tap_name(spec.id))
            argv += ["-runas", f"{ids.host_base}:{ids.host_base}", "-sandbox", QEMU_SANDBOX]
        log_path = logs / "qemu.log"
        with open(log_path, "ab") as out:  # noqa: ASYNC230 - a local log file
            process = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=out,
                start_new_session=True)
        proc = procs.GuestProcess(name="qemu", pid=process.pid,
                                  started=procs.start_time(process.pid) or 0,
                                  log_path=log_path, essential=True, process=process)
        self._procs[spec.id] = proc
        (spec.workdir / PIDS_FILE).write_text(json.dumps([proc.record()]))
        log.info("sandbox %s: qemu pid %d (%s: %s), image %s", spec.id, process.pid, accel,
                 why, image.key[:16])

    async def adopt(self, spec: SandboxSpec) -> str | None:
        """Take over the QEMU process a crashed gateway started."""
        if not await asyncio.to_thread(netlink.link_exists, tap_name(spec.id)):
            return f"its tap {tap_name(spec.id)} is gone"
        try:
            (doc,) = json.loads((spec.workdir / PIDS_FILE).read_text())
        except (OSError, ValueError):
            return f"no record of its QEMU process ({spec.workdir / PIDS_FILE})"
        proc = procs.GuestProcess.adopted(doc)
        if proc is None:
            return f"QEMU (pid {doc.get('pid')}) no longer runs"
        self._procs[spec.id] = proc
        return None

    def failure(self, spec: SandboxSpec, *, agent: bool = False) -> str | None:
        """QEMU exited: its status and last words."""
        proc = self._procs.get(spec.id)
        if proc is None or proc.running:
            return None
        status = "exited" if proc.returncode is None else f"exited with status {proc.returncode}"
        tail = proc.log_tail(300).replace("\n", " | ")
        return f"QEMU {status}: {tail or 'no output'}; guest console: {self.diagnostics(spec)}"

    def diagnostics(self, spec: SandboxSpec, lines: int = 5) -> str:
        """The last lines of the guest's serial console."""
        try:
            text = (spec.workdir / "logs" / "serial.log").read_bytes()[-4000:]
        except OSError:
            return "(no serial output)"
        last = [ln.strip() for ln in text.decode(errors="replace").splitlines() if ln.strip()]
        return " | ".join(last[-lines:]) or "(no serial output)"

    async def revive_agent(self, spec: SandboxSpec) -> bool:
        """The VM images carry no agent yet: nothing to revive."""
        return False

    async def stop(self, spec: SandboxSpec) -> None:
        """Power the VM off: QMP ``quit``, then SIGTERM, then SIGKILL."""
        proc = self._procs.pop(spec.id, None)
        if proc is None or not proc.running:
            return
        try:
            await qmp(spec.workdir / "qmp.sock", "quit")
        except (OSError, TimeoutError, ValueError):
            await procs.terminate(proc)  # no monitor: signals
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(procs.wait_exit(proc), STOP_GRACE)
            return
        await procs.terminate(proc)

    async def destroy(self, spec: SandboxSpec) -> None:
        """Stop the VM and remove its TAP, sockets and workdir; safe to repeat."""
        await self.stop(spec)
        # A QEMU this gateway never knew (a record without pids): find it by its -name.
        for pid in _qemu_pids(spec.id):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        await asyncio.to_thread(netlink.delete_link, tap_name(spec.id))
        await asyncio.to_thread(crun.release_ids, tap_name(spec.id))
        await asyncio.to_thread(shutil.rmtree, spec.workdir, True)
        log.info("sandbox %s: destroyed (vm)", spec.id)

    async def inspect(self, spec: SandboxSpec) -> Inspection:
        """What exists of the VM now."""
        proc = self._procs.get(spec.id)
        return Inspection(
            exists=proc is not None and proc.running,
            link_up=await asyncio.to_thread(netlink.link_exists, tap_name(spec.id)),
            services={"qemu": proc.running} if proc is not None else {},
            pids=tuple(_qemu_pids(spec.id)),
        )

    async def status(self, spec: SandboxSpec) -> str:
        """QEMU's own view of the VM (``running``, ``paused``...), via QMP."""
        doc = await qmp(spec.workdir / "qmp.sock", "query-status")
        return str(doc.get("status", "unknown"))


def _qemu_pids(sandbox_id: str) -> list[int]:
    """QEMU processes started for this sandbox (by their ``-name``)."""
    needle = f"sandport-{sandbox_id}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(QEMU.encode()) and needle in argv:
            found.append(int(entry))
    return found
