"""What a person sees in a terminal 80 columns wide (issue 17, point 6).

A real gateway (`sandport up --demo` as a subprocess) runs a desktop sandbox and fronts
an attached target without VNC (the hand-made namespace, spoken to as plain TCP). Each
list command runs as a subprocess the ways a person runs it: stdout a pipe with
COLUMNS=80, and a terminal (a pty sized 80x24, no COLUMNS); then with --wide and --json.
`sandport up` runs in a pty too: the ready block, not the gateway's INFO log, which goes
to the log file. Every capture is saved as a text file in the test's tmp_path (where the
browser tests save their screenshots) and named in the output (-s).
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import signal
import struct
import subprocess
import termios
import time
from pathlib import Path
from typing import Any

import pytest

from attachhelpers import HandMade, hand_made  # noqa: F401 - a fixture
from conftest import remove_gateway_leftovers, test_net_names
from uphelpers import SANDPORT, up_factory  # noqa: F401 - a fixture

pytestmark = pytest.mark.integration

WIDTH = 80
#: What a terminal acts on in the output: a control sequence, a carriage return, a newline.
CONTROL = re.compile(r"(\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07|\r|\n)")
#: A line the gateway logs at INFO, as the terminal handler (rich or plain) shows it.
INFO_LINE = re.compile(r"^(?:\d\d:\d\d:\d\d )?\s*INFO\b", re.MULTILINE)


def _screen(raw: str) -> str:
    """What a terminal shows after ``raw``: text written over at the cursor, \\r and
    \\n moving it, a spinner's redraws (cursor up, erase line) applied; colours and
    other sequences dropped."""
    lines, row, col = [""], 0, 0
    for token in CONTROL.split(raw):
        if token == "\r":
            col = 0
        elif token == "\n":
            row += 1
            if row == len(lines):
                lines.append("")
        elif token.startswith("\x1b["):
            if token.endswith("A"):  # cursor up
                row = max(0, row - int(token[2:-1] or 1))
            elif token == "\x1b[2K":  # erase the line
                lines[row] = ""
            elif token in ("\x1b[K", "\x1b[0K"):  # erase to its end
                lines[row] = lines[row][:col]
        elif token and not token.startswith("\x1b"):
            line = lines[row].ljust(col)
            lines[row] = line[:col] + token + line[col + len(token):]
            col += len(token)
    return "\n".join(line.rstrip() for line in lines).strip("\n") + "\n"


def _in_pty(argv: list[str], *, until: str = "", stop_after: float = 0.0,
            timeout: float = 90.0) -> tuple[int, str]:
    """Run ``argv`` with stdin, stdout and stderr on a pty 80x24 (no COLUMNS in its
    environment), as in a person's terminal; with ``until``, SIGINT it ``stop_after``
    seconds after that text appeared. Its exit status and everything it wrote."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, WIDTH, 0, 0))
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    env["TERM"] = "xterm-256color"
    proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env,
                            start_new_session=True)
    os.close(slave)
    seen, stop_at = b"", 0.0
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: every writer closed the pty
                    chunk = b""
                if not chunk:
                    break
                seen += chunk
            if until and not stop_at and until.encode() in seen:
                stop_at = time.monotonic() + stop_after
            if stop_at and time.monotonic() >= stop_at and proc.poll() is None:
                proc.send_signal(signal.SIGINT)
                stop_at = float("inf")
        else:
            raise AssertionError(f"{argv[2:4]} did not end in {timeout} s:\n"
                                 f"{_screen(seen.decode(errors='replace'))}")
        return proc.wait(timeout=60), _screen(seen.decode(errors="replace"))
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _piped(argv: list[str]) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` with stdout and stderr pipes and COLUMNS=80."""
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False,
                          env={**os.environ, "COLUMNS": str(WIDTH)})


def _save(tmp_path: Path, name: str, text: str) -> None:
    path = tmp_path / f"{name}.txt"
    path.write_text(text)
    print(f"terminal capture: {path}")


def _check_fits(text: str, what: str) -> None:
    for line in text.splitlines():
        assert len(line) <= WIDTH, f"{what}: a line of {len(line)} columns:\n{text}"


def test_lists_fit_80_columns_and_say_what_each_column_is(
        up_factory: Any, hand_made: HandMade, tmp_path: Path) -> None:
    up = up_factory("--demo", "--attach-subnet", str(hand_made.network))
    ready = up.wait_ready()
    state = ["--state-dir", str(up.state_dir)]
    # A target without VNC: the hand-made guest spoken to as plain TCP on its port 5901.
    attached = _piped([*SANDPORT, "attach", "plain-tcp", "--ip", hand_made.ip,
                       "--profile", "tcp", "--port", "5901", *state])
    assert attached.returncode == 0, attached.stderr
    target = json.loads(attached.stdout)
    made = _piped([*SANDPORT, "token", "create", ready["id"], "--ttl", "600", "--port", "vnc",
                   "--kind", "ws", *state])
    assert made.returncode == 0, made.stderr
    lists = {"forward-list": ["forward", "list"], "sandbox-list": ["sandbox", "list"],
             "token-list": ["token", "list", ready["id"]]}
    headers = {"forward-list": ("SANDBOX", "NAME", "HOST", "MODE"),
               "sandbox-list": ("ID", "STATE", "IP", "VNC"),
               "token-list": ("ID", "STATE", "EXPIRES", "PORTS", "KINDS")}
    for name, args in lists.items():
        piped = _piped([*SANDPORT, *args, *state])
        assert piped.returncode == 0, piped.stderr
        _save(tmp_path, f"{name}-piped-80", piped.stdout + piped.stderr)
        code, tty = _in_pty([*SANDPORT, *args, *state])
        assert code == 0, tty
        _save(tmp_path, f"{name}-tty-80", tty)
        for text, how in ((piped.stdout, "piped"), (tty, "tty"), (piped.stderr, "stderr")):
            _check_fits(text, f"{name} {how}")
            assert "kernel/kernel" not in text, text
            assert not re.search(r"127\.0\.0\.1:0(?!\d)", text), text
        for text in (piped.stdout, tty):
            first = text.strip().splitlines()[0].split()
            assert all(h in first for h in headers[name]), (name, text)
        # --wide: every column, one line per row.
        wide = _piped([*SANDPORT, *args, "--wide", *state])
        assert wide.returncode == 0, wide.stderr
        _save(tmp_path, f"{name}-wide", wide.stdout)
        assert all(h in wide.stdout.splitlines()[0].split() for h in headers[name])
        assert len(wide.stdout.splitlines()) == 1 + {
            "forward-list": len(ready["forwards"]) + len(target["forwards"]),
            "sandbox-list": 2, "token-list": 1}[name], wide.stdout
    forwards = _piped([*SANDPORT, "forward", "list", "--wide", *state]).stdout
    assert "kernel (DNAT)" in forwards and "proxy (splice)" in forwards, forwards
    assert "WHY" in forwards and "auto: nft DNAT serves this" in forwards
    assert "kernel/kernel" not in forwards
    # The attached target has no VNC: its VNC cell says so ("-"), not 127.0.0.1:0.
    sandboxes = _piped([*SANDPORT, "sandbox", "list", "--wide", *state]).stdout
    rows = {line.split()[0]: line.split() for line in sandboxes.splitlines()[1:]}
    vnc = sandboxes.splitlines()[0].split().index("VNC")  # before DESKTOP LINK
    assert rows[target["id"]][vnc] == "-", sandboxes
    assert rows[ready["id"]][vnc] == f"{ready['vnc']['host']}:{ready['vnc']['port']}"
    assert ready["desktop_url"] in sandboxes
    # Narrow: the columns left out are named, with the flag that shows them.
    narrow = _piped([*SANDPORT, "sandbox", "list", *state])
    assert "DESKTOP LINK" in narrow.stderr and "--wide" in narrow.stderr, narrow.stderr
    assert ready["desktop_url"] not in narrow.stdout
    # 40 columns: the key columns stay, the rest is left out, nothing overflows.
    forty = subprocess.run([*SANDPORT, "forward", "list", *state], capture_output=True,
                           text=True, timeout=60, check=False,
                           env={**os.environ, "COLUMNS": "40"})
    _save(tmp_path, "forward-list-piped-40", forty.stdout + forty.stderr)
    assert forty.returncode == 0, forty.stderr
    for line in (forty.stdout + forty.stderr).splitlines():
        assert len(line) <= 40, forty.stdout + forty.stderr
    assert {"SANDBOX", "NAME", "HOST"} <= set(forty.stdout.splitlines()[0].split())
    assert "MODE" in forty.stderr and "--wide" in forty.stderr, forty.stderr
    # --json is what the API answers, as before.
    docs = json.loads(_piped([*SANDPORT, "forward", "list", "--json", *state]).stdout)
    assert {(f["mode"], f["data_path"]) for f in docs} == {("kernel", "kernel"),
                                                            ("proxy", "splice")}
    code, stderr = up.stop()
    assert code == 0, stderr


def test_up_prints_the_ready_block_and_logs_to_the_state_dir(tmp_path: Path) -> None:
    bridge, subnet = test_net_names()
    state = tmp_path / "state"
    argv = [*SANDPORT, "up", "--demo", "--listen", "127.0.0.1:0", "--vnc-port", "0",
            "--state-dir", str(state), "--bridge", bridge, "--subnet", str(subnet)]
    try:
        code, tty = _in_pty(argv, until="Press Ctrl-C", stop_after=0.5)
        _save(tmp_path, "up-tty-80", tty)
        assert code == 0, tty
        # The ready block, plainly: no INFO line of the gateway's log around it.
        assert not INFO_LINE.search(tty), tty
        assert re.search(r"^Desktop sandbox \w+ is ready in", tty, re.MULTILINE), tty
        for label in ("  Browser:  http://127.0.0.1:", "  VNC:      vncviewer 127.0.0.1::",
                      "SANDPORT-READY {", "Press Ctrl-C to stop"):
            assert label in tty, tty
        log_file = state / "gateway.log"
        assert f"  Log:      {log_file} (--log-level info shows it here)" in tty, tty
        # The log went to the file instead, private to root.
        log = log_file.read_text()
        assert re.search(r" INFO sandport\.control\.sandboxes: sandbox \w+ ready in", log), log
        assert " INFO sandport.control.roster: sandbox " in log, log
        assert log_file.stat().st_mode & 0o077 == 0
        # --log-level info shows it on the terminal too (and still in the file).
        code, loud = _in_pty([*argv, "--log-level", "info"], until="Press Ctrl-C",
                             stop_after=0.5)
        _save(tmp_path, "up-tty-80-log-level-info", loud)
        assert code == 0, loud
        assert INFO_LINE.search(loud) and "created bridge" in loud, loud
        assert log_file.read_text().count("created bridge") == 2
    finally:
        remove_gateway_leftovers(bridge=bridge, state_dir=state)
