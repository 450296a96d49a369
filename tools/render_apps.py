"""Text for people from the manager's application results (pure functions, no I/O)."""

from __future__ import annotations

__all__ = ["format_services", "format_progress", "format_summary", "format_apps", "format_app_status", "format_logs",
           "next_offsets", "format_done"]

BAR = 24


def _bar(done: int, failed: int, total: int) -> str:
    if total <= 0:
        return "[" + " " * BAR + "]"
    d = round(BAR * done / total)
    f = min(BAR - d, round(BAR * failed / total))
    return "[" + "#" * d + "x" * f + "." * (BAR - d - f) + "]"


def _total(prog: dict, ph: dict) -> int:
    return len(prog.get("assignment", {}).get(ph.get("component"), [])) or len(ph.get("done", []))


def format_progress(prog: dict) -> str:
    """One line per phase: a bar and done/failed/pending counts."""
    phases = prog.get("phases", [])
    width = max([len(p["key"]) for p in phases] + [8])
    lines = []
    for ph in phases:
        total = _total(prog, ph)
        done, failed = len(ph.get("done", [])), len(ph.get("failed", {}))
        pending = max(total - done - failed, 0)
        lines.append(f"{ph['key']:<{width}} {_bar(done, failed, total)} {done} done, {failed} failed, "
                     f"{pending} pending  ({ph.get('state')})")
    return "\n".join(lines) + ("\n" if lines else "")


def format_summary(prog: dict) -> str:
    nodes = sorted({n for names in prog.get("assignment", {}).values() for n in names})
    out = [f"{prog['name']} (gen {prog.get('gen')}): {prog['phase']} on {len(nodes)} node(s)"]
    for old, new in sorted((prog.get("replaced") or {}).items()):
        out.append(f"  {old} was replaced by spare {new}")
    for ph in prog.get("phases", []):
        for node, why in sorted((ph.get("failed") or {}).items()):
            out.append(f"  FAILED {ph['key']} on {node}: {why}")
    if prog.get("error"):
        out.append(f"error: {prog['error']}")
    return "\n".join(out) + "\n"


def format_apps(res: dict) -> str:
    rows = res.get("apps", [])
    if not rows:
        return "no applications deployed\n"
    width = max(len(r["name"]) for r in rows)
    lines = [f"{'APP':<{width}}  {'PHASE':<10} GEN NODES"]
    for r in rows:
        lines.append(f"{r['name']:<{width}}  {r['phase']:<10} {r['gen']:>3} {len(r['nodes'])} "
                     f"({', '.join(r['nodes'][:6])}{', ...' if len(r['nodes']) > 6 else ''})")
        if r.get("error"):
            lines.append(f"{'':<{width}}  error: {r['error']}")
    return "\n".join(lines) + "\n"


def format_app_status(res: dict) -> str:
    out = [f"{res['name']} (gen {res.get('gen')}): {res['phase']}"]
    if res.get("error"):
        out.append(f"error: {res['error']}")
    out.append(format_progress(res).rstrip("\n"))
    rows = res.get("processes", [])
    if rows:
        out.append("")
        out.append(f"{'COMPONENT':<12} {'NODE':<14} {'PROCESS':<14} {'STATE':<11} {'PID':>7} {'RESTARTS':>8} "
                   f"{'EXIT':>5}  REASON")
        for r in sorted(rows, key=lambda r: (str(r.get("component")), r["node"], r.get("name", ""))):
            if "error" in r:
                out.append(f"{str(r.get('component')):<12} {r['node']:<14} error: {r['error']}")
                continue
            pid = r.get("pid") if r.get("pid") is not None else "-"
            code = r.get("exit_code") if r.get("exit_code") is not None else "-"
            out.append(f"{str(r.get('component')):<12} {r['node']:<14} {r['name']:<14} {r['state']:<11} "
                       f"{pid:>7} {r.get('restarts', 0):>8} {code:>5}  {r.get('reason', '')}")
    for m in res.get("missing", []):
        out.append(f"{m['node']}: did not answer ({m['reason']})")
    return "\n".join(out) + "\n"


