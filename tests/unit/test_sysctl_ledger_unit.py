"""The host settings ledger (sandport.net.sysctl) and what kernel forwards ask of it.

The ledger runs on a stand-in kernel: ``/proc/sys`` is a directory of the test and the
interfaces are a table of names and indexes (the real thing is
tests/integration/test_sysctl_ledger.py).
"""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from sandport.net import nft, sysctl


class Kernel:
    """What the ledger reads and writes: /proc/sys values and interface indexes."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.links: dict[str, int] = {}

    def link(self, name: str, index: int, **values: str) -> None:
        self.links[name] = index
        for key in sysctl.KEYS:
            path = self.root / sysctl.conf(name, key)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(values.get(key, "0") + "\n")

    def unlink(self, name: str) -> None:
        del self.links[name]
        for key in sysctl.KEYS:
            (self.root / sysctl.conf(name, key)).unlink()

    def get(self, name: str, key: str = "forwarding") -> str:
        return (self.root / sysctl.conf(name, key)).read_text().strip()

    def set(self, name: str, value: str, key: str = "forwarding") -> None:
        (self.root / sysctl.conf(name, key)).write_text(value)


@pytest.fixture
def kernel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Kernel:
    k = Kernel(tmp_path / "proc-sys")
    monkeypatch.setattr(sysctl, "PROC_SYS", k.root)
    monkeypatch.setattr(sysctl, "ifindex", lambda name: k.links.get(name, 0))
    k.link("sp-br", 7)  # the owner's bridge
    k.link("eth0", 2)
    return k


def want(ifname: str, key: str = "forwarding", why: str = "a test") -> sysctl.Setting:
    return sysctl.Setting(path=sysctl.conf(ifname, key), value="1", why=why)


def ledger_doc(directory: Path) -> dict[str, object]:
    return dict(json.loads((directory / sysctl.LEDGER_FILE).read_text()))


def test_a_change_is_recorded_with_its_value_before_and_given_back(
        kernel: Kernel, tmp_path: Path) -> None:
    run = tmp_path / "run"
    ledger = sysctl.Ledger("sp-br", run)
    ledger.take([want("eth0")])
    assert kernel.get("eth0") == "1"
    [change] = ledger_doc(run)["changes"]  # type: ignore[misc]
    assert change == {"path": "net/ipv4/conf/eth0/forwarding", "before": "0", "value": "1",
                      "ifindex": 2, "netns": sysctl.netns(), "owners": {"sp-br": "a test"}}
    assert stat.S_IMODE((run / sysctl.LEDGER_FILE).stat().st_mode) == 0o600
    ledger.take([want("eth0")])  # again: nothing new
    assert len(ledger.changes()) == 1
    ledger.give_back()
    assert kernel.get("eth0") == "0"
    assert not (run / sysctl.LEDGER_FILE).exists()


def test_the_next_process_gives_back_what_a_killed_one_recorded(
        kernel: Kernel, tmp_path: Path) -> None:
    sysctl.Ledger("sp-br", tmp_path).take([want("eth0"), want("sp-br", "route_localnet")])
    # A new gateway process on the same bridge: the first apply keeps what it needs.
    after_restart = sysctl.Ledger("sp-br", tmp_path)
    after_restart.give_back(keep={sysctl.conf("sp-br", "route_localnet")})
    assert kernel.get("eth0") == "0"
    assert kernel.get("sp-br", "route_localnet") == "1"
    assert list(after_restart.held()) == [sysctl.conf("sp-br", "route_localnet")]


def test_a_value_two_gateways_need_goes_back_when_the_last_lets_go(
        kernel: Kernel, tmp_path: Path) -> None:
    kernel.link("sp-other", 8)
    first, second = sysctl.Ledger("sp-br", tmp_path), sysctl.Ledger("sp-other", tmp_path)
    first.take([want("eth0")])
    second.take([want("eth0")])  # already 1, but by sandport: the second holds it too
    first.give_back()
    assert kernel.get("eth0") == "1"
    second.give_back()
    assert kernel.get("eth0") == "0"


def test_a_value_that_was_already_set_is_not_ours_to_give_back(
        kernel: Kernel, tmp_path: Path) -> None:
    kernel.set("eth0", "1")
    ledger = sysctl.Ledger("sp-br", tmp_path)
    ledger.take([want("eth0")])
    assert ledger.changes() == []
    ledger.give_back()
    assert kernel.get("eth0") == "1"


def test_a_value_someone_changed_since_is_left_as_they_set_it(
        kernel: Kernel, tmp_path: Path) -> None:
    ledger = sysctl.Ledger("sp-br", tmp_path)
    ledger.take([want("eth0")])
    kernel.set("eth0", "2")  # not the value sandport wrote
    ledger.give_back()
    assert kernel.get("eth0") == "2"
    assert ledger.changes() == []


def test_a_replaced_or_vanished_interface_gets_nothing_written(
        kernel: Kernel, tmp_path: Path) -> None:
    kernel.link("sp-tap", 11)
    ledger = sysctl.Ledger("sp-br", tmp_path)
    ledger.take([want("eth0"), want("sp-tap")])
    kernel.link("eth0", 12, forwarding="1")  # another interface under the same name
    kernel.unlink("sp-tap")
    assert ledger.changes() == []
    ledger.give_back()
    assert kernel.get("eth0") == "1"


def test_a_change_whose_owners_bridge_is_gone_is_given_back(
        kernel: Kernel, tmp_path: Path) -> None:
    sysctl.Ledger("sp-br", tmp_path).take([want("eth0")])
    del kernel.links["sp-br"]  # whatever deleted the bridge ended its kernel forwards
    assert sysctl.Ledger("sp-other", tmp_path).changes() == []
    assert kernel.get("eth0") == "0"


def test_changes_of_other_network_namespaces_are_kept_untouched(
        kernel: Kernel, tmp_path: Path) -> None:
    elsewhere = {"path": "net/ipv4/conf/eth0/forwarding", "before": "0", "value": "1",
                 "ifindex": 99, "netns": 1, "owners": {"sp-gone": "another namespace"}}
    (tmp_path / sysctl.LEDGER_FILE).write_text(json.dumps(
        {"version": sysctl.VERSION, "changes": [elsewhere]}))
    ledger = sysctl.Ledger("sp-br", tmp_path)
    ledger.take([want("eth0")])
    ledger.give_back()
    assert kernel.get("eth0") == "0"
    assert ledger_doc(tmp_path)["changes"] == [elsewhere]


@pytest.mark.parametrize("path", [
    "net/ipv4/ip_forward", "net/ipv4/conf/all/forwarding", "net/ipv4/conf/default/forwarding",
    "net/ipv4/conf/eth0/rp_filter", "net/ipv4/conf/../forwarding", "kernel/core_pattern",
    "net/ipv4/conf/a-name-too-long-for-linux/forwarding",
])
def test_only_an_interfaces_forwarding_and_route_localnet_can_be_recorded(path: str) -> None:
    with pytest.raises(ValueError):
        sysctl.Setting(path=path, value="1", why="no")


def test_a_ledger_that_does_not_parse_is_set_aside_and_never_written_from(
        kernel: Kernel, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    forged = {"path": "net/ipv4/conf/all/forwarding", "before": "1", "value": "0",
              "ifindex": 0, "netns": sysctl.netns(), "owners": {"sp-br": "forged"}}
    (tmp_path / sysctl.LEDGER_FILE).write_text(json.dumps(
        {"version": sysctl.VERSION, "changes": [forged]}))
    assert sysctl.Ledger("sp-br", tmp_path).changes() == []
    assert (tmp_path / f"{sysctl.LEDGER_FILE}.bad").exists()
    assert "unreadable" in caplog.text


def rule(host_ip: str, egress: str = "") -> nft.DnatRule:
    return nft.DnatRule(host_ip=host_ip, host_port=1, guest_ip="10.201.0.2", guest_port=1,
                        egress=egress)


def test_a_wildcard_forward_arrives_on_addressed_links_but_not_other_programs_networks() -> None:
    ifaces = {"lo": ["127.0.0.1"], "eth0": ["192.0.2.5"], "docker0": ["172.17.0.1"],
              "sp-br0": ["10.201.0.1"], "vnet0": ["192.168.5.1"]}
    others = {"lo": "loopback", "docker0": "a bridge", "sp-br0": "a bridge", "vnet0": "a TAP"}
    assert nft.ingress_interfaces([rule("0.0.0.0")], ifaces, others) == ["eth0"]
    # An address a user names is theirs to choose, even on another program's bridge.
    assert nft.ingress_interfaces([rule("172.17.0.1")], ifaces, others) == ["docker0"]
    assert nft.ingress_interfaces([rule("127.0.0.1")], ifaces, others) == []


def test_what_kernel_forwards_need_and_why() -> None:
    def settings(rules: list[nft.DnatRule], ingress: tuple[str, ...] = ()) -> list[str]:
        return [s.path.removeprefix("net/ipv4/conf/")
                for s in nft.host_settings("sp-br0", rules, ingress)]

    assert settings([]) == []
    assert settings([rule("127.0.0.1")]) == ["sp-br0/route_localnet"]
    assert settings([rule("192.0.2.5")], ("eth0",)) == ["sp-br0/forwarding", "eth0/forwarding"]
    assert settings([rule("0.0.0.0")], ("eth0",)) == [
        "sp-br0/route_localnet", "sp-br0/forwarding", "eth0/forwarding"]
    assert settings([rule("127.0.0.1", egress="sp-ab12-h")]) == ["sp-ab12-h/route_localnet"]
    [why] = [s.why for s in nft.host_settings("sp-br0", [rule("0.0.0.0")], ("eth0",))
             if s.path.endswith("eth0/forwarding")]
    assert why == "kernel forwards of sp-br0: remote clients arrive on eth0"
