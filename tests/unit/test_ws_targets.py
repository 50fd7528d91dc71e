"""Targets and tokens of the WebSocket bridge: websockify's formats, edge by edge."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from sandport.bridge.standalone import WsOptions, build_config, parse_source
from sandport.bridge.targets import (
    Target,
    TokenFile,
    UnixDomainSocketDirectory,
    load_plugin,
    parse_target,
    token_from,
)
from sandport.errors import UsageError

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("text", "target"),
    [
        ("localhost:5900", Target(host="localhost", port=5900)),
        ("10.201.0.2:5901", Target(host="10.201.0.2", port=5901)),
        ("[::1]:5900", Target(host="::1", port=5900)),
        ("unix_socket:/run/vnc.sock", Target(path="/run/vnc.sock")),
    ],
)
def test_targets(text: str, target: Target) -> None:
    assert parse_target(text) == target
    assert parse_target(str(target)) == target


@pytest.mark.parametrize("text", ["localhost", ":5900", "host:0", "host:65536", "host:vnc",
                                  "unix_socket:", "", "host:\u00b2", "host:\u0663"])
def test_bad_targets(text: str) -> None:
    with pytest.raises(UsageError, match=r"HOST:PORT|no socket path"):
        parse_target(text)


@pytest.mark.parametrize(
    ("path", "host", "host_token", "token"),
    [
        ("/websockify?token=abc", None, False, "abc"),
        ("/?token=abc&x=1", None, False, "abc"),
        ("/?token=abc%0A", None, False, "abc"),  # websockify strips a trailing newline
        ("/websockify/abc", None, False, "abc"),
        ("/abc/", None, False, "abc"),
        ("/a%20b", None, False, "a b"),
        ("/websockify", None, False, None),
        ("/", None, False, None),
        ("/?token=", None, False, None),
        ("/?token=abc", "sb1.example:443", True, "sb1.example"),
        ("/", "[::1]:6080", True, "::1"),
        ("/", None, True, None),
    ],
)
def test_token_from(path: str, host: str | None, host_token: bool, token: str | None) -> None:
    assert token_from(path, host, host_token=host_token) == token


def test_token_file_skips_bad_lines_and_sees_edits(tmp_path: Path) -> None:
    f = tmp_path / "tokens"
    f.write_text("# comment\n\nok: 10.0.0.1:5900\nbroken\nbad: host:99999\n"
                 "  spaced:   10.0.0.2:1  \nsock: unix_socket:/run/a.sock\n")
    plugin = TokenFile(f)
    assert plugin.lookup("ok") == Target(host="10.0.0.1", port=5900)
    assert plugin.lookup("spaced") == Target(host="10.0.0.2", port=1)
    assert plugin.lookup("sock") == Target(path="/run/a.sock")
    assert plugin.lookup("broken") is None
    assert plugin.lookup("bad") is None
    assert plugin.loads == 1
    plugin.lookup("ok")
    assert plugin.loads == 1  # unchanged: not re-read
    f.write_text("ok: 10.0.0.9:5900\n")
    assert plugin.lookup("ok") == Target(host="10.0.0.9", port=5900)
    assert plugin.lookup("sock") is None


def test_unix_socket_directory_stays_inside(tmp_path: Path) -> None:
    (tmp_path / "socks").mkdir()
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(tmp_path / "socks" / "vm1"))
        (tmp_path / "socks" / "file").write_text("")
        plugin = UnixDomainSocketDirectory(tmp_path / "socks")
        assert plugin.lookup("vm1") == Target(path=str(tmp_path / "socks" / "vm1"))
        assert plugin.lookup("file") is None  # not a socket
        assert plugin.lookup("../socks/vm1") == Target(path=str(tmp_path / "socks" / "vm1"))
        assert plugin.lookup("../x") is None
        assert plugin.lookup("missing") is None


def test_plugins_by_websockify_names(tmp_path: Path) -> None:
    (tmp_path / "t").write_text("a: h:1\n")
    for name in ("TokenFile", "ReadOnlyTokenFile", "websockify.token_plugins.TokenFile"):
        assert load_plugin(name, str(tmp_path / "t")).lookup("a") == Target(host="h", port=1)
    with pytest.raises(UsageError, match="needs --token-source"):
        load_plugin("TokenFile", None)
    with pytest.raises(UsageError, match=r"TokenRedis.*not supported"):
        load_plugin("TokenRedis", "x")


@pytest.mark.parametrize(
    ("text", "ipv6", "expected"),
    [
        ("6080", False, ("0.0.0.0", 6080)),
        ("6080", True, ("::", 6080)),
        ("127.0.0.1:6080", False, ("127.0.0.1", 6080)),
        ("localhost:6080", False, ("127.0.0.1", 6080)),
        ("[::1]:6080", False, ("::1", 6080)),
        (":6080", False, ("0.0.0.0", 6080)),
    ],
)
def test_sources(text: str, ipv6: bool, expected: tuple[str, int]) -> None:
    assert parse_source(text, prefer_ipv6=ipv6) == expected


@pytest.mark.parametrize("text", ["\u00b2", "127.0.0.1:\u00b2\u00b3"])
def test_sources_of_unicode_digits_are_usage_errors(text: str) -> None:
    """'²'.isdigit() is true, int('²') fails: a UsageError, not a ValueError."""
    with pytest.raises(UsageError, match="is not"):
        parse_source(text)


def test_a_large_token_file_keeps_the_old_table_when_over_the_cap_or_unreadable(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from sandport.bridge import targets

    f = tmp_path / "tokens"
    f.write_text("ok: 10.0.0.1:5900\n")
    plugin = TokenFile(f)
    monkeypatch.setattr(targets, "MAX_TOKEN_FILE_BYTES", 30)
    f.write_text("ok: 10.0.0.2:5900\nnew: 10.0.0.3:1\n")
    assert plugin.lookup("ok") == Target(host="10.0.0.1", port=5900)  # the old table
    assert plugin.lookup("new") is None
    monkeypatch.setattr(targets, "MAX_TOKEN_FILE_BYTES", 1 << 20)
    f.unlink()
    assert plugin.lookup("ok") == Target(host="10.0.0.1", port=5900)  # gone: kept
    f.write_text("new: 10.0.0.3:1\n")
    assert plugin.lookup("new") == Target(host="10.0.0.3", port=1)
    assert plugin.lookup("ok") is None


def test_options_map_onto_the_config(tmp_path: Path) -> None:
    cfg = build_config(WsOptions(source="127.0.0.1:0", target="localhost:5900",
                                 origins=("https://a",), trusted_proxies=("10.0.0.0/8",),
                                 max_per_client=3, heartbeat=20))
    assert cfg.target == Target(host="localhost", port=5900)
    assert cfg.tls is None and cfg.tokens is None
    assert (cfg.origins, str(cfg.trusted_proxies[0])) == (("https://a",), "10.0.0.0/8")
    assert (cfg.limits.max_per_client, cfg.limits.heartbeat) == (3, 20)
    with pytest.raises(UsageError, match="--host-token needs a token plugin"):
        build_config(WsOptions(source="1", target="h:1", host_token=True))
    with pytest.raises(UsageError, match="exactly one"):
        build_config(WsOptions(source="1", target="h:1", unix_target="/s"))
