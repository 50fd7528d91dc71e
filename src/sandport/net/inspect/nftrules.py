"""Which nftables rules drop or reject an address: reads ``nft -j list ruleset``.

Owns :class:`NftRuleRef` and :func:`rules_dropping`, with the matching of nft JSON
right-hand sides (addresses, prefixes, ranges, anonymous and named sets) and the short
rendering of a rule. It only reads the ruleset: it must not change rules, and must not
touch sockets, ICMP, links or neighbours (the sibling modules of
:mod:`sandport.net.inspect`).

Sources:
    * nftables JSON: ``libnftables-json(5)``.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import shutil
import subprocess
from dataclasses import dataclass
from typing import Any, Final

__all__ = ["NftRuleRef", "rules_dropping"]

log = logging.getLogger(__name__)

# --- nftables ---------------------------------------------------------------------------

NFT_TIMEOUT: Final = 5.0
#: Our own tables: their drops are the guard's (host isolation, anti-spoofing), which the
#: doctor reads from their counters, not from the rules.
OWN_TABLES: Final = (("ip", "sandport"), ("bridge", "sandport"))
_DROP_VERDICTS: Final = ("drop", "reject")
_POSITIVE_OPS: Final = ("==", "in")
_TEXT_MAX: Final = 200

IPv4Net = ipaddress.IPv4Network


@dataclass(frozen=True, slots=True, kw_only=True)
class NftRuleRef:
    """An nftables rule that drops or rejects traffic of some address.

    Attributes:
        family: Table family (``ip``, ``inet``, ...).
        table: Table name.
        chain: Chain name.
        handle: Rule handle (``nft delete rule FAMILY TABLE CHAIN handle N``).
        verdict: ``"drop"`` or ``"reject"``.
        text: A short human rendering such as ``ip daddr 10.201.0.5 drop`` (close to, but
            not necessarily exactly, nft's own syntax).
    """

    family: str
    table: str
    chain: str
    handle: int
    verdict: str
    text: str


def _ruleset() -> list[dict[str, Any]]:
    """The objects of ``nft -j list ruleset``; [] if nft is missing or fails."""
    nft = shutil.which("nft")
    if nft is None:
        log.debug("nft not found: no rules to inspect")
        return []
    try:
        r = subprocess.run([nft, "-j", "list", "ruleset"], capture_output=True, text=True,
                           timeout=NFT_TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("nft -j list ruleset failed: %s", exc)
        return []
    if r.returncode != 0:
        log.warning("nft -j list ruleset failed: %s", r.stderr.strip())
        return []
    try:
        doc = json.loads(r.stdout)
    except ValueError as exc:
        log.warning("nft -j list ruleset printed no JSON: %s", exc)
        return []
    items = doc.get("nftables", []) if isinstance(doc, dict) else []
    return [item for item in items if isinstance(item, dict)]


def _contains(value: Any, address: ipaddress.IPv4Address,
              named_sets: dict[str, list[Any]]) -> bool:
    """Whether an nft JSON right-hand side (address, prefix, range, set) contains ``address``.

    Args:
        value: The ``right`` of a ``match`` or one set element.
        address: The address looked for.
        named_sets: Elements of the named sets of the rule's table, by name.
    """
    if isinstance(value, str):
        if value.startswith("@"):
            return any(_contains(e, address, {}) for e in named_sets.get(value[1:], []))
        with contextlib.suppress(ValueError):
            return ipaddress.IPv4Address(value) == address
        return False
    if not isinstance(value, dict):
        return False
    if "prefix" in value:
        prefix = value["prefix"]
        with contextlib.suppress(ValueError, TypeError, KeyError):
            return address in IPv4Net(f"{prefix['addr']}/{prefix['len']}", strict=False)
        return False
    if "range" in value:
        with contextlib.suppress(ValueError, TypeError, IndexError):
            low, high = (ipaddress.IPv4Address(v) for v in value["range"][:2])
            return low <= address <= high
        return False
    if "set" in value:
        elements = value["set"]
        elements = elements if isinstance(elements, list) else [elements]
        return any(_contains(e, address, named_sets) for e in elements)
    if "elem" in value:  # a set element with options: {"elem": {"val": ..., "timeout": ...}}
        elem = value["elem"]
        return isinstance(elem, dict) and _contains(elem.get("val"), address, named_sets)
    return False


def _mentions(expr: list[Any], address: ipaddress.IPv4Address,
              named_sets: dict[str, list[Any]]) -> bool:
    """Whether the rule's ``ip saddr`` or ``ip daddr`` matches select ``address``.

    For one of the two fields, there must be a positive match (``==``) that contains the
    address and no match on that field that rules it out (``!= 10.0.0.7``, or a second
    positive match that does not contain it): ``ip daddr != 10.0.0.7 ip daddr 10.0.0.0/24
    drop`` drops 10.0.0.5, not 10.0.0.7.
    """
    for field in ("saddr", "daddr"):
        selected = None
        for stmt in expr:
            match = stmt.get("match") if isinstance(stmt, dict) else None
            if not isinstance(match, dict):
                continue
            left = match.get("left")
            payload = left.get("payload") if isinstance(left, dict) else None
            if not (isinstance(payload, dict) and payload.get("protocol") == "ip"
                    and payload.get("field") == field):
                continue
            inside = _contains(match.get("right"), address, named_sets)
            if match.get("op", "==") in _POSITIVE_OPS:
                selected = inside and selected is not False
            elif inside:  # a negated match that names the address: the rule spares it
                selected = False
        if selected:
            return True
    return False


def _verdict(expr: list[Any]) -> str | None:
    """``"drop"`` or ``"reject"`` if a top-level statement of the rule is one."""
    for stmt in expr:
        if isinstance(stmt, dict):
            for verdict in _DROP_VERDICTS:
                if verdict in stmt:
                    return verdict
    return None


def _render_value(value: Any) -> str:
    if isinstance(value, str | int | float):
        return str(value)
    if isinstance(value, list):
        return " . ".join(_render_value(v) for v in value)
    if isinstance(value, dict):
        if "prefix" in value and isinstance(value["prefix"], dict):
            return f"{value['prefix'].get('addr')}/{value['prefix'].get('len')}"
        if "range" in value and isinstance(value["range"], list):
            return "-".join(_render_value(v) for v in value["range"])
        if "set" in value:
            elements = value["set"] if isinstance(value["set"], list) else [value["set"]]
            return "{ " + ", ".join(_render_value(e) for e in elements) + " }"
        if "elem" in value and isinstance(value["elem"], dict):
            return _render_value(value["elem"].get("val"))
        if "payload" in value and isinstance(value["payload"], dict):
            p = value["payload"]
            return f"{p.get('protocol', '')} {p.get('field', '')}".strip()
        if len(value) == 1:
            key, inner = next(iter(value.items()))
            if isinstance(inner, dict) and "key" in inner:  # meta, ct, ...
                return f"{key} {inner['key']}"
            return str(key)
    return json.dumps(value, separators=(",", ":"))


def _render(expr: list[Any]) -> str:
    """A short human rendering of a rule's statements."""
    parts: list[str] = []
    for stmt in expr:
        if not isinstance(stmt, dict) or not stmt:
            continue
        key, body = next(iter(stmt.items()))
        if key == "match" and isinstance(body, dict):
            op = body.get("op", "==")
            shown_op = "" if op in _POSITIVE_OPS else f"{op} "
            parts.append(f"{_render_value(body.get('left'))} {shown_op}"
                         f"{_render_value(body.get('right'))}")
        elif key == "reject" and isinstance(body, dict) and body.get("expr"):
            parts.append(f"reject with {body.get('type', 'icmp')} {body['expr']}")
        else:
            parts.append(key)
    text = " ".join(parts)
    return text if len(text) <= _TEXT_MAX else text[: _TEXT_MAX - 1] + "…"


def rules_dropping(address: str) -> list[NftRuleRef]:
    """Every nftables rule that drops or rejects traffic from or to the IPv4 ``address``.

    A rule counts when a top-level statement is ``drop`` or ``reject`` and its matches on
    ``ip saddr`` (or on ``ip daddr``) select ``address``: a positive match contains it (the
    address itself, a prefix, a range, or an anonymous or named set holding one of these)
    and no negated match (``!=``) on the same field excludes it. Other matches of the rule
    (ports, interfaces) are not evaluated, chain policies are not considered, and the
    tables ``ip sandport`` and ``bridge sandport`` (ours) are skipped.

    Args:
        address: An IPv4 address.

    Returns:
        The rules in ruleset order; [] if ``nft`` is missing or fails, or ``address`` is not
        an IPv4 address.
    """
    try:
        wanted = ipaddress.IPv4Address(address)
    except ValueError:
        return []
    items = _ruleset()
    named_sets: dict[tuple[str, str], dict[str, list[Any]]] = {}
    for item in items:
        nft_set = item.get("set")
        if isinstance(nft_set, dict) and isinstance(nft_set.get("elem"), list):
            key = (str(nft_set.get("family")), str(nft_set.get("table")))
            named_sets.setdefault(key, {})[str(nft_set.get("name"))] = nft_set["elem"]
    found: list[NftRuleRef] = []
    for item in items:
        rule = item.get("rule")
        if not isinstance(rule, dict) or not isinstance(rule.get("expr"), list):
            continue
        family, table = str(rule.get("family", "")), str(rule.get("table", ""))
        if (family, table) in OWN_TABLES:
            continue
        expr = rule["expr"]
        verdict = _verdict(expr)
        if verdict is None or not _mentions(expr, wanted, named_sets.get((family, table), {})):
            continue
        found.append(NftRuleRef(family=family, table=table, chain=str(rule.get("chain", "")),
                                handle=int(rule.get("handle", 0)), verdict=verdict,
                                text=_render(expr)))
    return found
