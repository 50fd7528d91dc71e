"""The image builder's pure parts (:mod:`sandport.sandbox.images`): no QEMU, no root.

The cpio writer and reader, the seed, the guest scripts (found, POSIX sh, shellcheck
clean, every variable they use defined), image.env, keys and the kernel's decompression.
Building and booting images is the vm tier's (tests/integration/test_images.py); this
file has its own name because pytest needs unique basenames (tests/ has no packages).
"""

from __future__ import annotations

import hashlib
import io
import json
import lzma
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

import conftest
from conftest import require_programs
from sandport.errors import SandportError, UsageError
from sandport.proto.rfb import obfuscate_password
from sandport.sandbox import images
from sandport.sandbox.images import cpio, kernel, scripts
from sandport.sandbox.images.seed import shell_env

pytestmark = pytest.mark.unit

GUEST_SCRIPTS = ("init.sh", "echo.sh", "desktop.sh", "udhcpc.sh")


# --------------------------------------------------------------------------------------------
# cpio newc.
# --------------------------------------------------------------------------------------------

#: A regular file "a" (mode 0644, 3 bytes "xyz", inode 1): header, name + NUL, padding to
#: 4 (110 + 2 = 112: none), data, padding (3 -> 4). Written out by hand from man 5 cpio.
FILE_ENTRY = (b"070701" + b"00000001" + b"000081A4" + b"00000000" * 2 + b"00000001"
              + b"00000000" + b"00000003" + b"00000000" * 4 + b"00000002" + b"00000000"
              + b"a\0" + b"xyz\0")
TRAILER_LEN = 124  # 110 + len("TRAILER!!!\0") = 121, padded to 4


def test_newc_header_round_trips() -> None:
    header = cpio.NewcHeader(ino=7, mode=0o100755, owner=(1000, 100), nlink=1,
                             mtime=1_700_000_000, filesize=1234, dev=(8, 1), rdev=(5, 1),
                             namesize=9, check=3)
    data = bytes(header)
    assert len(data) == cpio.NEWC_HEADER_LEN == 110
    assert data.startswith(cpio.NEWC_MAGIC)
    assert cpio.NewcHeader.from_bytes(data) == header
    assert len(header.fields()) == len(cpio.NEWC_FIELDS)
    assert dict(zip(cpio.NEWC_FIELDS, header.fields(), strict=True)) == {
        "ino": 7, "mode": 0o100755, "uid": 1000, "gid": 100, "nlink": 1,
        "mtime": 1_700_000_000, "filesize": 1234, "devmajor": 8, "devminor": 1,
        "rdevmajor": 5, "rdevminor": 1, "namesize": 9, "check": 3}
    assert data[6:].decode() == "".join(f"{v:08X}" for v in header.fields())