def format_logs(res: dict, prefix: bool = False) -> str:
    """Logs grouped like ``dshbak -c``: identical text from several nodes is printed once."""
    groups: dict[tuple, list] = {}
    for node, procs in sorted((res.get("logs") or {}).items()):
        if isinstance(procs, dict) and "error" in procs:
            groups.setdefault(("error", procs["error"]), []).append(node)
            continue
        for proc, item in sorted(procs.items()):
            if item.get("text"):
                groups.setdefault((proc, item["text"]), []).append(node)
    out = []
    for (proc, text), nodes in groups.items():
        if prefix:
            for line in text.splitlines():
                out.append(f"{','.join(nodes)} {proc}| {line}")
        else:
            out.append(f"---- {', '.join(nodes)} : {proc} ----")
            out.append(text.rstrip("\n"))
    for m in res.get("missing", []):
        out.append(f"{m['node']}: did not answer ({m['reason']})")
    return "\n".join(out) + ("\n" if out else "")


def next_offsets(res: dict, offsets: dict) -> dict:
    """Offsets to ask for next time with ``--follow``: {node: {process: offset}}."""
    new = {n: dict(v) for n, v in offsets.items()}
    for node, procs in (res.get("logs") or {}).items():
        if isinstance(procs, dict) and "error" not in procs:
            for proc, item in procs.items():
                new.setdefault(node, {})[proc] = item.get("offset", 0)
    return new


def format_done(res: dict, verb: str) -> str:
    out = []
    if res.get("done"):
        out.append(f"{res['app']}: {verb} on {len(res['done'])} node(s)")
    for node, why in sorted((res.get("failed") or {}).items()):
        out.append(f"{node}: failed: {why}")
    for m in res.get("missing", []):
        out.append(f"{m['node']}: did not answer ({m['reason']})")
    if not out:
        out.append(f"{res['app']}: nothing to do")
    return "\n".join(out) + "\n"


def format_services(res: dict, events: int = 10) -> str:
    """``bus-ctl services``: per service, its instances with queues, then recent spawns and reaps."""
    out = []
    for svc in res.get("services", []):
        out.append(f"service {svc['name']} (app {svc['app']})")
        for c in svc.get("classes", []):
            out.append(f"  {c['worker']}: min {c['min']} max {c['max'] or '-'} H {c['high_water']:g}"
                       f"{'  pending ' + ', '.join(c['pending']) if c['pending'] else ''}  ({c['decision']})")
        out.append(f"  {'INSTANCE':<34} {'NODE':<8} {'QUEUE':>5} {'BUSY':>4} {'SMOOTHED':>8} {'COST ms':>8} "
                   f"{'DONE':>6} {'CRASHES':>7}")
        for i in svc.get("instances", []):
            flag = " (overflow)" if i.get("overflow") else ""
            if i.get("cache"):
                out.append(f"  {i['id']:<34} {i['node']:<8} cache: {i.get('bytes', 0)} bytes, "
                           f"{i.get('hits', 0)} hits, {i.get('misses', 0)} misses")
                continue
            out.append(f"  {i['id']:<34} {i['node']:<8} {i['q']:>5} {i['busy']:>4} {i['smoothed']:>8.2f} "
                       f"{i['cost'] * 1000:>8.1f} {i.get('done', 0):>6} {i.get('crashes', 0):>7}{flag}")
    if not res.get("services"):
        out.append("no services running")
    recent = [e for e in res.get("events", []) if e["kind"] in ("spawn", "reap", "lost", "failed")][-events:]
    if recent:
        out.append("recent:")
        out.extend(f"  {e['kind']:<6} {e['detail']}" for e in recent)
    return "\n".join(out) + "\n"
