"""Pool, store, tokens, state table, config: pure logic with a real SQLite file."""

from __future__ import annotations

import ipaddress
import itertools
import sqlite3
from pathlib import Path

import pytest

from sandport.config import GatewayConfig, NetConfig, connect_host, parse_hostport
from sandport.control.secretbox import DecryptError, SecretBox, SecretKeyError, load_or_create_key
from sandport.control.store import (
    MIGRATIONS,
    CredentialRecord,
    ForwardRecord,
    GrantRecord,
    SessionRecord,
)
from sandport.control.store import SqliteStore as Store
from sandport.control.tokens import TokenCheck, check_token, hash_token, new_token
from sandport.errors import UsageError
from sandport.net.pool import AddressPool, PoolExhausted
from sandport.sandbox.profiles import colour_hex, desktop_colour, get_profile
from sandport.sandbox.state import (
    TRANSITIONS,
    IllegalTransition,
    SandboxState,
    SessionState,
    check_session_transition,
    check_transition,
)

pytestmark = pytest.mark.unit


def test_pool_hands_out_round_robin_and_never_an_address_in_use(tmp_path: Path) -> None:
    subnet = ipaddress.IPv4Network("10.201.7.0/29")  # gateway .1, sandboxes .2 - .6
    store = Store(tmp_path / "db")
    pool = AddressPool(subnet, store)
    assert pool.size == 5
    a, b = pool.lease("a"), pool.lease("b")
    assert (str(a), str(b)) == ("10.201.7.2", "10.201.7.3")
    pool.release(a)
    # A freed address is the last to come back: the cursor moves on.
    assert str(pool.lease("c")) == "10.201.7.4"
    store.close()
    # A restart (new Store on the same file) keeps leases and cursor.
    store = Store(tmp_path / "db")
    pool = AddressPool(subnet, store)
    assert store.leased_addresses() == {"10.201.7.3", "10.201.7.4"}
    got = [str(pool.lease(x)) for x in "def"]
    assert got == ["10.201.7.5", "10.201.7.6", "10.201.7.2"]  # wraps, skipping .3 and .4
    assert "10.201.7.3" not in got and "10.201.7.4" not in got
    with pytest.raises(PoolExhausted, match="all 5 addresses"):
        pool.lease("g")
    store.close()


def test_pool_never_leases_network_gateway_or_broadcast(tmp_path: Path) -> None:
    subnet = ipaddress.IPv4Network("10.201.8.0/29")
    store = Store(tmp_path / "db")
    pool = AddressPool(subnet, store)
    got = {str(pool.lease(str(i))) for i in range(pool.size)}
    assert got == {f"10.201.8.{i}" for i in range(2, 7)}
    store.close()


def test_double_lease_of_one_address_is_refused(tmp_path: Path) -> None:
    store = Store(tmp_path / "db")
    store.add_lease("10.201.9.2", "a", "10.201.9.2")
    with pytest.raises(KeyError):
        store.add_lease("10.201.9.2", "b", "10.201.9.2")
    store.close()


def test_store_migrates_records_and_removes_with_lease(tmp_path: Path) -> None:
    store = Store(tmp_path / "db")
    assert sqlite3.connect(tmp_path / "db").execute("PRAGMA user_version").fetchone()[0] == len(
        MIGRATIONS
    )
    assert sqlite3.connect(tmp_path / "db").execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    store.add_lease("10.201.9.2", "abc123", "10.201.9.2")
    store.add_sandbox(sandbox_id="abc123", backend="netns", profile="desktop", state="creating",
                      ip="10.201.9.2", prefixlen=24, bridge="sp-x", token_hash="h")
    store.set_state("abc123", "failed", reason="Xvnc exited")
    (rec,) = store.sandboxes()
    assert (rec.state, rec.reason, rec.ip) == ("failed", "Xvnc exited", "10.201.9.2")
    store.remove_sandbox("abc123")
    assert store.sandboxes() == [] and store.leased_addresses() == set()
    store.close()


def test_store_refuses_a_newer_schema(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / "db")
    db.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    db.close()
    with pytest.raises(RuntimeError, match="newer than this sandport"):
        Store(tmp_path / "db")


@pytest.mark.parametrize(
    ("presented", "expected"),
    [(None, TokenCheck.MISSING), ("", TokenCheck.MISSING), ("wrong", TokenCheck.INVALID),
     ("x" * 10_000, TokenCheck.INVALID)],
)
def test_token_checks(presented: str | None, expected: TokenCheck) -> None:
    token = new_token()
    assert check_token(presented, hash_token(token)) is expected
    assert check_token(token, hash_token(token)) is TokenCheck.OK
    assert expected.value in (401, 403)


