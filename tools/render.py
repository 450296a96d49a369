"""Human renderings of control-API results: node-name ranges, ``exec`` and ``status``.

Pure functions over the result dicts (no I/O, no heavy imports): ``bus-ctl exec``
imports this module on its hot path.
"""

from __future__ import annotations

import re
import time

__all__ = [
    "natural_key",
    "compact_names",
    "expand_names",
    "format_exec",
    "exec_failed",
    "format_status",
    "format_age",
    "state_counts",
    "FAILURE_EVENTS",
]

#: Event kinds shown by ``status`` as failures and repairs ("joined" is routine).
FAILURE_EVENTS = ("lost", "rejoined", "left", "replaced")

_DIGITS = re.compile(r"(\d+)")
# head, the last run of digits outside brackets, and a tail with no such digits.
_FIRST_OF_RANGE = re.compile(r"\[(\d+)[^\]]*\]")
_LAST_NUM = re.compile(r"^(.*?)(\d+)((?:[^\d\[\]]|\[[^\]]*\])*)$")


def natural_key(name: str) -> tuple:
    """Sort key ordering ``node-2`` before ``node-10``."""
    return tuple((0, int(p), p) if p.isdigit() else (1, 0, p) for p in _DIGITS.split(name) if p)


def _width(digits: str) -> int:
    # Zero-padded numbers keep their width; unpadded ones merge across widths (9, 10).
    return len(digits) if len(digits) > 1 and digits[0] == "0" else 0


def _ranges(numbers: list[str]) -> str:
    nums = sorted(set(numbers), key=lambda d: (int(d), d))
    runs: list[list[str]] = []
    for d in nums:
        if runs and int(d) == int(runs[-1][-1]) + 1 and _width(d) == _width(runs[-1][-1]):
            runs[-1].append(d)
        else:
            runs.append([d])
    return ",".join(r[0] if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in runs)


def _compact_pass(items: list[str]) -> list[str]:
    groups: dict[tuple[str, str], list[str]] = {}
    out: list[str] = []
    for item in items:
        m = _LAST_NUM.match(item)
        if m is None:
            out.append(item)
        else:
            groups.setdefault((m.group(1), m.group(3)), []).append(m.group(2))
    for (head, tail), numbers in groups.items():
        if len(set(numbers)) == 1:
            out.append(f"{head}{numbers[0]}{tail}")
        else:
            out.append(f"{head}[{_ranges(numbers)}]{tail}")
    return sorted(out, key=_range_key)


def _range_key(item: str) -> tuple:
    # Order a range by its first member: "vm-[0-1]-[0-4]" sorts as "vm-0-0".
    return natural_key(_FIRST_OF_RANGE.sub(r"\1", item))


def compact_names(names) -> str:
    """``["node-0", "node-1", "node-2", "node-3", "node-7"]`` -> ``"node-[0-3,7]"``.

    Names sharing everything but their last number merge into a bracketed range
    list (pdsh hostlist style); a second pass merges the number before that, so
    ``vm-0-0 .. vm-2-4`` becomes ``vm-[0-2]-[0-4]`` when the result is exact.
    """
    items = sorted(set(names), key=natural_key)
    for _ in range(4):
        nxt = _compact_pass(items)
        if nxt == items:
            break
        items = nxt
    return ",".join(items)


def _split_top(text: str) -> list[str]:
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p for p in parts if p]


def _expand_one(pattern: str) -> list[str]:
    m = re.search(r"\[([^\]]*)\]", pattern)
    if m is None:
        return [pattern]
    head, tail = pattern[: m.start()], pattern[m.end() :]
    out = []
    for part in m.group(1).split(","):
        lo, _, hi = part.partition("-")
        hi = hi or lo
        width = len(lo) if _width(lo) else 0
        for n in range(int(lo), int(hi) + 1):
            out.extend(_expand_one(f"{head}{n:0{width}d}{tail}"))
    return out


def expand_names(text: str) -> list[str]:
    """The inverse of :func:`compact_names`: ``"node-[0-2]"`` -> ``["node-0", "node-1", "node-2"]``."""
    out: list[str] = []
    for part in _split_top(text):
        out.extend(_expand_one(part))
    return out


# --------------------------------------------------------------------------- exec


def exec_failed(result: dict) -> bool:
    """True if any node exited non-zero or did not answer."""
    return bool(result.get("missing")) or any(g.get("rc", 0) != 0 for g in result.get("groups", ()))


def _group_order(group: dict) -> tuple:
    nodes = group.get("nodes") or []
    first = min(nodes, key=natural_key) if nodes else ""
    return (group.get("rc", 0) != 0, -len(nodes), natural_key(first))


