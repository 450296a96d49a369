"""The shape of every control-message body the tree protocol reads: one check per type.

A body that breaks its rule is counted and dropped *before* any handler looks
at it, so no handler half-changes its state on a bad field and no exception
escapes into the PlaneLoop (which would drop the rest of the batch).  Fields
that are absent keep the handlers' defaults; fields that are present must have
the right type.  The fuzzers in tests/fuzz found each rule here.
"""

from __future__ import annotations

from typing import Any, Callable

from bus import protocol as p
from bus.policy import POLICIES

__all__ = ["check_body"]

U32 = 0xFFFFFFFF


def _u32(v) -> bool:
    return type(v) is int and 0 <= v <= U32


def _int(v) -> bool:
    return type(v) is int and -(1 << 62) < v < (1 << 62)


def _num(v) -> bool:
    return type(v) in (int, float) and v == v and abs(v) < 1e12


def _str(v) -> bool:
    return isinstance(v, str)


def _opt_str(v) -> bool:
    return v is None or isinstance(v, str)


def _ids(v) -> bool:
    return isinstance(v, list) and all(_u32(i) for i in v)


def _map(v) -> bool:
    return isinstance(v, dict)


def _opt_u32(v) -> bool:
    return v is None or _u32(v)


def _cfg(v) -> bool:
    return (isinstance(v, dict) and type(v.get("k")) is int and 1 <= v["k"] <= 100000
            and v.get("pol") in POLICIES and _num(v.get("hb")) and v["hb"] > 0
            and type(v.get("mi")) is int and 1 <= v["mi"] <= 100)


def _groups(v) -> bool:
    return isinstance(v, list) and all(
        isinstance(g, list) and len(g) == 3 and isinstance(g[0], bytes) and _ids(g[2]) for g in v)


def _missing(v) -> bool:
    return isinstance(v, list) and all(isinstance(m, list) and len(m) == 2 and _u32(m[0]) and _str(m[1])
                                       for m in v)


def _opt_ids(v) -> bool:
    return v is None or _ids(v)


Rule = dict[str, Callable[[Any], bool]]
_ROUTES: Rule = {"ids": _ids, "h": _int, "reason": _str, "dead": _opt_u32}
RULES: dict[int, tuple[Rule, tuple[str, ...]]] = {
    # type: ({field: check}, required fields)
    p.MsgType.JOIN: ({"id": _u32, "name": _str, "ctl": _str, "data": _str, "sub": _ids, "attrs": _map,
                      "pid": _int}, ()),
    p.MsgType.JOIN_ACCEPT: ({"id": _u32, "parent": _u32, "depth": _int, "gp": _opt_str, "pdata": _opt_str,
                             "rep": _opt_str, "rid": _u32, "ep": _int, "path": _ids, "cfg": _cfg},
                            ("id", "parent", "depth")),
    p.MsgType.JOIN_REDIRECT: ({"to": _opt_str, "id": _u32}, ()),
    p.MsgType.JOIN_REJECT: ({"reason": _opt_str}, ()),
    p.MsgType.LEAVE: ({"id": _u32}, ()),
    p.MsgType.HEARTBEAT: ({"path": _ids, "d": _int, "gp": _opt_str, "rep": _opt_str, "ep": _int}, ()),
    p.MsgType.ROUTE_ADD: (_ROUTES, ()),
    p.MsgType.ROUTE_SYNC: (_ROUTES, ()),
    p.MsgType.ROUTE_LOST: (_ROUTES, ()),
    p.MsgType.REGISTER: ({"id": _u32, "name": _str, "parent": _u32, "ctl": _str, "data": _str, "attrs": _map,
                          "pid": _int, "reason": _str, "orphaned_for": _num}, ()),
    p.MsgType.REGISTER_ACK: ({"ep": _int}, ()),
    p.MsgType.COMMAND: ({"op": _str, "a": _map, "rem": _num, "ids": _opt_ids}, ()),
    p.MsgType.REPLY: ({"g": _groups, "m": _missing}, ()),
}


def check_body(msg_type: int, body) -> str | None:
    """None if ``body`` may be handled, else why not (one short phrase)."""
    rule = RULES.get(msg_type)
    if rule is None:
        return None  # not a tree message (e.g. LOAD_REPORT, checked by its own handler)
    if not isinstance(body, dict):
        return f"{p.MsgType(msg_type).name} body is a {type(body).__name__}, not a map"
    fields, required = rule
    for name in required:
        if name not in body:
            return f"{p.MsgType(msg_type).name} without {name!r}"
    for name, ok in fields.items():
        if name in body and not ok(body[name]):
            return f"{p.MsgType(msg_type).name} field {name!r} has a bad value"
    return None
