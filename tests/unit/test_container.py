"""The container config of a netns sandbox's guests (issue 16, point 1), and the preflight
that names crun."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from sandport import preflight
from sandport.config import GatewayConfig
from sandport.errors import MissingPackage, UsageError
from sandport.sandbox import container


def config() -> dict[str, object]:
    return container.bundle_config(
        rootfs="/run/sandport/rootfs", netns_path="/run/netns/sp-abc", tmpdir="/s/tmp",
        guest_files="/s/guest", ids=container.IdRange(slot=3), hostname="sp-abc",
        init_argv=["/usr/bin/python3"], lib_dirs=("lib64",))


def test_namespaces_and_an_unprivileged_mapping() -> None:
    linux = config()["linux"]
    assert isinstance(linux, dict)
    kinds = {ns["type"]: ns.get("path") for ns in linux["namespaces"]}
    assert kinds == {"user": None, "pid": None, "ipc": None, "uts": None, "mount": None,
                     "network": "/run/netns/sp-abc"}
    base = container.ID_BASE + 3 * container.ID_SIZE
    assert linux["uidMappings"] == linux["gidMappings"] == [
        {"containerID": 0, "hostID": base, "size": container.ID_SIZE}]
    # slots never overlap, and all stay below 2**31
    assert container.IdRange(slot=4).host_base == base + container.ID_SIZE
    assert container.IdRange(slot=container.ID_SLOTS - 1).host_base + container.ID_SIZE \
        <= 2**31


def test_no_capabilities_no_new_privs_and_a_seccomp_deny_list() -> None:
    doc = config()
    process = doc["process"]
    assert isinstance(process, dict)
    assert process["noNewPrivileges"] is True
    assert all(v == [] for v in process["capabilities"].values())
    linux = doc["linux"]
    assert isinstance(linux, dict)
    seccomp = linux["seccomp"]
    denied = {n for rule in seccomp["syscalls"] for n in rule["names"]}
    for name in ("mount", "umount2", "pivot_root", "ptrace", "kexec_load", "init_module",
                 "bpf", "perf_event_open", "keyctl", "add_key", "request_key", "userfaultfd",
                 "process_vm_readv", "process_vm_writev", "open_by_handle_at", "swapon",
                 "reboot", "acct", "setns", "unshare", "clock_settime", "settimeofday"):
        assert name in denied, name
    assert seccomp["architectures"] == ["SCMP_ARCH_X86_64"]


def test_the_file_system_view_holds_no_host_secrets() -> None:
    doc = config()
    mounts = {m["destination"]: m for m in doc["mounts"]}  # type: ignore[attr-defined]
    assert set(mounts) == {"/proc", "/dev", "/dev/pts", "/dev/shm", "/usr", "/etc", "/lib64",
                           "/tmp", "/var/tmp", container.GUEST_FILES}
    assert mounts["/tmp"]["source"] == "/s/tmp" and "rw" in mounts["/tmp"]["options"]
    for ro in ("/usr", "/etc", "/lib64", container.GUEST_FILES):
        assert "ro" in mounts[ro]["options"], ro
    assert doc["root"] == {"path": "/run/sandport/rootfs", "readonly": True}
    linux = doc["linux"]
    assert isinstance(linux, dict)
    assert {"/etc/shadow", "/etc/gshadow", "/etc/ssh"} <= set(linux["maskedPaths"])


def test_host_root_is_a_loud_opt_in_only() -> None:
    assert GatewayConfig().guest_privileges == "unprivileged"
    assert GatewayConfig(guest_privileges="host-root-UNSAFE").guest_privileges
    with pytest.raises(UsageError, match="host-root-UNSAFE"):
        GatewayConfig(guest_privileges="root")


def test_preflight_names_crun_and_its_package(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("Xvnc", "openbox", "xsetroot", "xmessage"):  # everything but crun
        (tmp_path / name).symlink_to(shutil.which(name) or "/bin/true")
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(MissingPackage) as missing:
        preflight.require_programs()
    assert "crun" in str(missing.value) and "apt-get install crun" in missing.value.hint
    assert os.environ["PATH"] == str(tmp_path)
