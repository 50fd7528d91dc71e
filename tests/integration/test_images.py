"""The guest image builder (:mod:`sandport.sandbox.images`) with real QEMU microVMs (TCG).

What needs no VM and no root (cpio, the seed, the guest scripts, keys) is in the unit
tier: tests/unit/test_images_unit.py.

The module's cache starts empty, so the images are built from scratch; the kernel .deb is
shared through /var/cache/sandport/images/downloads, so a test run downloads it at most
once. Booted images sit on a TAP + bridge this module creates (``sp-tt*``/``sp-ti*``,
10.201.250.0/24) and removes; traffic goes only to the guest it boots. One VM at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import ipaddress
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import record, require_programs, require_root, vm_slot
from sandport.probe import probe_rfb_tcp
from sandport.proto.rfb import obfuscate_password
from sandport.sandbox import images
from sandport.sandbox.images import inputs as image_inputs
from sandport.sandbox.images import scripts as guest_scripts
from sandport.sandbox.qemu import MEMORY_MB

pytestmark = pytest.mark.vm

SHARED_DOWNLOADS = images.DEFAULT_IMAGE_CACHE / "downloads"
SUBNET = ipaddress.IPv4Network("10.201.250.0/24")
HOST_IP = "10.201.250.1"
GUEST_IP = "10.201.250.2"
BOOT_TIMEOUT = 60.0
LZ4_LEGACY_MAGIC = b"\x02\x21\x4c\x18"


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _used(net: ipaddress.IPv4Network) -> bool:
    out = subprocess.run(["ip", "-o", "-4", "addr", "show"], capture_output=True, text=True,
                         check=True).stdout
    return any(ipaddress.IPv4Interface(w).network.overlaps(net)
               for line in out.splitlines() for w in line.split()[3:4])


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty image cache for this module."""
    require_root()
    require_programs("qemu-system-x86_64", "busybox", "lz4", "socat", "apt-get", "dpkg-deb")
    return tmp_path_factory.mktemp("images")


def _build(profile: str, cache: Path) -> images.Image:
    t0 = time.monotonic()
    image = images.build_image(profile, cache, downloads_dir=SHARED_DOWNLOADS)
    sizes = image.manifest["sizes"]
    record(f"image {profile}: built from scratch in {time.monotonic() - t0:.1f} s "
           f"(initramfs {_mib(sizes['initramfs'])}, unpacks to {_mib(sizes['unpacked'])}; "
           f"vmlinux {_mib(sizes['vmlinux'])})")
    return image


@pytest.fixture(scope="module")
def echo_image(cache: Path) -> images.Image:
    """The echo image, built once for the module."""
    return _build("echo", cache)


@dataclass
class Net:
    """The module's bridge and TAP device."""

    bridge: str
    tap: str


@pytest.fixture(scope="module")
def net() -> Iterator[Net]:
    """A bridge holding HOST_IP and a TAP port for the VMs; removed even on failure."""
    require_root()
    if _used(SUBNET):
        pytest.fail(f"{SUBNET} is in use on this host (a leftover sp-tt* bridge?)")
    suffix = secrets.token_hex(3)
    n = Net(bridge=f"sp-tt{suffix}", tap=f"sp-ti{suffix}")

    def ip(*args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True)

    try:
        ip("link", "add", n.bridge, "type", "bridge")
        ip("addr", "add", f"{HOST_IP}/{SUBNET.prefixlen}", "dev", n.bridge)
        ip("link", "set", n.bridge, "up")
        ip("tuntap", "add", "dev", n.tap, "mode", "tap")
        ip("link", "set", n.tap, "master", n.bridge)
        ip("link", "set", n.tap, "up")
        yield n
    finally:
        for link in (n.tap, n.bridge):
            subprocess.run(["ip", "link", "del", link], capture_output=True, check=False)


def host_khz() -> int:
    """The host's clock in kHz, for tsc_early_khz (microvm under TCG needs it)."""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("cpu MHz"):
            return int(float(line.split(":")[1]) * 1000)
    raise AssertionError("no 'cpu MHz' in /proc/cpuinfo")