@pytest.mark.parametrize(("data", "message"), [
    (b"", "no newc header"),
    (b"070707" + b"0" * 104, "no newc header"),  # the old binary-ish "odc" magic
    (b"070701" + b"zz" + b"0" * 102, "bad newc header"),
    (FILE_ENTRY[:109], "no newc header"),
])
def test_newc_header_refuses(data: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        cpio.NewcHeader.from_bytes(data)


def test_writer_matches_the_byte_fixture() -> None:
    buf = io.BytesIO()
    writer = cpio.CpioWriter(buf)
    writer.add_file("a", b"xyz", 0o644)
    writer.finish()
    out = buf.getvalue()
    assert out.startswith(FILE_ENTRY)
    assert len(out) == len(FILE_ENTRY) + TRAILER_LEN
    assert writer.written == len(out)
    assert cpio.read_cpio(out) == [cpio.CpioEntry(name="a", mode=0o100644, data=b"xyz")]


@pytest.mark.parametrize("name", ["", "/etc/passwd", "a\0b"])
def test_writer_refuses_bad_names(name: str) -> None:
    with pytest.raises(ValueError, match="bad cpio entry name"):
        cpio.CpioWriter(io.BytesIO()).add_file(name, b"")


def test_read_cpio_refuses_incomplete_archives() -> None:
    buf = io.BytesIO()
    writer = cpio.CpioWriter(buf)
    writer.add_file("a", b"xyz")
    writer.finish()
    whole = buf.getvalue()
    assert cpio.read_cpio(whole)
    with pytest.raises(ValueError, match="no newc header at offset 116"):
        cpio.read_cpio(whole[:len(FILE_ENTRY)])  # no trailer
    with pytest.raises(ValueError, match="runs past the end"):
        cpio.read_cpio(FILE_ENTRY[:-2])


def test_writer_archives_a_tree_parents_first(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "etc" / "deep").mkdir(parents=True)
    (root / "etc" / "deep" / "f").write_bytes(b"12345")
    (root / "etc" / "deep" / "f").chmod(0o600)
    (root / "bin").mkdir()
    (root / "bin" / "sh").symlink_to("busybox")
    fractions: list[float] = []
    buf = io.BytesIO()
    writer = cpio.CpioWriter(buf)
    writer.add_tree(root, fractions.append)
    writer.add_char_device("dev/console", 0o600, 5, 1)
    writer.finish()
    entries = {e.name: e for e in cpio.read_cpio(buf.getvalue())}
    # A directory's entries (sorted), then each subdirectory's: parents always first.
    assert list(entries) == ["bin", "etc", "bin/sh", "etc/deep", "etc/deep/f", "dev/console"]
    assert entries["bin/sh"].mode == stat.S_IFLNK | 0o777
    assert entries["bin/sh"].data == b"busybox"
    assert entries["etc/deep/f"].mode == stat.S_IFREG | 0o600
    assert entries["etc/deep/f"].data == b"12345"
    assert stat.S_ISDIR(entries["etc/deep"].mode)
    assert entries["dev/console"].mode == stat.S_IFCHR | 0o600
    assert entries["dev/console"].rdev == (5, 1)
    assert fractions == [1.0]


# --------------------------------------------------------------------------------------------
# The seed archive (moved from the vm tier: it needs no VM).
# --------------------------------------------------------------------------------------------


def test_seed_archive_round_trips(tmp_path: Path) -> None:
    require_programs("busybox")
    tricky = "it's $HOME \"quoted\" `x`  spaced"
    env = images.seed_env({"SANDPORT_SANDBOX_ID": "ab12cd", "SANDPORT_DESKTOP_NAME": tricky})
    files = {
        "/etc/sandport/seed.env": (env, 0o600),
        "/etc/sandport/vncpasswd": (obfuscate_password("s3cret"), 0o600),
        "/srv/deep/dir/data.bin": (bytes(range(256)) * 3 + b"x", 0o644),
    }
    archive = images.seed_archive(files)
    assert len(archive) % 4 == 0

    entries = images.read_cpio(archive)
    names = [e.name for e in entries]
    assert names == ["etc", "etc/sandport", "etc/sandport/seed.env", "etc/sandport/vncpasswd",
                     "srv", "srv/deep", "srv/deep/dir", "srv/deep/dir/data.bin"]
    by_name = {e.name: e for e in entries}
    for path, (content, mode) in files.items():
        entry = by_name[path.lstrip("/")]
        assert entry.data == content
        assert entry.mode == 0o100000 | mode

    # busybox cpio (another reader) agrees, and extracts the same bytes and modes.
    listed = subprocess.run(["busybox", "cpio", "-t"], input=archive, capture_output=True,
                            check=True).stdout.decode().split()
    assert listed == names
    out = tmp_path / "x"
    out.mkdir()
    subprocess.run(["busybox", "cpio", "-i", "-d"], input=archive, cwd=out,
                   capture_output=True, check=True)
    for path, (content, mode) in files.items():
        extracted = out / path.lstrip("/")
        assert extracted.read_bytes() == content
        assert extracted.stat().st_mode & 0o777 == mode

    # seed.env is shell: the guest's /init sources it; values arrive unchanged.
    shown = subprocess.run(["busybox", "sh", "-c", '. "$1"; printf %s "$SANDPORT_DESKTOP_NAME"',
                            "sh", str(out / "etc/sandport/seed.env")],
                           capture_output=True, text=True, check=True).stdout
    assert shown == tricky


@pytest.mark.parametrize("bad", ["", "/", "/etc/../x", "etc//x", "./etc/x"])
def test_seed_archive_refuses_bad_paths(bad: str) -> None:
    with pytest.raises(ValueError, match="bad guest path"):
        images.seed_archive({bad: (b"x", 0o644)})


def test_seed_env_refuses_bad_names() -> None:
    with pytest.raises(ValueError, match="bad seed variable name"):
        images.seed_env({"lower": "x"})
    with pytest.raises(ValueError, match="seed variable X contains NUL"):
        images.seed_env({"X": "a\0b"})


def test_write_initrd_appends_the_seed(tmp_path: Path) -> None:
    initrd = tmp_path / "initramfs.cpio"
    initrd.write_bytes(b"LZ4 frame\0\0\0")
    image = images.Image(profile="echo", key="0" * 64, dir=tmp_path, kernel=tmp_path / "k",
                         initrd=initrd, manifest={})
    dest = tmp_path / "vm" / "initrd"
    dest.parent.mkdir()
    images.write_initrd(image, b"SEED", dest)
    assert dest.read_bytes() == b"LZ4 frame\0\0\0SEED"
    assert stat.S_IMODE(dest.stat().st_mode) == 0o600
    assert not list(dest.parent.glob("*.tmp"))


# --------------------------------------------------------------------------------------------
# The guest scripts.
# --------------------------------------------------------------------------------------------


def test_every_guest_script_ships_and_is_placed() -> None:
    for name in GUEST_SCRIPTS:
        text = scripts.guest_script(name).decode()
        lines = text.splitlines()
        assert lines[:2] == ["#!/bin/sh", "# shellcheck shell=sh"], name  # POSIX sh
        assert "@" + "MARKER@" not in text  # no leftover template placeholders
    for profile in images.IMAGE_PROFILES:
        files = images.guest_files(profile)
        assert files["/init"] == (scripts.guest_script("init.sh"), 0o755)
        assert files[scripts.PROFILE_SCRIPT] == (scripts.guest_script(f"{profile}.sh"), 0o644)
        assert files[scripts.UDHCPC_SCRIPT] == (scripts.guest_script("udhcpc.sh"), 0o755)
        assert files[scripts.IMAGE_ENV] == (scripts.image_env(), 0o644)
        assert (images.GUEST_AGENT in files) == (profile == "desktop")
    # The paths init.sh names literally are the ones the builder writes.
    init = scripts.guest_script("init.sh").decode()
    for path in (scripts.IMAGE_ENV, scripts.PROFILE_SCRIPT, scripts.UDHCPC_SCRIPT):
        assert re.search(rf"(^|\s){re.escape(path)}(\s|$)", init, re.MULTILINE), path


def test_guest_scripts_parse_in_busybox_sh() -> None:
    require_programs("busybox")
    for name in GUEST_SCRIPTS:
        path = scripts.GUEST_SCRIPTS_DIR / name
        done = subprocess.run(["busybox", "sh", "-n", str(path)], capture_output=True,
                              text=True, check=False)
        assert done.returncode == 0, f"{name}: {done.stderr}"


def test_guest_scripts_are_read_when_the_image_is_made(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    copy = tmp_path / "guest"
    shutil.copytree(Path(str(scripts.GUEST_SCRIPTS_DIR)), copy)
    (copy / "echo.sh").write_text((copy / "echo.sh").read_text() + "# changed\n")
    before = images.guest_files("echo")
    monkeypatch.setattr(scripts, "GUEST_SCRIPTS_DIR", copy)
    after = images.guest_files("echo")
    assert after[scripts.PROFILE_SCRIPT][0].endswith(b"# changed\n")
    assert after["/init"] == before["/init"]


def test_unknown_profile_has_no_scripts() -> None:
    with pytest.raises(UsageError, match="no image profile 'nope'"):
        images.guest_files("nope")
    with pytest.raises(UsageError, match="no image profile 'nope'"):
        images.init_script("nope")


def test_image_env_arrives_unchanged_in_the_guest_shell(tmp_path: Path) -> None:
    require_programs("busybox")
    env = tmp_path / "image.env"
    env.write_bytes(scripts.image_env())
    values = scripts.image_values()
    shown = subprocess.run(["busybox", "sh", "-c", 'set -a; . "$1"; exec env', "sh", str(env)],
                           capture_output=True, text=True, check=True, env={}).stdout
    exported = dict(line.split("=", 1) for line in shown.splitlines())
    assert {k: exported.get(k) for k in values} == values
    assert values["VIRTIO_MODULES"].split() == list(images.VIRTIO_MODULES)
    assert values["ECHO_PORT"] == str(images.ECHO_PORT)
    assert values["MARKER"] == images.MARKER


def test_shell_env_quotes_what_could_run() -> None:
    text = shell_env({"A": "$(reboot)", "B": "it's", "C": ""}, what="image").decode()
    assert text == "A='$(reboot)'\nB='it'\"'\"'s'\nC=''\n"
    with pytest.raises(ValueError, match="bad image variable name 'A B'"):
        shell_env({"A B": "x"}, what="image")


def _shellcheck(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    require_programs("shellcheck")
    return subprocess.run(["shellcheck", *args], input=stdin, capture_output=True, text=True,
                          check=False)


def test_guest_scripts_pass_shellcheck() -> None:
    paths = [str(scripts.GUEST_SCRIPTS_DIR / name) for name in GUEST_SCRIPTS]
    done = _shellcheck("--shell=sh", *paths)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("profile", images.IMAGE_PROFILES)
def test_every_variable_the_guest_uses_is_set(profile: str) -> None:
    """/init as the guest runs it (image.env and profile.sh in place of the lines that
    source them): shellcheck's check for unassigned upper-case names finds none, so no
    script reads a constant image.env does not set."""
    files = images.guest_files(profile)
    init = files["/init"][0].decode()
    for path in (scripts.IMAGE_ENV, scripts.PROFILE_SCRIPT):
        init = init.replace(f". {path}\n", files[path][0].decode().replace("#!/bin/sh\n", ""))
    assert f". {scripts.IMAGE_ENV}" not in init
    done = _shellcheck("--shell=sh", "--enable=check-unassigned-uppercase", "--exclude=SC2034",
                       "-", stdin=init)  # SC2034: the other profile's constants
    assert done.returncode == 0, done.stdout
    # And it is not vacuous: a name image.env lacks is found.
    broken = init.replace("MARKER=SANDPORT-GUEST\n", "")
    done = _shellcheck("--shell=sh", "--enable=check-unassigned-uppercase", "-", stdin=broken)
    assert "MARKER is referenced but not assigned" in done.stdout


def test_missing_shellcheck_fails_under_require_all(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(conftest, "REQUIRE_ALL", True)
    monkeypatch.setattr(shutil, "which", lambda *_a, **_k: None)
    with pytest.raises(pytest.fail.Exception, match="apt-get install shellcheck"):
        _shellcheck("--version")


# --------------------------------------------------------------------------------------------
# Keys and the cache.
# --------------------------------------------------------------------------------------------


def test_image_key_is_the_sha256_of_canonical_inputs() -> None:
    inputs = {"b": "2", "a": "1"}
    assert images.image_key(inputs) == hashlib.sha256(b'{"a":"1","b":"2"}').hexdigest()
    assert images.image_key(dict(reversed(inputs.items()))) == images.image_key(inputs)
    assert images.image_key({**inputs, "a": "changed"}) != images.image_key(inputs)


def _fake_image(cache: Path, profile: str, key: str, built_at: str) -> Path:
    d = cache / f"{profile}-{key[:16]}"
    d.mkdir(parents=True)
    (d / "vmlinux").write_bytes(b"\x7fELF")
    (d / "initramfs.cpio").write_bytes(b"x")
    (d / "manifest.json").write_text(json.dumps({"profile": profile, "key": key,
                                                 "built_at": built_at}))
    return d


def test_list_images_reads_only_complete_images(tmp_path: Path) -> None:
    assert images.list_images(tmp_path) == []
    assert images.list_images(tmp_path / "missing") == []
    _fake_image(tmp_path, "echo", "a" * 64, "2026-01-01T00:00:00Z")
    _fake_image(tmp_path, "echo", "b" * 64, "2026-02-01T00:00:00Z")
    _fake_image(tmp_path, "desktop", "c" * 64, "2026-01-01T00:00:00Z")
    (_fake_image(tmp_path, "echo", "d" * 64, "x") / "vmlinux").unlink()  # incomplete
    misnamed = _fake_image(tmp_path, "echo", "e" * 64, "x")
    misnamed.rename(tmp_path / f"echo-{'f' * 16}")  # the name is not its key's
    (tmp_path / ".tmp-echo-1234").mkdir()
    listed = images.list_images(tmp_path)
    assert [(i.profile, i.key[0]) for i in listed] == [("desktop", "c"), ("echo", "b"),
                                                       ("echo", "a")]
    assert listed[1].kernel == tmp_path / f"echo-{'b' * 16}" / "vmlinux"


def test_unknown_profile_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="no image profile 'nope'"):
        images.build_image("nope", tmp_path)


def test_no_apt_lists_is_a_usage_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    require_programs("apt-cache")
    lists = tmp_path / "lists"
    (lists / "partial").mkdir(parents=True)
    conf = tmp_path / "apt.conf"
    conf.write_text(f'Dir::State::Lists "{lists}";\n')
    monkeypatch.setenv("APT_CONFIG", str(conf))
    with pytest.raises(UsageError, match="linux-image-amd64") as info:
        images.build_image("echo", tmp_path / "cache")
    assert "apt-get update" in str(info.value)


def test_cli_bad_profile_exits_2(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "sandport", "image", "build", "--profile",
                           "nope", "--cache-dir", str(tmp_path)], capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 2
    assert "error:" in done.stderr
    assert "nope" in done.stderr


# --------------------------------------------------------------------------------------------
# The kernel.
# --------------------------------------------------------------------------------------------

ELF = b"\x7fELF" + os.urandom(5000)


@pytest.mark.parametrize(("vmlinuz", "message"), [
    (b"MZ boot stub" + lzma.compress(ELF, format=lzma.FORMAT_XZ), None),
    (b"MZ boot stub, then no xz at all", "no xz stream"),
    (b"MZ" + lzma.compress(ELF, format=lzma.FORMAT_XZ)[:-40], "truncated"),
    (b"MZ" + lzma.compress(b"not an ELF", format=lzma.FORMAT_XZ), "not an ELF"),
])
def test_decompress_vmlinuz(tmp_path: Path, vmlinuz: bytes, message: str | None) -> None:
    steps: list[str] = []
    dest = tmp_path / "vmlinux"
    if message is None:
        kernel.decompress_vmlinuz(vmlinuz, dest, lambda step, _f: steps.append(step))
        assert dest.read_bytes() == ELF
        assert steps == ["decompress vmlinuz to vmlinux"]
    else:
        with pytest.raises(SandportError, match=message):
            kernel.decompress_vmlinuz(vmlinuz, dest, lambda _s, _f: None)


def test_kernel_package_file_name_escapes_an_epoch() -> None:
    assert kernel.KernelPackage(name="linux-image-6.1.0-9-amd64", version="1:6.1.27-1"
                                ).file_name == "linux-image-6.1.0-9-amd64_1%3a6.1.27-1"
