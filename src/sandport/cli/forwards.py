"""``sandport forward``: the host port forwards of a running gateway.

Owns the ``forward`` group and its table. Must not touch the forwards themselves: it only
reads them through the gateway's API.
"""

from __future__ import annotations

from typing import Annotated

import typer

from sandport.cli.common import (
    StateDirOption,
    err,
    gateway_client,
    json_flag,
    print_columns,
    print_json,
    show_error,
)
from sandport.cli.help import HelpTyper
from sandport.config import DEFAULT_STATE_DIR
from sandport.errors import SandportError

forward_app = HelpTyper(help="Inspect the host port forwards of a running gateway.")


def _count(value: object) -> str:
    return "-" if value is None else f"{value:,}" if isinstance(value, int) else str(value)


@forward_app.command("list")
def forward_list(
    state_dir: StateDirOption = DEFAULT_STATE_DIR,
    as_json: Annotated[bool, json_flag("Print JSON instead of a table.")] = False,
) -> None:
    """Show every host port forward: mode and why, state, connections, bytes, failures.

    Kernel forwards count the connections their DNAT rule translated; bytes and active
    connections are known only for the userspace relay ("-").
    """
    try:
        with gateway_client(state_dir.absolute()) as gateway:
            forwards = gateway.forwards()
    except SandportError as exc:
        show_error(exc)
        raise typer.Exit(exc.exit_code) from None
    if as_json:
        print_json(forwards)
        return
    if not forwards:
        err.print("no forwards")
        return
    header = ("ID", "SANDBOX", "NAME", "PROTO", "HOST", "GUEST", "MODE", "STATE", "ACTIVE",
              "TOTAL", "BYTES UP", "BYTES DOWN", "FAILURES", "WHY")
    rows = [header]
    for f in forwards:
        failures = ",".join(f"{k}={v}" for k, v in sorted((f.get("failures") or {}).items())
                            if v) or "-"
        rows.append((f["id"], f["sandbox"], f["name"], f["protocol"], f["host"], f["guest"],
                     f"{f['mode']}/{f['data_path']}", f["state"], _count(f.get("active")),
                     _count(f.get("total")), _count(f.get("bytes_up")),
                     _count(f.get("bytes_down")), failures, f["why"]))
    print_columns(rows)