@dataclass
class Vm:
    """A running QEMU and its serial console log."""

    proc: subprocess.Popen[bytes]
    serial: Path
    errors: Path
    started: float

    def console(self) -> str:
        try:
            return self.serial.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_for(self, line: str, within: float = BOOT_TIMEOUT) -> float:
        """Seconds from QEMU's start until ``line`` is on the console; fails on a guest
        error line, QEMU's exit or the deadline, with the console's tail."""
        deadline = time.monotonic() + within
        while True:
            text = self.console()
            if line in text:
                return time.monotonic() - self.started
            problem = ""
            if f"{images.MARKER} error" in text:
                problem = "the guest reported an error"
            elif self.proc.poll() is not None:
                problem = (f"QEMU exited with status {self.proc.returncode}: "
                           f"{self.errors.read_text(errors='replace')[-1000:]}")
            elif time.monotonic() > deadline:
                problem = f"not within {within:.0f} s"
            if problem:
                pytest.fail(f"waiting for {line!r}: {problem}\n--- console:\n{text[-3000:]}")
            time.sleep(0.05)


@contextlib.contextmanager
def boot(image: images.Image, net: Net, workdir: Path, seed: bytes, ip_arg: str,
         memory_mb: int = 256) -> Iterator[Vm]:
    """Boot ``image`` + ``seed`` on the module's TAP; QEMU is killed on exit."""
    workdir.mkdir(parents=True, exist_ok=True)
    initrd = workdir / "initrd.cpio"
    images.write_initrd(image, seed, initrd)
    serial, errors = workdir / "serial.log", workdir / "qemu.err"
    argv = [
        "qemu-system-x86_64", "-M", "microvm", "-accel", "tcg", "-m", str(memory_mb),
        "-smp", "1", "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-kernel", str(image.kernel), "-initrd", str(initrd),
        "-append", f"{images.KERNEL_CMDLINE} tsc_early_khz={host_khz()} ip={ip_arg}",
        "-serial", f"file:{serial}",
        "-netdev", f"tap,id=n0,ifname={net.tap},script=no,downscript=no",
        "-device", "virtio-net-device,netdev=n0,mac=52:54:00:5a:00:02",
    ]  # fmt: skip
    with vm_slot():
        with errors.open("wb") as err:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=err, stderr=err)
        vm = Vm(proc=proc, serial=serial, errors=errors, started=time.monotonic())
        try:
            yield vm
        finally:
            proc.kill()
            proc.wait(10)


STATIC_IP = f"{GUEST_IP}::{HOST_IP}:{SUBNET.netmask}::eth0:off"


def _seed(sandbox_id: str, password: str | None = None) -> bytes:
    files = {images.SEED_ENV: (images.seed_env({
        "SANDPORT_SANDBOX_ID": sandbox_id, "SANDPORT_COLOUR": "#1e90ff",
        "SANDPORT_DESKTOP_NAME": f"sandport {sandbox_id}"}), 0o600)}
    if password is not None:
        files[images.SEED_VNC_PASSWORD] = (obfuscate_password(password), 0o600)
    return images.seed_archive(files)


# --------------------------------------------------------------------------------------------
# Building and the cache.
# --------------------------------------------------------------------------------------------


