"""Every code block of README.md and docs/*.md, run as a reader would run it.

The blocks come from the Markdown itself (tests/docblocks.py), so the docs and this test
cannot drift apart: a block without a marker is run, ``<!-- output: PRODUCER -->`` blocks
are compared with what PRODUCER prints, ``<!-- not run: REASON -->`` blocks are skipped
(tests/unit/test_docs_blocks.py checks that each of those says why).

One gateway per Markdown file, ``sandport up --demo`` as a subprocess with the test's own
state dir, bridge and subnet (each ``sandport up`` line of the docs runs beside it, with
names of its own). What a reader would type stays as written except for these
substitutions (the README's Development section names them too):

* ``sudo`` is dropped (the tests run as root); ``sandport`` is the venv's;
* ``/var/lib/sandport`` is the test's state dir, ``127.0.0.1:8700`` its gateway's
  address, ``3fa9c1``/``3f2a1c`` the id of its demo sandbox, ``$T`` that sandbox's token;
* host ports of the examples (:data:`DOC_PORTS`) are free ports of this run;
* a ``sandport`` command gets ``--state-dir``; ``sandport up`` also ``--bridge``,
  ``--subnet``, ``--listen 127.0.0.1:0`` and ``--vnc-port 0``;
* ``curl`` fails on an HTTP error (``--fail-with-body``);
* in Python blocks: the names of their own gateway or namespace (:data:`PY_NAMES`).

A shell block runs as one ``bash -e`` script per run of plain lines; ``sandport up`` and
``sandport ws`` run until they serve (ready line, or the port answers), then get SIGINT
and must exit 0; a ``-p`` of ``sandport up`` must be among the forwards it prints. A
Python block runs as a program and must exit 0, and a ``print(...)  # TEXT`` line in it
must print TEXT.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import remove_gateway_leftovers, require_programs, require_root, test_net_names
from docblocks import ROOT, Block, doc_files, parse_file
from sandport.forward.spec import parse_port_spec
from tlshelpers import make_ca

pytestmark = pytest.mark.integration

SANDPORT = str(Path(sys.executable).parent / "sandport")
START_TIMEOUT = 60.0
STEP_TIMEOUT = 90.0
#: Host ports the docs use, by their offset in the block of free ports of a run.
DOC_PORTS = {"18080": 0, "15353": 1, "6080": 2, "6443": 3, "10007": 4, "10053": 5,
             "9000": 6, "15432": 7, "18000": 8}
RANGE_PORTS = ("15900-15909", 10)  # a range of ten, at this offset
PORT_BLOCK = 20
#: Names that Python examples choose for their own gateway or namespace.
PY_NAMES = ("/tmp/sandport-example", "sp-example", "10.201.9.0/24", "sp-demo")
PRINTS = re.compile(r"^\s*print\(.*\)\s+#\s*(.+)$", re.MULTILINE)  # print(...)  # TEXT
SANDPORT_LINE = re.compile(r"^(?:sudo\s+)?(?:\.venv/bin/)?sandport\s+(?P<sub>\S+)")


def _free_port_block() -> int:
    """The first of :data:`PORT_BLOCK` ports free for TCP and UDP on every address."""
    for _ in range(200):
        base = 21000 + secrets.randbelow(11000 - PORT_BLOCK)
        with contextlib.ExitStack() as stack:
            try:
                for port in range(base, base + PORT_BLOCK):
                    for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
                        sock = stack.enter_context(socket.socket(socket.AF_INET, kind))
                        sock.bind(("0.0.0.0", port))
            except OSError:
                continue
            return base
    raise RuntimeError("no block of free ports in 21000-32000")


def _wait_for(path: Path, text: str, proc: subprocess.Popen[bytes], what: str) -> str:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        content = path.read_text(errors="replace")
        if text in content:
            return content
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    raise AssertionError(f"{what}: {text!r} never came (exit {proc.poll()}):\n"
                         f"{path.read_text(errors='replace')[-3000:]}")


def _stop(proc: subprocess.Popen[bytes], what: str, err: Path) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        code = proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError(f"{what} did not stop within 30 s of SIGINT") from None
    assert code == 0, f"{what} exited {code} after SIGINT:\n{err.read_text()[-3000:]}"


class DocRun:
    """The blocks of one Markdown file, run against a gateway of their own."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.used: list[tuple[Path, str]] = []  # (state dir, bridge) of every gateway
        self.state_dir, self.bridge, self.subnet = tmp / "state", "", ""  # at each start
        self.netns = f"sp-d{secrets.token_hex(3)}"
        self.ports = _free_port_block()
        self.proc: subprocess.Popen[bytes] | None = None
        self.ready: dict[str, Any] = {}
        self.demo_output = ""  # what the first `sandport up --demo` printed
        self.url = ""
        self.starts = 0
        ca = make_ca(tmp)
        ca.issue(tmp / "self.pem")  # `sandport ws --cert self.pem`
        (tmp / "tokens").write_text("t1: localhost:5901\n")

    # --- the gateway ---------------------------------------------------------------------

    def names(self) -> tuple[Path, str, str]:
        """A state dir, bridge and subnet for one more gateway, picked as it starts: the
        test subnets are shared with every test run on this machine."""
        state_dir = self.tmp / f"state{len(self.used)}"
        bridge, subnet = test_net_names()
        self.used.append((state_dir, bridge))
        return state_dir, bridge, str(subnet)

    @staticmethod
    def up_flags(state_dir: Path, bridge: str, subnet: str) -> list[str]:
        return ["--state-dir", str(state_dir), "--bridge", bridge, "--subnet", subnet,
                "--listen", "127.0.0.1:0", "--vnc-port", "0"]

    def ensure_gateway(self) -> None:
        """Start ``sandport up --demo`` unless it runs; keep its ready document."""
        if self.proc is not None:
            return
        self.starts += 1
        self.state_dir, self.bridge, self.subnet = self.names()
        out, err = self.tmp / f"up{self.starts}.out", self.tmp / f"up{self.starts}.err"
        with out.open("wb") as o, err.open("wb") as e:
            self.proc = subprocess.Popen([SANDPORT, "up", "--demo",
                                          *self.up_flags(self.state_dir, self.bridge,
                                                         self.subnet)],
                                         stdout=o, stderr=e, cwd=self.tmp)
        stdout = _wait_for(out, "SANDPORT-READY ", self.proc, "sandport up --demo")
        stderr = _wait_for(err, "Press Ctrl-C", self.proc, "sandport up --demo")
        line = next(x for x in stdout.splitlines() if x.startswith("SANDPORT-READY "))
        self.ready = json.loads(line.split(" ", 1)[1])
        self.demo_output = self.demo_output or f"{stderr}\n{stdout}"
        gateway = json.loads((self.state_dir / "gateway.json").read_text())
        self.url = str(gateway["url"])

    def stop_gateway(self) -> None:
        if self.proc is not None:
            _stop(self.proc, "sandport up --demo", self.tmp / f"up{self.starts}.err")
            self.proc = None

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for state_dir, bridge in self.used:
            remove_gateway_leftovers(bridge=bridge, state_dir=state_dir)
        subprocess.run(["ip", "netns", "del", self.netns], capture_output=True,
                       check=False)

    # --- substitutions -----------------------------------------------------------------

    def substitute(self, text: str) -> str:
        """The documented substitutions (module docstring) applied to ``text``."""
        for doc_port, offset in DOC_PORTS.items():
            text = re.sub(rf"(?<![\d.]){doc_port}(?!\d)", str(self.ports + offset), text)
        first = self.ports + RANGE_PORTS[1]
        text = text.replace(RANGE_PORTS[0], f"{first}-{first + 9}")
        text = text.replace("/var/lib/sandport", str(self.state_dir))
        text = text.replace("/etc/websockify/tokens", str(self.tmp / "tokens"))
        if self.url:
            text = text.replace("http://127.0.0.1:8700", self.url)
            text = text.replace("127.0.0.1:8700", self.url.split("://", 1)[1])
        if self.ready:
            text = re.sub(r"\b(3fa9c1|3f2a1c)\b", self.ready["id"], text)
        return text

    # --- shell blocks ------------------------------------------------------------------

    def run_sh(self, block: Block) -> None:
        lines: list[str] = []
        for line in _logical_lines(block.text):
            match = SANDPORT_LINE.match(line)
            if match is not None and match["sub"] in ("up", "ws"):
                self._script(block, lines)
                lines = []
                self._server(block, match["sub"], _uncommented(line))
                continue
            lines.append(line)
        self._script(block, lines)

    def _script(self, block: Block, lines: list[str]) -> None:
        if not any(line.strip() and not line.lstrip().startswith("#") for line in lines):
            return
        self.ensure_gateway()
        script = []
        for written in lines:
            line = re.sub(r"(?<![\w-])curl ", "curl --fail-with-body ",
                          written.replace("sudo ", ""))
            if SANDPORT_LINE.match(line):
                line = _uncommented(line) + f" --state-dir {self.state_dir}"
            script.append(self.substitute(line))
        env = {**os.environ, "PATH": f"{Path(SANDPORT).parent}:{os.environ['PATH']}",
               "T": str(self.ready["token"])}
        result = subprocess.run(["bash", "-euo", "pipefail", "-c", "\n".join(script)],
                                capture_output=True, text=True, env=env, cwd=self.tmp,
                                timeout=STEP_TIMEOUT, check=False)
        assert result.returncode == 0, (
            f"{block.where}: exit {result.returncode}\n--- script\n" + "\n".join(script)
            + f"\n--- stdout\n{result.stdout[-3000:]}\n--- stderr\n{result.stderr[-3000:]}")

    def _server(self, block: Block, sub: str, line: str) -> None:
        argv = shlex.split(self.substitute(line.replace("sudo ", "")))
        argv[0] = SANDPORT
        if sub == "up":
            argv += self.up_flags(*self.names())
        out, err = self.tmp / f"{sub}.out", self.tmp / f"{sub}.err"
        with out.open("wb") as o, err.open("wb") as e:
            proc = subprocess.Popen(argv, stdout=o, stderr=e, cwd=self.tmp)
        what = f"{block.where}: {shlex.join(argv)}"
        try:
            if sub == "up":
                ready = _wait_for(out, "SANDPORT-READY ", proc, what) if "--demo" in argv \
                    else _wait_for(err, "Press Ctrl-C", proc, what)
                _check_publish(argv, ready, what)
            else:
                _wait_listening(_ws_port(argv), proc, what)
        finally:
            if proc.poll() is None:
                _stop(proc, what, err)
        assert proc.returncode == 0, f"{what}: exit {proc.returncode}\n{err.read_text()}"

    # --- Python blocks -----------------------------------------------------------------

    def run_python(self, block: Block) -> None:
        text = block.text
        if "/var/lib/sandport" in text:
            self.ensure_gateway()
        if any(name in text for name in PY_NAMES[:3]):
            state_dir, bridge, subnet = self.names()
            text = (text.replace(PY_NAMES[0], str(state_dir)).replace(PY_NAMES[1], bridge)
                    .replace(PY_NAMES[2], subnet))
        text = text.replace(PY_NAMES[3], self.netns)
        program = self.tmp / f"block{block.line}.py"
        program.write_text(self.substitute(text))
        result = subprocess.run([sys.executable, str(program)], capture_output=True,
                                text=True, cwd=self.tmp, timeout=STEP_TIMEOUT, check=False)
        assert result.returncode == 0, (f"{block.where}: exit {result.returncode}\n"
                                        f"{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
        for said in PRINTS.findall(self.substitute(text)):
            assert said.strip() in result.stdout, (
                f"{block.where}: it should print {said.strip()!r}; it printed:\n"
                f"{result.stdout[-2000:]}")

    # --- output blocks -----------------------------------------------------------------

    def check_output(self, block: Block) -> None:
        self.ensure_gateway()
        if block.reason == "sandport up --demo":
            _compare_lines(dataclasses.replace(block, text=self.substitute(block.text)),
                           self.demo_output)
        elif block.reason == "sandport doctor --json":
            result = subprocess.run([SANDPORT, "doctor", self.ready["id"], "--json",
                                     "--state-dir", str(self.state_dir)],
                                    capture_output=True, text=True, timeout=STEP_TIMEOUT,
                                    check=False)
            assert result.returncode == 0, result.stdout + result.stderr
            _compare_keys(block, json.loads(block.text), json.loads(result.stdout), "")
        elif block.reason == "sandport forward list":
            result = subprocess.run([SANDPORT, "forward", "list", "--state-dir",
                                     str(self.state_dir)], capture_output=True, text=True,
                                    timeout=STEP_TIMEOUT, check=False,
                                    env={**os.environ, "COLUMNS": "80"})
            assert result.returncode == 0, result.stdout + result.stderr
            _check_forward_table(block, result.stdout, result.stderr)
        else:
            raise AssertionError(f"{block.where}: no check for output of {block.reason!r}")


def _uncommented(line: str) -> str:
    """``line`` without its trailing shell comment (a ``#`` after a blank, outside quotes)."""
    quote = ""
    for i, char in enumerate(line):
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and i and line[i - 1].isspace():
            return line[:i].rstrip()
    return line


def _logical_lines(text: str) -> Iterator[str]:
    """Lines with their backslash continuations joined."""
    pending = ""
    for line in text.splitlines():
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        yield pending + line
        pending = ""
    if pending:
        yield pending


def _check_publish(argv: list[str], ready_out: str, what: str) -> None:
    """Each ``-p`` of ``sandport up --demo`` is among the forwards it printed."""
    specs = [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg in ("-p", "--publish")]
    if not specs:
        return
    line = next(x for x in ready_out.splitlines() if x.startswith("SANDPORT-READY "))
    forwards = {(f["protocol"], f["host"].rsplit(":", 1)[1])
                for f in json.loads(line.split(" ", 1)[1])["forwards"]}
    for spec in specs:
        for mapping in parse_port_spec(spec):
            assert (mapping.protocol, str(mapping.host_port)) in forwards, (
                f"{what}: no {mapping.protocol} forward of host port {mapping.host_port} "
                f"among {sorted(forwards)}")


def _ws_port(argv: list[str]) -> int:
    """The listen port of a ``sandport ws`` command line (``[HOST:]PORT``, first positional)."""
    words = [w for w in argv[2:] if re.fullmatch(r"(?:[\d.]+:)?\d+", w)]
    return int(words[0].rsplit(":", 1)[-1])


def _wait_listening(port: int, proc: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline and proc.poll() is None:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.05)
    raise AssertionError(f"{what}: nothing listens on {port} (exit {proc.poll()})")


def _compare_lines(block: Block, real: str) -> None:
    """Each line of ``block`` has a line of ``real`` of its shape: the same words where the
    doc's words have no digits, anything where they have (ids, addresses, times) or are
    ``...``; a ``SANDPORT-READY`` line's keys are all in the real one."""
    real_lines = [line.strip() for line in real.splitlines()]
    for line in block.text.splitlines():
        if not line.strip():
            continue
        if line.startswith("SANDPORT-READY "):
            doc_keys = set(re.findall(r'"(\w+)":', line))
            ready = next(x for x in real_lines if x.startswith("SANDPORT-READY "))
            missing = doc_keys - set(re.findall(r'"(\w+)":', ready))
            assert not missing, f"{block.where}: SANDPORT-READY has no {sorted(missing)}"
            continue
        pattern = r"\s+".join(r"\S+" if re.search(r"\d|\.\.\.", word) else re.escape(word)
                              for word in line.split())
        assert any(re.fullmatch(pattern, x) for x in real_lines), (
            f"{block.where}: no line like {line.strip()!r} in what it printed:\n{real}")


FORWARD_MODES = ("kernel (DNAT)", "proxy (splice)", "proxy (copy)", "proxy (datagrams)")


def _check_forward_table(block: Block, stdout: str, stderr: str) -> None:
    """The doc's table has the real header at 80 columns, rows in modes the real one
    prints, and the real note naming the columns left out."""
    doc = block.text.splitlines()
    real = stdout.splitlines()
    assert doc[0].split() == real[0].split(), (
        f"{block.where}: the header is {doc[0]!r}; at 80 columns it is {real[0]!r}")
    noted = doc.index(next(x for x in doc if x.startswith("not shown")))
    for row in doc[1:noted]:
        assert any(f" {mode} " in row for mode in FORWARD_MODES), (
            f"{block.where}: {row!r} has no MODE of {FORWARD_MODES}")
    note = " ".join(doc[noted:])
    assert note.split() == " ".join(stderr.splitlines()).split(), (
        f"{block.where}: it says {note!r}; the real command said {stderr!r}")


def _compare_keys(block: Block, doc: Any, real: Any, path: str) -> None:
    """Every key the doc's JSON shows (but ``...``) is in the real JSON at the same place."""
    if isinstance(doc, dict) and isinstance(real, dict):
        for key, value in doc.items():
            if key == "...":
                continue
            assert key in real, f"{block.where}: the real JSON has no {path}.{key}"
            _compare_keys(block, value, real[key], f"{path}.{key}")
    elif isinstance(doc, list) and isinstance(real, list) and doc and real:
        _compare_keys(block, doc[0], real[0], f"{path}[0]")


@pytest.fixture(scope="module")
def doc_runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[Path], DocRun]]:
    """The :class:`DocRun` of a Markdown file, one per file for the whole module (the
    README's gateway also serves the test of its claims)."""
    require_root()
    require_programs("Xvnc", "openbox", "xsetroot", "xmessage", "jq", "curl", "busybox")
    runs: dict[Path, DocRun] = {}

    def get(path: Path) -> DocRun:
        if path not in runs:
            runs[path] = DocRun(tmp_path_factory.mktemp(path.stem))
        return runs[path]

    yield get
    try:
        for run in runs.values():
            run.stop_gateway()  # SIGINT, and it must exit 0
    finally:
        for run in runs.values():
            run.close()


