"""``sandport doctor``: walk the path of a connection hop by hop and name the broken hop.

The path (see the design brief) is walked in order, for a sandbox and each port it exposes::

    gateway ─► route ─► host network ─► guest reachability ─► guest service ─► end to end

1. **gateway**: the process, and the listener of every forward where the store says it is
   (who holds the port if not us);
2. **route**: the sandbox, the port and the token are known; the token is valid and in
   scope; a sandbox that was deleted says when;
3. **host network**: the bridge exists with the pool's address; the sandbox's link (veth or
   TAP) exists, is up and is a port of the bridge; the nft DNAT rules a kernel forward
   needs (prerouting and output, ``route_localnet``); sandport's own guard is in place
   (host isolation: what sandboxes reach on the host; anti-spoofing on the sandbox's
   port) with what it dropped; no nft rule elsewhere drops the guest's address;
4. **guest reachability**: an ICMP echo to the guest, explained with its ARP state (and
   with the frames anti-spoofing dropped, when the guest sends as someone else);
5. **guest service**: each port answers its protocol at the guest's address (an RFB
   handshake with the stored password, an HTTP status, the agent's ``/health``);
6. **end to end**: the same through the user's path: each host forward, and for a desktop
   the WebSocket bridge.

Each check is a :class:`Row`: hop, check, status (``ok``, ``fail``, ``warn``, ``skip``),
the evidence, and for a failure the likely cause and fix in a sentence. Once a check fails,
the later hops of that port are skipped (a row each, saying why): the first failure is the
broken hop. :func:`diagnose` walks it from what the gateway knows (a :class:`Subject`);
the CLI adds the gateway's own rows (process up, API answering) from outside.

The JSON form (:meth:`Report.as_json`) is described by ``docs/doctor.schema.json``.

The package: :mod:`~sandport.doctor.model` (the plain data) and
:mod:`~sandport.doctor.walk` (the checks and their words).
"""


from sandport.doctor.model import (
    HOPS,
    PORT_FORM,
    PORT_FORMS,
    PROBE_TIMEOUT,
    SCHEMA_VERSION,
    ForwardFacts,
    IsolationFacts,
    PortFacts,
    Report,
    Row,
    Subject,
    TokenFacts,
    Walk,
    check_port,
)
from sandport.doctor.walk import diagnose

__all__ = [
    "HOPS",
    "PORT_FORM",
    "PORT_FORMS",
    "PROBE_TIMEOUT",
    "SCHEMA_VERSION",
    "ForwardFacts",
    "IsolationFacts",
    "PortFacts",
    "Report",
    "Row",
    "Subject",
    "TokenFacts",
    "Walk",
    "check_port",
    "diagnose",
]