def test_tokens_are_random_and_stored_hashed() -> None:
    tokens = {new_token() for _ in range(100)}
    assert len(tokens) == 100 and all(len(t) >= 32 for t in tokens)
    t = tokens.pop()
    assert t not in hash_token(t) and len(hash_token(t)) == 64


def test_state_table_allows_the_lifecycle_and_refuses_the_rest() -> None:
    s = SandboxState
    path = [s.CREATING, s.STARTING, s.READY, s.DEGRADED, s.READY, s.STOPPING, s.STOPPED]
    for a, b in itertools.pairwise(path):
        assert check_transition(a, b) is b
    for state in s:
        if state is not s.STOPPED:
            assert s.FAILED in TRANSITIONS[state] or state is s.FAILED
    with pytest.raises(IllegalTransition, match="from stopped to ready"):
        check_transition(s.STOPPED, s.READY)
    with pytest.raises(IllegalTransition):
        check_transition(s.CREATING, s.READY)  # readiness must be proven while starting


@pytest.mark.parametrize(
    ("text", "expected"),
    [("127.0.0.1:8700", ("127.0.0.1", 8700)), ("8700", ("127.0.0.1", 8700)),
     ("[::1]:80", ("::1", 80)), ("0.0.0.0:0", ("0.0.0.0", 0))],
)
def test_parse_hostport(text: str, expected: tuple[str, int]) -> None:
    assert parse_hostport(text) == expected


@pytest.mark.parametrize("text", ["localhost:80", "1.2.3.4:x", "1.2.3.4:65536", ":", "a:b:c"])
def test_parse_hostport_rejects(text: str) -> None:
    with pytest.raises(UsageError):
        parse_hostport(text)


def test_net_config_checks_names_and_sizes() -> None:
    with pytest.raises(UsageError, match="start with 'sp-'"):
        NetConfig(bridge="br0")
    with pytest.raises(UsageError, match="at most 15"):
        NetConfig(bridge="sp-" + "x" * 13)
    with pytest.raises(UsageError, match="between /16 and /29"):
        NetConfig(subnet=ipaddress.IPv4Network("10.201.0.0/30"))
    assert str(NetConfig().gateway_ip) == "10.201.0.1"
    assert GatewayConfig(listen_host="0.0.0.0").url_host == "127.0.0.1"
    assert GatewayConfig(listen_host="::").url_host == "[::1]"
    assert GatewayConfig(listen_host="10.9.8.7", public_host="sb.example").url_host == "sb.example"
    assert connect_host("0.0.0.0") == "127.0.0.1" and connect_host("10.1.2.3") == "10.1.2.3"


def test_desktop_colour_is_stable_distinct_and_never_dark() -> None:
    assert desktop_colour("abc123") == desktop_colour("abc123")
    colours = {desktop_colour(f"{i:06x}") for i in range(200)}
    assert len(colours) > 150
    for r, g, b in colours:
        assert max(r, g, b) >= 200  # value 0.8: bright enough to tell from black
    assert colour_hex((30, 144, 255)) == "#1e90ff"


def test_unknown_profile_lists_the_known_ones() -> None:
    with pytest.raises(UsageError, match="known profiles: desktop"):
        get_profile("nope")


# Written out here, independently of TRANSITIONS: the lifecycle as the docs draw it.
LEGAL = {
    ("creating", "starting"), ("creating", "stopping"), ("creating", "failed"),
    ("starting", "ready"), ("starting", "stopping"), ("starting", "failed"),
    ("ready", "degraded"), ("ready", "stopping"), ("ready", "failed"),
    ("degraded", "ready"), ("degraded", "stopping"), ("degraded", "failed"),
    ("failed", "stopping"),
    ("stopping", "stopped"), ("stopping", "failed"),
}


@pytest.mark.parametrize("current", list(SandboxState), ids=str)
@pytest.mark.parametrize("new", list(SandboxState), ids=str)
def test_every_transition_is_legal_or_refused(current: SandboxState,
                                              new: SandboxState) -> None:
    if (current.value, new.value) in LEGAL:
        assert check_transition(current, new) is new
    else:
        with pytest.raises(IllegalTransition, match=f"from {current.value} to {new.value}"):
            check_transition(current, new)


SESSION_LEGAL = {
    ("waiting", "ready"), ("waiting", "completed"), ("waiting", "expired"),
    ("waiting", "cancelled"),
    ("ready", "completed"), ("ready", "expired"), ("ready", "cancelled"),
}