@pytest.mark.parametrize("path", doc_files(), ids=lambda p: p.name)
def test_every_block_runs_as_written(path: Path, doc_runs: Callable[[Path], DocRun]
                                     ) -> None:
    doc_run = doc_runs(path)
    ran = 0
    blocks = parse_file(path)
    # Output blocks last: by then the file's own gateway runs (one start, not two).
    for block in sorted(blocks, key=lambda b: b.kind == "output"):
        if block.kind == "not run":
            continue
        began = time.monotonic()
        if block.kind == "output":
            doc_run.check_output(block)
        elif block.lang == "sh":
            doc_run.run_sh(block)
        elif block.lang == "python":
            doc_run.run_python(block)
        else:
            raise AssertionError(f"{block.where}: neither run nor marked (see docblocks.py)")
        ran += 1
        print(f"{block.where}: {time.monotonic() - began:.1f} s")
    print(f"{path.relative_to(ROOT)}: {ran} blocks run or compared")
    if path.name != "README.md":  # the README's gateway goes on to the test of its claims
        doc_run.stop_gateway()


def test_a_port_a_kernel_forward_holds_is_named_where_ss_shows_nothing(
        doc_runs: Callable[[Path], DocRun]) -> None:
    """README, "Port forwards": `ss` does not list a kernel forward's port, `sandport
    forward list` does, and a program that wants the port (here `sandport ws`) is told
    which process (a sandport gateway, with its state dir) holds it."""
    doc_run = doc_runs(ROOT / "README.md")
    doc_run.ensure_gateway()
    assert doc_run.proc is not None
    forward = next(f for f in doc_run.ready["forwards"] if f["name"] == "vnc")
    assert forward["mode"] == "kernel"
    port = int(forward["host"].rsplit(":", 1)[1])
    ss = subprocess.run(["ss", "-tanp", f"sport = :{port}"], capture_output=True, text=True,
                        check=True).stdout
    assert f":{port} " not in ss, f"ss lists the kernel forward's port now; update README:\n{ss}"
    listing = subprocess.run([SANDPORT, "forward", "list", "--state-dir",
                              str(doc_run.state_dir)], capture_output=True, text=True,
                             check=True).stdout
    assert f"127.0.0.1:{port}" in listing
    second = subprocess.run([SANDPORT, "ws", f"127.0.0.1:{port}", "localhost:5901"],
                            capture_output=True, text=True, timeout=STEP_TIMEOUT, check=False)
    assert second.returncode == 2, second.stderr
    assert f"host WebSocket port 127.0.0.1:{port} is already in use" in second.stderr
    assert (f"127.0.0.1:{port} is held by pid {doc_run.proc.pid} (" in second.stderr
            and "a sandport gateway" in second.stderr), second.stderr
    assert f"sandport forward list --state-dir {doc_run.state_dir}`" in second.stderr
    assert "ss -ltnp" not in second.stderr and "Traceback" not in second.stderr


