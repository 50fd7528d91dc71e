"""``sandport sandbox``, ``attach``, ``detach``, ``retarget`` and ``token``: a gateway's sandboxes.

Owns the commands that create, list, follow the logs of and remove sandboxes, that front
targets sandport did not create, and that make, list and revoke a sandbox's access
tokens, all through the running gateway's API. Must not create, check or store anything
itself, nor read the gateway's store: the gateway does the work. ``attach``, ``detach``
and ``retarget`` are top-level commands: :mod:`sandport.cli` registers them.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from sandport.cli.common import (
    PUBLISH_HELP,
    StateDirOption,
    err,
    gateway_client,
    json_flag,
    out,
    print_json,
    print_table,
    run_reporting,
    wide_flag,
)
from sandport.cli.help import HelpTyper
from sandport.cli.table import Column
from sandport.config import DEFAULT_STATE_DIR
from sandport.errors import UsageError

sandbox_app = HelpTyper(help="Create, list and remove sandboxes of a running gateway "
                          "(through its API, with the admin token from its state dir).")


def _opens(sb: dict[str, Any]) -> str:
    """What a sandbox's link opens, in words, with the link: its desktop, a VM's console,
    or no link when it has neither."""
    url = str(sb["desktop_url"])
    if not url:
        return ("no desktop link (it has no VNC port): reach its ports through forwards "
                f"(-p) or `sandport token create {sb['id']} --kind ws` (WebSocket URLs)")
    return f"its console (no desktop) {url}" if "&port=console" in url else url


@sandbox_app.command("create")
def sandbox_create(
    publish: Annotated[list[str] | None, typer.Option(
        "--publish", "-p", help=f"Forward a port; a SPEC for a port the profile exposes "
        f"(5901: VNC) sets that port's host side. {PUBLISH_HELP}", metavar="SPEC")] = None,
    profile: Annotated[str, typer.Option(
        help="desktop (Xvnc + openbox) or echo (TCP/UDP echo on 7, HTTP on 80; qemu).",
        metavar="PROFILE")] = "desktop",
    backend: Annotated[str, typer.Option(
        help="netns (a network namespace) or qemu (a microVM; its image is built once, "
             "see `sandport image build`).", metavar="BACKEND")] = "netns",
    state_dir: StateDirOption = DEFAULT_STATE_DIR,
) -> None:
    """Create a sandbox and print it as JSON once it is proven ready.

    The JSON goes to stdout, a line with its desktop link to stderr.

    Examples:

      sandport sandbox create -p 18080:8080

      sandport sandbox create --backend qemu --profile echo \\
          -p 10007:7 -p 10007:7/udp
    """

    def run() -> None:
        with gateway_client(state_dir, timeout=600.0) as gateway:
            sb = gateway.create_sandbox(publish=publish or [], profile=profile,
                                        backend=backend).doc
        err.print(escape(f"sandbox {sb['id']} ready in {sb['ready_seconds']} s: "
                         f"{_opens(sb)}"))
        print_json(sb)

    run_reporting(run)


#: The columns of ``sandbox list``; the docstring of :func:`sandbox_list` says what each is.
SANDBOX_COLUMNS = (
    Column(header="ID"),
    Column(header="NAME", rank=5),
    Column(header="BACKEND", rank=6),
    Column(header="PROFILE", rank=3),
    Column(header="STATE"),
    Column(header="IP", rank=1),
    Column(header="VNC", rank=2),
    Column(header="DESKTOP LINK", rank=7),
    Column(header="REASON", rank=4, wrap=True),
)


def _vnc(sb: dict[str, Any]) -> str:
    """Where a native VNC client connects, or "" for a sandbox with no VNC forward."""
    vnc = sb.get("vnc") or {}
    return f"{vnc.get('host')}:{vnc['port']}" if vnc.get("port") else ""


@sandbox_app.command("list")
def sandbox_list(
    state_dir: StateDirOption = DEFAULT_STATE_DIR,
    as_json: Annotated[bool, json_flag()] = False,
    wide: Annotated[bool, wide_flag()] = False,
) -> None:
    """Every sandbox, attached targets too, as a table.

    Columns: ID; NAME (an attached target's); BACKEND: netns, qemu or external (attached);
    PROFILE; STATE; IP (the guest's address); VNC (the host address a VNC viewer
    connects to; "-": no VNC); DESKTOP LINK (the noVNC page, with its token); REASON (why
    it failed or is degraded). A narrow terminal shows those that fit, the most useful
    first; --wide shows all.
    """

    def run() -> None:
        with gateway_client(state_dir) as gateway:
            sandboxes = [sb.doc for sb in gateway.sandboxes()]
        if as_json:
            print_json(sandboxes)
            return
        if not sandboxes:
            err.print("no sandboxes")
            return
        print_table(SANDBOX_COLUMNS, [
            (str(sb["id"]), str(sb.get("name") or ""), str(sb.get("backend") or ""),
             str(sb.get("profile") or ""), str(sb["state"]), str(sb["ip"]), _vnc(sb),
             str(sb.get("desktop_url") or ""), str(sb.get("reason") or ""))
            for sb in sandboxes], wide=wide)

    run_reporting(run)


@sandbox_app.command("logs")
def sandbox_logs(
    sandbox_id: Annotated[str, typer.Argument(help="Sandbox id.", metavar="ID")],
    name: Annotated[str, typer.Option(
        help="Which log: serial (a VM's console, the default there), qemu, Xvnc, openbox, "
             "agent...; an unknown name lists them.", metavar="NAME")] = "",
    follow: Annotated[bool, typer.Option("--follow", "-f",
                                         help="Keep printing what is added.")] = False,
    state_dir: StateDirOption = DEFAULT_STATE_DIR,
) -> None:
    """Print a sandbox's guest log: a VM's boot and console, a guest program's output."""

    def run() -> None:
        with gateway_client(state_dir, timeout=10.0) as gateway:
            sb = gateway.sandbox(sandbox_id, fetch=False)
            for chunk in sb.follow_logs(name) if follow else [sb.logs(name)]:
                sys.stdout.write(chunk.text)
                sys.stdout.flush()

    try:
        run_reporting(run)
    except KeyboardInterrupt:
        raise typer.Exit(0) from None


def attach(
    name: Annotated[str, typer.Argument(help="Your name for the target (shown in lists).",
                                        metavar="NAME")],
    ip: Annotated[str, typer.Option(help="The target's IPv4 address.", metavar="ADDR")],
    publish: Annotated[list[str] | None, typer.Option(
        "--publish", "-p", help=f"Forward a port; a SPEC for the primary port (5901 of a "
        f"desktop, --port) sets its host side. {PUBLISH_HELP}", metavar="SPEC")] = None,
    profile: Annotated[str, typer.Option(
        help="desktop (VNC on 5901), http (80 or --port) or tcp (--port): what readiness "
             "speaks to it.", metavar="PROFILE")] = "desktop",
    port: Annotated[int, typer.Option(
        help="Primary port of the target: needed for tcp; http: 80 unless given; a desktop "
             "is always VNC on 5901.", min=0, max=65535, metavar="PORT",
        show_default=False)] = 0,
    vnc_password_file: Annotated[Path | None, typer.Option(
        help="File holding the desktop's VNC password (plain text, first line).",
        metavar="FILE")] = None,
    interface: Annotated[str, typer.Option(
        help="Host interface the target is reached through (checked against the route).",
        metavar="IFACE")] = "",
    netns: Annotated[str, typer.Option(
        help="The network namespace the target lives in (a container's), by `ip netns` "
             "name or the PID of a process in it; --ip is then an address in there, its "
             "127.0.0.1 too.", metavar="NAME|PID")] = "",
    forward_mode: Annotated[str, typer.Option(
        help="proxy (the userspace relay) or kernel (nft DNAT; not with --netns).",
        metavar="MODE")] = "proxy",
    state_dir: StateDirOption = DEFAULT_STATE_DIR,
) -> None:
    """Front a VM or container that sandport did not create.

    It gets forwards, the WebSocket bridge and noVNC, readiness and the doctor, as
    sandport's own sandboxes do; nothing is created in the guest. The gateway must allow
    the target's network (`sandport up --attach-subnet`).

    Examples:

      sandport attach fc-42 --ip 172.16.0.2 --vnc-password-file pw.txt

      sandport attach api-7 --ip 10.1.0.7 --profile http --port 8080 \\
          -p 18080:8080

      sandport attach web --netns "$(docker inspect -f '{{.State.Pid}}' web)" \\
          --ip 127.0.0.1 --profile http --port 8000 -p 18000:8000
    """

    def run() -> None:
        password = None
        if vnc_password_file is not None:
            try:
                password = vnc_password_file.read_text().splitlines()[0].strip()
            except (OSError, IndexError) as exc:
                raise UsageError(f"cannot read the VNC password from {vnc_password_file}: "
                                 f"{exc}") from None
        with gateway_client(state_dir, timeout=600.0) as gateway:
            sb = gateway.attach(ip, name=name, publish=publish or [], profile=profile,
                                port=port, vnc_password=password, interface=interface,
                                netns=netns, forward_mode=forward_mode).doc
        err.print(escape(f"attached {ip} as sandbox {sb['id']} ({sb['state']}): "
                         f"{_opens(sb)}"))
        print_json(sb)

    run_reporting(run)


def detach(
    ids: Annotated[list[str], typer.Argument(help="Ids of attached targets.", metavar="ID")],
    state_dir: StateDirOption = DEFAULT_STATE_DIR,
) -> None:
    """Stop fronting attached targets; the targets themselves are left as they are.

    Their forwards and bridge sessions close, with a reason.
    """

    _remove(state_dir, ids, "detached")


def retarget(
    sandbox_id: Annotated[str, typer.Argument(help="Id of an attached target.", metavar="ID")],
    ip: Annotated[str | None, typer.Option(help="Its new address.", metavar="ADDR")] = None,
    gone: Annotated[bool, typer.Option(
        "--gone", help="It is gone (its VM or container stopped).")] = False,
    reason: Annotated[str, typer.Option(help="Words for logs and close reasons.",
                                        metavar="WORDS")] = "",
    state_dir: StateDirOption = DEFAULT_STATE_DIR,
) -> None:
    """Tell the gateway an attached target moved (--ip) or is gone (--gone).

    Live connections close with the reason; links and tokens stay valid, and new
    connections go to the new address.
    """

    def run() -> None:
        if gone == (ip is not None):
            raise UsageError("say where the target moved (--ip ADDR) or that it is gone "
                             "(--gone), one of them")
        with gateway_client(state_dir, timeout=120.0) as gateway:
            target = gateway.sandbox(sandbox_id, fetch=False)
            sb = (target.gone(reason) if ip is None else target.moved(ip, reason)).doc
        err.print(escape(f"sandbox {sb['id']}: {sb['state']} at {sb['ip']}"))

    run_reporting(run)


@sandbox_app.command("rm")
def sandbox_rm(
    ids: Annotated[list[str], typer.Argument(help="Sandbox ids.", metavar="ID")],
    state_dir: StateDirOption = DEFAULT_STATE_DIR,
) -> None:
    """Stop and remove sandboxes."""

    _remove(state_dir, ids, "removed")


def _remove(state_dir: Path, ids: list[str], done: str) -> None:
    """DELETE each sandbox (or attached target), saying ``done ID`` for each."""

    def run() -> None:
        with gateway_client(state_dir, timeout=60.0) as gateway:
            for sandbox_id in ids:
                gateway.sandbox(sandbox_id, fetch=False).delete()
                err.print(escape(f"{done} {sandbox_id}"))

    run_reporting(run)


token_app = HelpTyper(help="Access tokens of a sandbox: desktop links that expire, limited "
                        "to ports and kinds; revoking one closes its live sessions.")


@token_app.command("create")
def token_create(
    sandbox_id: Annotated[str, typer.Argument(help="Sandbox id.", metavar="SANDBOX")],
    ttl: Annotated[float, typer.Option(help="Seconds it is valid.", min=1,
                                       metavar="SECONDS")] = 3600.0,
    port: Annotated[list[str] | None, typer.Option(
        "--port", help="A guest port (name or number) it opens; repeatable; default all.",
        metavar="PORT")] = None,
    kind: Annotated[list[str] | None, typer.Option(
        "--kind", help="What it opens: ws (the WebSocket bridge), http (the desktop page; "
        "it connects through ws, so it needs ws too); repeatable; default both.",
        metavar="KIND")] = None,
    state_dir: StateDirOption = DEFAULT_STATE_DIR,
    as_json: Annotated[bool, json_flag()] = False,
) -> None:
    """Make an access token and print the links it opens, one a line.

    The desktop page if it opens it; a --kind ws token (or one limited to other ports)
    prints the WebSocket URL of each port it opens. The token is shown only now:
    `sandport token list` shows ids and expiry, never tokens.

    Example:

      sandport token create 3f9a1c --ttl 600 --port vnc
    """

    def run() -> None:
        for k in kind or []:
            if k not in ("ws", "http"):
                raise UsageError(f"--kind {k!r} is not one of ws, http")
        with gateway_client(state_dir) as gateway:
            doc = gateway.sandbox(sandbox_id, fetch=False).create_token(
                ttl, ports=port or [], kinds=kind or [])
        if as_json:
            print_json(doc)
            return
        # stdout: the links the token opens, one a line (the desktop page first).
        links = [doc["desktop_url"]] if doc["desktop_url"] else []
        links += [url for name, url in doc["ws_urls"].items()
                  if not (doc["desktop_url"] and name in ("vnc", "console"))]
        if doc["desktop_url"]:
            opens = ("its console page (no desktop)" if "&port=console" in doc["desktop_url"]
                     else "its desktop page")
            opens += ", and WebSocket URLs" if len(links) > 1 else ""
        else:
            opens = ("WebSocket URLs only (a WebSocket client or your own noVNC page; no "
                     "desktop page)")
        err.print(escape(f"token {doc['id']} for sandbox {sandbox_id}, valid {ttl:g} s; "
                         f"opens {opens}:"))
        for link in links:
            out.print(link, markup=False, crop=False, overflow="ignore")

    run_reporting(run)


#: The columns of ``token list``.
TOKEN_COLUMNS = (
    Column(header="ID"),
    Column(header="STATE"),
    Column(header="EXPIRES"),
    Column(header="PORTS", rank=1, wrap=True),
    Column(header="KINDS", rank=2),
)


@token_app.command("list")
def token_list(
    sandbox_id: Annotated[str, typer.Argument(help="Sandbox id.", metavar="SANDBOX")],
    state_dir: StateDirOption = DEFAULT_STATE_DIR,
    as_json: Annotated[bool, json_flag()] = False,
    wide: Annotated[bool, wide_flag()] = False,
) -> None:
    """The access tokens of a sandbox (never the tokens themselves).

    Columns: ID (for `token revoke`); STATE: valid or expired; EXPIRES (local time);
    PORTS and KINDS it opens (all: every one).
    """

    def run() -> None:
        with gateway_client(state_dir) as gateway:
            tokens = gateway.sandbox(sandbox_id, fetch=False).tokens()
        if as_json:
            print_json(tokens)
            return
        if not tokens:
            err.print("no access tokens")
            return
        print_table(TOKEN_COLUMNS, [
            (str(t["id"]), "expired" if t["expired"] else "valid",
             time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t["expires_at"])),
             ", ".join(t["ports"]) or "all", ", ".join(t["kinds"]) or "all")
            for t in tokens], wide=wide)

    run_reporting(run)


@token_app.command("revoke")
def token_revoke(
    sandbox_id: Annotated[str, typer.Argument(help="Sandbox id.", metavar="SANDBOX")],
    token_id: Annotated[str, typer.Argument(help="Token id (from create or list).",
                                            metavar="TOKEN_ID")],
    state_dir: StateDirOption = DEFAULT_STATE_DIR,
) -> None:
    """Revoke an access token: its live sessions close at once (1008, with the reason)."""

    def run() -> None:
        with gateway_client(state_dir) as gateway:
            gateway.sandbox(sandbox_id, fetch=False).revoke_token(token_id)
        err.print(escape(f"revoked {token_id}"))

    run_reporting(run)
