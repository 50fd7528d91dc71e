"""The ``sandport`` command: the app, its entry point, and the one list of its commands.

Only this package prints or exits. Flags map onto :class:`sandport.config.GatewayConfig`;
the work is done by :class:`sandport.control.gateway.Gateway`, which Python callers use
directly. The commands that ask a running gateway (sandbox, token, forward, attach,
doctor...) go through :class:`sandport.client.Client`, the one client of its API: the CLI
reads the state file, maps the client's errors onto messages and exit codes, and makes no
HTTP call of its own.

One module per job; this one owns only the app, ``version`` and ``main``, and registers
every command below in the order ``sandport --help`` lists them. It must not hold a
command's code:

- :mod:`.help`: the typer classes that make every ``--help`` fit a terminal;
- :mod:`.common`: consoles, errors and exit codes, signals, the running gateway's client;
- :mod:`.table`: the layout of every list's table (a header, the terminal's width);
- :mod:`.up`: ``up`` (the gateway in the foreground); :mod:`.ws`: ``ws`` (websockify's CLI);
- :mod:`.sandboxes`: ``sandbox create|list|logs|rm``, ``attach``, ``detach``, ``retarget``
  and ``token create|list|revoke``;
- :mod:`.forwards`: ``forward list``; :mod:`.doctor`: ``doctor``; :mod:`.images`: ``image``.

A group (``sandbox``, ``token``, ``forward``, ``image``) is a typer app of its module; a
top-level command is a plain function there, registered below.
"""

from __future__ import annotations

from sandport import __version__
from sandport.cli import doctor, forwards, images, sandboxes, up, ws
from sandport.cli.common import install_stop_signals, out
from sandport.cli.help import HelpTyper

__all__ = ["app", "install_stop_signals", "main"]

app = HelpTyper(
    name="sandport",
    help="Reach every port of every sandbox: host port forwards, a browser desktop (noVNC) "
    "and a WebSocket bridge, with readiness proven through the path you use.",
    add_completion=False,
    pretty_exceptions_enable=False,
    # Click wraps the usage line at 78 columns unless told the terminal may be wider.
    context_settings={"max_content_width": 240},
)

# Commands first, in the order --help lists them; then the groups.
app.command()(up.up)
app.command("ws", help=ws.WS_HELP, cls=ws.WsCommand)(ws.ws_command)
app.command()(sandboxes.attach)
app.command()(sandboxes.detach)
app.command()(sandboxes.retarget)
app.command()(doctor.doctor)
app.add_typer(forwards.forward_app, name="forward")
app.add_typer(sandboxes.sandbox_app, name="sandbox")
app.add_typer(sandboxes.token_app, name="token")
app.add_typer(images.image_app, name="image")


@app.command()
def version() -> None:
    """Print sandport's version."""
    out.print(__version__)


def main() -> None:
    """Entry point of the ``sandport`` command."""
    app()