def test_a_port_another_program_holds_is_named_with_its_pid() -> None:
    """The same hint for a holder that is no gateway (a socket bound without listening,
    in another process), and for a port the asking process holds itself."""
    from sandport.errors import PortInUseError

    holder = subprocess.Popen(
        [sys.executable, "-c", "import socket, sys; s = socket.socket(); "
         "s.bind(('127.0.0.1', 0)); print(s.getsockname()[1], flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None
        port = int(holder.stdout.readline())
        hint = PortInUseError("127.0.0.1", port, what="tcp port").hint
    finally:
        holder.communicate("")
    assert hint.startswith(f"127.0.0.1:{port} is held by pid {holder.pid} ({sys.executable}"
                           " -c import socket"), hint
    assert hint.endswith("): stop it or choose another port"), hint
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        hint = PortInUseError("127.0.0.1", port).hint
    assert hint == (f"127.0.0.1:{port} is held by pid {os.getpid()}, the very process that "
                    "asked for it (its own port or one of its forwards): choose another port")


def test_a_hint_without_a_visible_holder_names_what_shows_one() -> None:
    """Where the kernel names no holder (another namespace, an older kernel), the hint
    names the `ss` that shows listeners and connections, and where kernel forwards show."""
    from sandport.errors import port_holder_hint

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # free again once closed
    assert port_holder_hint("127.0.0.1", port, "tcp") == (
        f"see what holds it with `ss -tanp 'sport = :{port}'`; a TCP port that a sandport "
        "gateway forwards in kernel mode is only bound, which `ss` does not list: "
        "`sandport forward list` shows those. Or choose another port")
    assert port_holder_hint("127.0.0.1", port, "udp") == (
        f"see what holds it with `ss -uanp 'sport = :{port}'`, or choose another port")