def test_echo_image_from_scratch(echo_image: images.Image, cache: Path) -> None:
    assert echo_image.dir == cache / f"echo-{echo_image.key[:16]}"
    assert echo_image.kernel == echo_image.dir / "vmlinux"
    assert echo_image.initrd == echo_image.dir / "initramfs.cpio"
    assert echo_image.kernel.read_bytes()[:4] == b"\x7fELF"
    initrd = echo_image.initrd.read_bytes()
    assert initrd[:4] == LZ4_LEGACY_MAGIC
    # Ready for a seed to be appended: 4-aligned, ending in a zero lz4 chunk length.
    assert len(initrd) % 4 == 0
    assert initrd[-4:] == b"\0\0\0\0"
    manifest = json.loads((echo_image.dir / "manifest.json").read_text())
    assert manifest == echo_image.manifest
    assert manifest["profile"] == "echo"
    assert manifest["key"] == echo_image.key == images.image_key(manifest["inputs"])
    assert manifest["kernel_version"].endswith("-amd64")
    assert manifest["inputs"]["kernel_package"] == f"linux-image-{manifest['kernel_version']}"
    assert "pkg:busybox-static" in manifest["inputs"]
    assert "pkg:socat" in manifest["inputs"]
    assert manifest["sizes"]["initramfs"] == len(initrd)
    assert {"built_at", "build_seconds"} <= manifest.keys()
    assert not [p.name for p in cache.iterdir() if p.name.startswith(".tmp-")]


def test_rebuild_with_the_same_inputs_is_the_cached_image(
        echo_image: images.Image, cache: Path) -> None:
    def snapshot() -> dict[str, int]:
        return {str(p): p.stat().st_mtime_ns for p in sorted(cache.rglob("*"))
                if not p.name.startswith(".lock")}

    before = snapshot()
    steps: list[str] = []
    t0 = time.monotonic()
    again = images.build_image("echo", cache, downloads_dir=SHARED_DOWNLOADS,
                               progress=lambda step, _f: steps.append(step))
    elapsed = time.monotonic() - t0
    record(f"image echo: cached rebuild returned in {elapsed:.2f} s")
    assert again.key == echo_image.key
    assert again.dir == echo_image.dir
    assert steps[-1] == "cached"
    assert elapsed < 1.0
    assert snapshot() == before  # nothing written, nothing touched
    found = images.find_image("echo", cache)
    assert found is not None
    assert found.key == echo_image.key


