"""``sandport doctor``: walk the path to a sandbox hop by hop and print the verdict.

Owns the checks made from outside the gateway (its state file, its process, its API) and
the tables and verdict lines. Must not run the in-gateway checks: the gateway runs them
(:mod:`sandport.doctor`) and the API hands back their report. :mod:`sandport.cli`
registers ``doctor``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from sandport.cli.common import (
    StateDirOption,
    err,
    gateway_client,
    gateway_doc,
    json_flag,
    out,
    show_error,
)
from sandport.config import DEFAULT_STATE_DIR
from sandport.control.gateway import GATEWAY_FILE
from sandport.doctor import Report, Row, Walk, check_port
from sandport.errors import SandportError, UsageError

DOCTOR_STYLE = {"ok": "green", "fail": "bold red", "warn": "yellow", "skip": "dim"}


def _gateway_rows(state_dir: Path) -> list[Row]:
    """The doctor's checks from outside the gateway: its state file, its process, its API.
    Later rows are skipped once one fails."""
    path = state_dir / GATEWAY_FILE
    walk = Walk()
    try:
        doc = gateway_doc(state_dir)
    except UsageError as exc:
        walk.add("gateway", "gateway file", False, str(exc.args[0]),
                 exc.hint or "start the gateway with `sandport up`")
        walk.add("gateway", "API", False, "")
        return walk.rows
    pid = int(doc.get("pid", 0))
    alive = pid > 0 and Path(f"/proc/{pid}").exists()
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(
        errors="replace").strip() if alive else ""
    walk.add("gateway", "gateway file", True, f"{path}: pid {pid}, {doc.get('url')}")
    if not alive or ("sandport" not in cmdline and "python" not in cmdline):
        walk.add("gateway", "process", False,
                 f"pid {pid} of {path} is not running" + (f" (it is {cmdline!r})" if alive
                                                          else ""),
                 "the gateway died (see its log); start `sandport up` again with the same "
                 "--state-dir: it adopts the sandboxes that still run")
    t0 = time.monotonic()
    try:
        with gateway_client(state_dir, timeout=3.0) as gateway:
            gateway.sandboxes()
        walk.add("gateway", "API", True,
                 f"{doc.get('url')} answers ({1000 * (time.monotonic() - t0):.0f} ms)")
    except SandportError as exc:
        walk.add("gateway", "API", False, str(exc),
                 "the gateway process runs but its API does not answer: it hangs or its "
                 "port is blocked; see its log, restart it")
    return walk.rows


def doctor(
    sandbox_id: Annotated[str | None, typer.Argument(
        help="Sandbox id; default: every sandbox.", metavar="SANDBOX")] = None,
    port: Annotated[str | None, typer.Option(
        help="Only this port: its name (vnc), number (8080) or number/protocol "
             "(8080/tcp, 53/udp), as `sandport forward list` shows it.",
        metavar="PORT")] = None,
    token: Annotated[str | None, typer.Option(
        help="A token someone uses for the sandbox (a link's ?token=...): checked too.",
        metavar="TOKEN")] = None,
    as_json: Annotated[bool, json_flag(
        "Print JSON (docs/doctor.schema.json) instead of a table.")] = False,
    state_dir: StateDirOption = DEFAULT_STATE_DIR,
) -> None:
    """Walk the path to a sandbox hop by hop; name the broken hop, its cause and the fix.

    Hops, in order: gateway (process, API, every forward's listener), route (sandbox, port,
    token), host network (bridge address, the sandbox's link, nft DNAT rules, firewall
    rules dropping the guest), guest reachability (ping, ARP), guest service (each port
    answers its protocol at the guest: RFB with the stored password, HTTP, the agent's
    /health) and end to end (each host forward, the WebSocket bridge). After a failure
    the later hops of that port are skipped. Exit status 0: healthy; 1: a hop fails.

    Examples:

      sandport doctor

      sandport doctor 3f2a1c --port vnc

      sandport doctor 3f2a1c --token "$TOKEN" --json
    """
    state_dir = state_dir.absolute()
    if port is not None:
        try:
            check_port(port)
        except UsageError as exc:
            show_error(exc)
            raise typer.Exit(exc.exit_code) from None
    gateway_rows = _gateway_rows(state_dir)
    reports: list[Report] = []
    if all(r.status == "ok" for r in gateway_rows):
        try:
            with gateway_client(state_dir) as gateway:
                sandboxes = [gateway.sandbox(sandbox_id, fetch=False)] if sandbox_id \
                    else gateway.sandboxes()
                gateway.timeout = 30.0  # a walk with a dead hop takes a few seconds
                reports += [Report.from_json(sb.doctor(port=port, token=token))
                            for sb in sandboxes]
        except SandportError as exc:
            show_error(exc)
            raise typer.Exit(exc.exit_code) from None
    healthy = all(r.status != "fail" for r in gateway_rows) and all(r.healthy
                                                                    for r in reports)
    if as_json:
        out.print(json.dumps({
            "version": 1, "healthy": healthy, "gateway": [r.as_json() for r in gateway_rows],
            "reports": [r.as_json() for r in reports]}, indent=2), markup=False)
        raise typer.Exit(0 if healthy else 1)
    _print_doctor(gateway_rows, reports, sandbox_id)
    raise typer.Exit(0 if healthy else 1)


def _print_doctor(gateway_rows: list[Row], reports: list[Report],
                  sandbox_id: str | None) -> None:
    sections: list[tuple[str, list[Row]]] = [("gateway", gateway_rows)]
    sections += [(f"sandbox {r.sandbox}", list(r.rows)) for r in reports]
    for title, rows in sections:
        table = Table(title=title, title_justify="left", expand=False, show_lines=False)
        fixes = any(r.fix for r in rows)
        for column in ("HOP", "CHECK", "RESULT", "EVIDENCE", *(("FIX",) if fixes else ())):
            table.add_column(column, overflow="fold")
        for r in rows:
            style = DOCTOR_STYLE.get(r.status, "")
            cells = [r.hop, escape(r.check + (f" [{r.port}]" if r.port else "")),
                     f"[{style}]{r.status}[/]", escape(r.evidence)]
            table.add_row(*cells, *((escape(r.fix),) if fixes else ()))
        out.print(table)
    failed = next((r for r in gateway_rows if r.status == "fail"), None) or next(
        (rep.failed for rep in reports if rep.failed is not None), None)
    if failed is not None:
        err.print(f"[bold red]broken hop:[/] {escape(failed.hop)} ({escape(failed.check)}): "
                  f"{escape(failed.evidence)}")
        if failed.fix:
            err.print(f"[bold]fix:[/] {escape(failed.fix)}")
    elif not reports and sandbox_id is None:
        err.print("healthy: the gateway answers; it runs no sandboxes")
    else:
        took = sum(r.took for r in reports)
        warns = [r for rep in reports for r in rep.rows if r.status == "warn"]
        err.print(f"[green]healthy[/]: every hop answers ({took:.1f} s)"
                  + (f"; [yellow]{len(warns)} warning(s)[/]: "
                     f"{escape('; '.join(f'{w.check}: {w.fix}' for w in warns))}"
                     if warns else ""))
