"""``sandport forward``: the host port forwards of a running gateway.

Owns the ``forward`` group and its table. Must not touch the forwards themselves: it only
reads them through the gateway's API.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer

from sandport.cli.common import (
    StateDirOption,
    err,
    gateway_client,
    json_flag,
    print_json,
    print_table,
    show_error,
    wide_flag,
)
from sandport.cli.help import HelpTyper
from sandport.cli.table import Column
from sandport.config import DEFAULT_STATE_DIR
from sandport.errors import SandportError

forward_app = HelpTyper(help="Inspect the host port forwards of a running gateway.")


#: The columns of ``forward list``; the docstring of :func:`forward_list` says what each is.
FORWARD_COLUMNS = (
    Column(header="ID", rank=10),
    Column(header="SANDBOX"),
    Column(header="NAME"),
    Column(header="PROTO", rank=2),
    Column(header="HOST"),
    Column(header="GUEST", rank=6),
    Column(header="MODE", rank=1),
    Column(header="STATE", rank=11),
    Column(header="ACTIVE", rank=4, right=True),
    Column(header="CONNS", rank=3, right=True),
    Column(header="BYTES UP/DOWN", rank=7, right=True),
    Column(header="FAILURES", rank=5),
    Column(header="WHY", rank=9, wrap=True),
)

#: ``mode`` and ``data_path`` of the API in words: what moves the bytes.
MODE_WORDS = {
    ("kernel", "kernel"): "kernel (DNAT)",
    ("proxy", "splice"): "proxy (splice)",
    ("proxy", "copy"): "proxy (copy)",
    ("proxy", "datagram"): "proxy (datagrams)",
}


def _count(value: object) -> str:
    return "-" if value is None else f"{value:,}" if isinstance(value, int) else str(value)


def _mode(f: dict[str, Any]) -> str:
    mode, path = str(f.get("mode", "")), str(f.get("data_path", ""))
    return MODE_WORDS.get((mode, path), f"{mode} ({path})" if path and path != mode else mode)


def _bytes(f: dict[str, Any]) -> str:
    up, down = f.get("bytes_up"), f.get("bytes_down")
    return "-" if up is None and down is None else f"{_count(up)}/{_count(down)}"


@forward_app.command("list")
def forward_list(
    state_dir: StateDirOption = DEFAULT_STATE_DIR,
    as_json: Annotated[bool, json_flag("Print JSON instead of a table.")] = False,
    wide: Annotated[bool, wide_flag()] = False,
) -> None:
    """Show every host port forward: where it listens, how it moves the bytes, its traffic.

    Columns: ID; SANDBOX; NAME (the guest port's name); PROTO; HOST (where clients
    connect); GUEST (where it goes); MODE: kernel (DNAT, nftables rewrites the address)
    or proxy (sandport's relay: splice, copy or datagrams); STATE; ACTIVE (connections
    open now); CONNS (connections so far); BYTES UP/DOWN (client to guest / back);
    FAILURES (by reason); WHY (this mode). Kernel forwards count the connections their
    DNAT rule translated; their active connections and bytes are not known ("-"). A
    narrow terminal shows those that fit, the most useful first; --wide shows all.
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
    rows = []
    for f in forwards:
        failures = ",".join(f"{k}={v}" for k, v in sorted((f.get("failures") or {}).items())
                            if v)
        rows.append((str(f["id"]), str(f["sandbox"]), str(f["name"]), str(f["protocol"]),
                     str(f["host"]), str(f["guest"]), _mode(f), str(f["state"]),
                     _count(f.get("active")), _count(f.get("total")), _bytes(f), failures,
                     str(f["why"])))
    print_table(FORWARD_COLUMNS, rows, wide=wide)