def test_a_changed_input_is_a_new_key(echo_image: images.Image, cache: Path,
                                      tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(image_inputs, "BUILDER_VERSION", "test-changed")
    inputs = images.image_inputs("echo", cache_dir=cache)
    assert inputs["builder"] == "test-changed"
    assert images.image_key(inputs) != echo_image.key
    assert images.find_image("echo", cache) is None  # the old image is not the current one
    monkeypatch.undo()

    # A changed guest script (a copy of guest/ with one line more in each file).
    before = echo_image.manifest["inputs"]
    for name, field in (("init.sh", "init_sha256"), ("echo.sh", "files_sha256")):
        guest = tmp_path / name
        shutil.copytree(Path(str(guest_scripts.GUEST_SCRIPTS_DIR)), guest)
        (guest / name).write_text((guest / name).read_text() + "# changed\n")
        monkeypatch.setattr(guest_scripts, "GUEST_SCRIPTS_DIR", guest)
        inputs = images.image_inputs("echo", cache_dir=cache)
        assert inputs[field] != before[field], name
        assert images.image_key(inputs) != echo_image.key
        assert images.find_image("echo", cache) is None
        monkeypatch.undo()
    assert images.find_image("echo", cache) == echo_image  # the scripts as shipped: built


def test_builders_of_one_cache_take_turns(echo_image: images.Image, cache: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A builder waits for the cache's lock; a killed build's leftovers are removed; force
    replaces an image in place."""
    monkeypatch.setattr(image_inputs, "BUILDER_VERSION", "test-lock")
    stale = cache / ".tmp-echo-killed"  # what a killed build leaves
    (stale / "root").mkdir(parents=True)
    steps: list[str] = []
    result: list[images.Image] = []
    with (cache / ".lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        builder = threading.Thread(target=lambda: result.append(images.build_image(
            "echo", cache, downloads_dir=SHARED_DOWNLOADS,
            progress=lambda step, _f: steps.append(step))))
        builder.start()
        deadline = time.monotonic() + 10
        while "wait for another build of this cache" not in steps:
            assert time.monotonic() < deadline, steps
            time.sleep(0.02)
        time.sleep(0.3)
        assert not result  # still waiting
        assert stale.exists()
    builder.join(60)
    (image,) = result
    assert not stale.exists()
    assert image.key != echo_image.key
    assert image.manifest["inputs"]["builder"] == "test-lock"
    assert echo_image.initrd.exists()  # the other image is untouched

    written = image.initrd.stat().st_mtime_ns
    again = images.build_image("echo", cache, force=True, downloads_dir=SHARED_DOWNLOADS)
    assert again.dir == image.dir
    assert again.initrd.stat().st_mtime_ns > written  # built again, in place
    assert not [p.name for p in cache.iterdir() if p.name.startswith(".tmp-")]
    shutil.rmtree(image.dir)


def test_list_images(echo_image: images.Image, cache: Path) -> None:
    listed = images.list_images(cache)
    assert echo_image.key in [i.key for i in listed]
    assert all(i.profile in images.IMAGE_PROFILES for i in listed)


# --------------------------------------------------------------------------------------------
# Booting.
# --------------------------------------------------------------------------------------------


def _tcp_echo(data: bytes) -> bytes:
    with socket.create_connection((GUEST_IP, images.ECHO_PORT), timeout=10) as s:
        s.sendall(data)
        got = b""
        while len(got) < len(data):
            chunk = s.recv(65536)
            if not chunk:
                break
            got += chunk
        return got


def _http_get() -> bytes:
    with socket.create_connection((GUEST_IP, images.HTTP_PORT), timeout=10) as s:
        s.sendall(b"GET / HTTP/1.0\r\nHost: guest\r\n\r\n")
        return b"".join(iter(lambda: s.recv(65536), b""))


def test_echo_image_boots_and_serves(echo_image: images.Image, net: Net,
                                     tmp_path: Path) -> None:
    sandbox_id = f"t{secrets.token_hex(3)}"
    with boot(echo_image, net, tmp_path, _seed(sandbox_id), STATIC_IP) as vm:
        net_at = vm.wait_for(f"{images.MARKER} net eth0 {GUEST_IP}/24 gw {HOST_IP}")
        up_at = vm.wait_for(f"{images.MARKER} services echo started")
        record(f"image echo: qemu start -> net marker {net_at:.1f} s, "
               f"services marker {up_at:.1f} s (TCG)")
        assert f"{images.MARKER} warning" not in vm.console()

        payload = os.urandom(3000) + b"\n"
        assert _tcp_echo(payload) == payload

        # UDP: every datagram goes back to its own sender, from two senders. Like any UDP
        # client, a sender tries again when no answer comes (a loaded TCG guest forking
        # socat per datagram may be slow); what comes back must be its own datagram.
        senders = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(2)]
        try:
            for i in range(3):
                for n, s in enumerate(senders):
                    s.settimeout(3)
                    message = f"datagram {i} from {n}".encode()
                    for _attempt in range(5):
                        s.sendto(message, (GUEST_IP, images.ECHO_PORT))
                        with contextlib.suppress(TimeoutError):
                            data, peer = s.recvfrom(65536)
                            break
                    else:
                        pytest.fail(f"no UDP echo for {message!r} after 5 tries")
                    while data != message:  # a late answer to an earlier try
                        data, peer = s.recvfrom(65536)
                    assert (data, peer) == (message, (GUEST_IP, images.ECHO_PORT))
        finally:
            for s in senders:
                s.close()

        answer = _http_get()
        assert answer.startswith(b"HTTP/1.")
        assert b" 200 " in answer.split(b"\r\n")[0]
        assert f"sandport echo {sandbox_id}".encode() in answer


def test_echo_image_takes_its_address_from_dhcp(echo_image: images.Image, net: Net,
                                                tmp_path: Path) -> None:
    """``ip=dhcp``: busybox udhcpc in the guest, busybox udhcpd on the test bridge."""
    conf = tmp_path / "udhcpd.conf"
    leases = tmp_path / "udhcpd.leases"
    leases.touch()
    conf.write_text(f"start 10.201.250.50\nend 10.201.250.59\ninterface {net.bridge}\n"
                    f"lease_file {leases}\noption subnet 255.255.255.0\n"
                    f"option router {HOST_IP}\noption lease 600\n")
    with (tmp_path / "udhcpd.log").open("wb") as log:
        server = subprocess.Popen(["busybox", "udhcpd", "-f", str(conf)], stdout=log,
                                  stderr=log)
    try:
        time.sleep(0.2)
        if server.poll() is not None:
            pytest.fail(f"udhcpd exited: {(tmp_path / 'udhcpd.log').read_text()}")
        with boot(echo_image, net, tmp_path / "vm", b"", "dhcp") as vm:
            vm.wait_for(f"{images.MARKER} services echo started")
            console = vm.console()
            assert f"{images.MARKER} net eth0 10.201.250.5" in console
            assert f"/24 gw {HOST_IP}" in console
            assert "no /etc/sandport/seed.env: defaults in use" in console  # no seed: copes
    finally:
        server.kill()
        server.wait(10)


def test_desktop_image_boots_to_vnc(cache: Path, net: Net, tmp_path: Path) -> None:
    require_programs("Xvnc", "openbox", "xmessage", "xsetroot")
    image = _build("desktop", cache)
    assert {"pkg:tigervnc-standalone-server", "pkg:openbox", "pkg:xkb-data"} <= \
        image.manifest["inputs"].keys()
    sandbox_id = f"t{secrets.token_hex(3)}"
    password = "pw" + secrets.token_hex(3)
    with boot(image, net, tmp_path, _seed(sandbox_id, password), STATIC_IP,
              memory_mb=MEMORY_MB["desktop"]) as vm:
        deadline = time.monotonic() + BOOT_TIMEOUT
        banner = b""
        while not banner:
            try:
                with socket.create_connection((GUEST_IP, 5901), timeout=0.5) as s:
                    s.settimeout(10)
                    banner = s.recv(12)
            except OSError:
                if vm.proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"no RFB banner (qemu {vm.proc.poll()}):\n{vm.console()[-3000:]}")
                time.sleep(0.05)
        banner_at = time.monotonic() - vm.started
        assert banner == b"RFB 003.008\n"
        record(f"image desktop: qemu start -> RFB banner {banner_at:.1f} s "
               f"(TCG, {MEMORY_MB['desktop']} MB)")
        vm.wait_for(f"{images.MARKER} services desktop started")

        good = asyncio.run(probe_rfb_tcp(GUEST_IP, 5901, password=password, timeout=10))
        assert good.ok, good.detail
        assert good.desktop == f"sandport {sandbox_id}"
        assert good.size == (1280, 800)
        bad = asyncio.run(probe_rfb_tcp(GUEST_IP, 5901, password="wrong-pw", timeout=10))
        assert not bad.ok
        assert bad.stage == "auth"


# --------------------------------------------------------------------------------------------
# The command line.
# --------------------------------------------------------------------------------------------

SANDPORT = [sys.executable, "-m", "sandport"]


def test_cli_build_reports_the_cached_image_and_lists_it(
        echo_image: images.Image, cache: Path) -> None:
    built = subprocess.run([*SANDPORT, "image", "build", "--profile", "echo",
                            "--cache-dir", str(cache)], capture_output=True, text=True,
                           timeout=60, check=False)
    assert built.returncode == 0, built.stderr
    (line,) = built.stdout.splitlines()
    assert line.split()[:2] == ["echo", echo_image.key[:16]]
    assert "cached" in line

    listed = subprocess.run([*SANDPORT, "image", "list", "--cache-dir", str(cache), "--json"],
                            capture_output=True, text=True, timeout=60, check=False)
    assert listed.returncode == 0, listed.stderr
    docs = json.loads(listed.stdout)
    assert echo_image.key in [d["key"] for d in docs]
    assert {"profile", "key", "dir", "kernel", "initrd", "manifest"} <= docs[0].keys()

    table = subprocess.run([*SANDPORT, "image", "list", "--cache-dir", str(cache)],
                           capture_output=True, text=True, timeout=60, check=False)
    assert echo_image.key[:16] in table.stdout