@pytest.mark.parametrize("current", list(SessionState), ids=str)
@pytest.mark.parametrize("new", list(SessionState), ids=str)
def test_every_session_transition_is_legal_or_refused(current: SessionState,
                                                      new: SessionState) -> None:
    if (current.value, new.value) in SESSION_LEGAL:
        assert check_session_transition(current, new) is new
    else:
        with pytest.raises(IllegalTransition, match=f"from {current.value} to {new.value}"):
            check_session_transition(current, new)
    assert current.final == (current.value in ("completed", "expired", "cancelled"))


def test_secretbox_seals_binds_to_context_and_refuses_another_key(tmp_path: Path) -> None:
    key_file = tmp_path / "secret.key"
    key = load_or_create_key(key_file)
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert load_or_create_key(key_file) == key  # the same at the next start
    box = SecretBox(key)
    sealed = box.seal(b"hunter2", "credentials/c1")
    assert b"hunter2" not in sealed.encode() and sealed.startswith("v1:")
    assert box.open(sealed, "credentials/c1") == b"hunter2"
    assert box.seal(b"hunter2", "credentials/c1") != sealed  # a fresh nonce every time
    with pytest.raises(DecryptError, match="credentials/c2"):
        box.open(sealed, "credentials/c2")  # moved to another row
    with pytest.raises(DecryptError, match="secret key"):
        SecretBox(bytes(32)).open(sealed, "credentials/c1")
    with pytest.raises(DecryptError):
        box.open(sealed[:-4] + "AAAA", "credentials/c1")
    (tmp_path / "bad.key").write_text("not hex\n")
    with pytest.raises(SecretKeyError, match="64 hex digits"):
        load_or_create_key(tmp_path / "bad.key")
    with pytest.raises(SecretKeyError, match="does not exist"):
        load_or_create_key(tmp_path / "missing.key", create=False)


def test_store_v1_database_migrates_to_the_current_schema(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / "db")
    db.executescript(MIGRATIONS[0])
    db.execute("INSERT INTO sandboxes (id, backend, profile, state, ip, prefixlen, bridge,"
               " token_hash, created_at, updated_at) VALUES"
               " ('old1','netns','desktop','ready','10.201.9.2',24,'sp-x','h',1,1)")
    db.execute("PRAGMA user_version = 1")
    db.commit()
    db.close()
    store = Store(tmp_path / "db")
    (rec,) = store.sandboxes()
    assert (rec.id, rec.state, rec.agent_token_hash, rec.secrets) == ("old1", "ready", "", "")
    assert store.forwards("old1") == [] and store.sessions("old1") == []
    store.close()


def test_store_keeps_forwards_grants_sessions_credentials_and_events(tmp_path: Path) -> None:
    store = Store(tmp_path / "db")
    store.add_sandbox(sandbox_id="s1", backend="netns", profile="desktop", state="creating",
                      ip="10.201.9.2", prefixlen=24, bridge="sp-x", token_hash="h",
                      agent_token_hash="ah", secrets="v1:x",
                      event=("sandbox.state", {"state": "creating"}))
    store.add_forward(ForwardRecord(id="f1", sandbox_id="s1", name="vnc", host_ip="127.0.0.1",
                                    host_port=15900, guest_port=5900, protocol="tcp",
                                    options={"mode": "auto"}))
    store.add_grant(GrantRecord(id="g1", sandbox_id="s1", token_hash="gh", expires_at=9e9,
                                scope={"ports": ["vnc"]}, created_at=1.0))
    store.add_session(SessionRecord(id="w1", sandbox_id="s1", state="waiting", reason="",
                                    credential_id=None, expires_at=9e9, created_at=1.0,
                                    updated_at=1.0), event=("session.state", {"id": "w1"}))
    (seq,) = store.add_credentials(
        CredentialRecord(id="c1", sandbox_id="s1", session_id="w1", sealed="v1:y",
                         created_at=2.0),
        session_state="completed", events=[("credentials.received", {"id": "c1"})])
    session = store.session("w1")
    assert session is not None and (session.state, session.credential_id) == ("completed", "c1")
    assert [f.options for f in store.forwards("s1")] == [{"mode": "auto"}]
    assert [g.scope for g in store.grants("s1")] == [{"ports": ["vnc"]}]
    kinds = [e.kind for e in store.events()]
    assert kinds == ["sandbox.state", "session.state", "credentials.received"]
    assert seq == store.events()[-1].seq and store.events(after=seq) == []
    # Removing the sandbox removes what hangs on it; the event log stays.
    store.remove_sandbox("s1")
    assert (store.forwards("s1"), store.grants("s1"), store.sessions("s1"),
            store.credentials("s1")) == ([], [], [], [])
    assert len(store.events(sandbox_id="s1")) == 3
    store.close()