def format_exec(result: dict) -> tuple[str, str]:
    """``(stdout text, stderr text)`` for an ``exec`` result, dshbak -c style.

    Identical outputs are printed once under a header naming their nodes in
    compact ranges, with the exit code when it is not zero.  The second text
    lists every node that did not answer, with its reason, and a summary line.
    """
    rule = "-" * 16
    out: list[str] = []
    for group in sorted(result.get("groups", ()), key=_group_order):
        nodes = group.get("nodes") or []
        header = f"{compact_names(nodes)} ({len(nodes)})"
        rc = group.get("rc", 0)
        if rc != 0:
            header += f"  exit {rc}"
        out += [rule, header, rule]
        stdout, stderr = group.get("stdout") or "", group.get("stderr") or ""
        if stdout:
            out.append(stdout.rstrip("\n"))
        if stderr:
            out += [f"[stderr] {line}" for line in stderr.rstrip("\n").split("\n")]
        if not stdout and not stderr:
            out.append("(no output)")
    err: list[str] = []
    missing = result.get("missing") or []
    if missing:
        by_reason: dict[str, list[str]] = {}
        for m in missing:
            by_reason.setdefault(m.get("reason") or "no reason given", []).append(m.get("node", "?"))
        parts = [
            f"{compact_names(names)} ({reason})"
            for reason, names in sorted(by_reason.items(), key=lambda kv: (-len(kv[1]), kv[0]))
        ]
        err.append("did not answer: " + ", ".join(parts))
    failed = sum(len(g.get("nodes") or []) for g in result.get("groups", ()) if g.get("rc", 0) != 0)
    expected = result.get("expected", 0)
    answered = result.get("answered", 0)
    summary = f"{answered} of {expected} nodes answered in {result.get('elapsed', 0.0):.2f}s"
    if failed:
        summary += f", {failed} exited non-zero"
    if missing:
        summary += f", {len(missing)} did not answer"
    err.append(summary)
    return ("\n".join(out) + "\n" if out else ""), "\n".join(err) + "\n"


# --------------------------------------------------------------------------- status


def format_age(seconds) -> str:
    """``0.4s``, ``12s``, ``3m05s``, ``2h10m``; ``-`` when unknown."""
    if seconds is None:
        return "-"
    s = float(seconds)
    if s < 10:
        return f"{s:.1f}s"
    if s < 60:
        return f"{s:.0f}s"
    if s < 3600:
        return f"{int(s // 60)}m{int(s % 60):02d}s"
    return f"{int(s // 3600)}h{int(s % 3600 // 60):02d}m"


def state_counts(members) -> str:
    """``", 2 dead, 5 unreachable"``: the members that are not alive, by state ("" if none)."""
    counts: dict[str, int] = {}
    for m in members:
        state = str(m.get("state", "unknown"))
        if state != "alive":
            counts[state] = counts.get(state, 0) + 1
    return "".join(f", {n} {state}" for state, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def _table(headers: list[str], rows: list[list[str]], right: set[int]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]

    def line(cells):
        return "  ".join(
            c.rjust(widths[i]) if i in right else c.ljust(widths[i]) for i, c in enumerate(cells)
        ).rstrip()

    return [line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)]


def format_status(status: dict, *, events: int = 10, now: float | None = None) -> str:
    """The ``bus-ctl status`` text: member table, summary, recent failures and repairs."""
    root = status.get("root") or {}
    members = status.get("members") or []
    root_id = root.get("id", 1)
    names = {m.get("id"): m.get("name", "?") for m in members}
    names[root_id] = root.get("name", "manager")
    rows = []
    for m in sorted(members, key=lambda m: natural_key(str(m.get("name", "")))):
        parent = m.get("parent")
        rows.append(
            [
                str(m.get("name", "?")),
                str(m.get("id", "?")),
                str(m.get("depth", "?")),
                "-" if parent is None else str(names.get(parent, parent)),
                str(m.get("children", 0)),
                format_age(m.get("last_heard")),
                str(m.get("state", "?")),
            ]
        )
    lines = _table(
        ["NAME", "ID", "DEPTH", "PARENT", "CHILDREN", "LAST HEARD", "STATE"], rows, right={1, 2, 4, 5}
    )
    if not members:
        lines.append("(no members: start nodes with `bus-ctl up` or `bus-node --join ENDPOINT`)")

    alive = [m for m in members if m.get("state") == "alive"]
    max_depth = max((m.get("depth", 0) for m in members), default=0)
    root_fanout = sum(1 for m in alive if m.get("parent") in (root_id, None))
    fanouts = [root_fanout] + [m.get("children", 0) for m in members if m.get("children", 0) > 0]
    fanouts = [f for f in fanouts if f > 0]
    mean = sum(fanouts) / len(fanouts) if fanouts else 0.0
    lines.append("")
    lines.append(
        f"{len(members)} members ({len(alive)} alive{state_counts(members)}), max depth {max_depth}, "
        f"fanout: root {root_fanout}, max {max(fanouts, default=0)}, mean {mean:.1f} "
        f"over {len(fanouts)} inner nodes"
    )
    lines.append(
        f"root {root.get('name', 'manager')} [{root_id}] at {root.get('control', '?')} "
        f"(max_children {root.get('max_children', '?')}, policy {root.get('policy', '?')})"
    )
    counters = status.get("counters") or {}
    if counters:
        lines.append("counters: " + ", ".join(f"{k} {v}" for k, v in sorted(counters.items())))

    recent = [e for e in status.get("events") or [] if e.get("kind") in FAILURE_EVENTS]
    recent = sorted(recent, key=lambda e: e.get("t", 0))[-events:] if events else []
    lines.append("")
    if not recent:
        lines.append("no failures or repairs recorded")
    else:
        now = time.time() if now is None else now
        lines.append("recent failures and repairs:")
        for e in recent:
            t = e.get("t", 0)
            stamp = time.strftime("%H:%M:%S", time.localtime(t))
            detail = f": {e['detail']}" if e.get("detail") else ""
            lines.append(
                f"  {stamp} ({format_age(max(0.0, now - t))} ago)  {e.get('kind', '?'):<8} "
                f"{e.get('node', '?')}{detail}"
            )
    return "\n".join(lines) + "\n"
