"""The manager's control API: every command defined once.

A command is a name, a docstring describing its request and result, and an
async handler ``(manager, args) -> result``.  bus-ctl sends ``CTL_REQUEST
{"cmd", "args"}`` and gets ``CTL_REPLY {"ok": True, "result"}`` or ``{"ok":
False, "error", "code"}``; ``tools/`` renders results for people.
"""

from __future__ import annotations

import os
from typing import Awaitable, Callable

from bus import policy
from core.errors import BusError

__all__ = ["COMMANDS", "CommandError", "command", "BAD_SELECTOR", "BAD_ARGS", "UNKNOWN_COMMAND", "FAILED"]

BAD_SELECTOR = "BAD_SELECTOR"
BAD_ARGS = "BAD_ARGS"
UNKNOWN_COMMAND = "UNKNOWN_COMMAND"
FAILED = "FAILED"


class CommandError(BusError):
    """A request the manager refuses; ``code`` is one of the names above."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


Handler = Callable[..., Awaitable[object]]
COMMANDS: dict[str, Handler] = {}


def command(fn: Handler) -> Handler:
    COMMANDS[fn.__name__.removeprefix("cmd_")] = fn
    return fn


@command
async def cmd_ping(mgr, args: dict) -> dict:
    """``ping`` -> {pid, epoch, uptime, members}: is the manager there, and how big is the tree.

    ``members`` counts live nodes that have registered (a node known only by a
    route, between its ROUTE_ADD and its REGISTER, is not counted yet).
    """
    return {"pid": os.getpid(), "epoch": mgr.root.epoch, "uptime": round(mgr.uptime(), 3),
            "members": sum(1 for m in mgr.membership.alive() if m.name)}


@command
async def cmd_status(mgr, args: dict) -> dict:
    """``status`` -> {root, members: [...], events: [...], counters}: the membership soft state."""
    return mgr.status()


@command
async def cmd_tree(mgr, args: dict) -> dict:
    """``tree`` -> same shape as ``status`` (rendered as a tree by bus-ctl)."""
    return mgr.status()


def _timeout(args: dict, default: float = 10.0) -> float:
    try:
        t = float(args.get("timeout", default))
    except (TypeError, ValueError):
        raise CommandError(BAD_ARGS, "timeout must be a number of seconds") from None
    if not 0 < t <= 3600:
        raise CommandError(BAD_ARGS, "timeout must be between 0 and 3600 seconds")
    return t


def _targets(mgr, selector) -> tuple[list | None, set]:
    """(ids to address or None for all, ids expected to answer).

    Members that died recently (and are not forgotten yet) are expected too, so
    the result names them with their reason instead of leaving a silent gap.
    """
    if selector is not None and not isinstance(selector, str):
        raise CommandError(BAD_SELECTOR, "a selector is a string such as 'web-*' or 'group=web'")
    members = mgr.membership.members
    if selector is None or selector.strip() in ("", "*"):
        return None, set(members)  # everyone: no need to look at names, attributes or states
    known = [{"id": m.id, "name": m.name, "attrs": m.attrs} for m in members.values()]
    expected = set(policy.select(known, selector))
    alive = {m.id for m in mgr.membership.alive()}
    if not expected & alive:
        raise CommandError(BAD_SELECTOR, f"no live node matches the selector {selector!r}")
    return sorted(expected & alive), expected


@command
async def cmd_exec(mgr, args: dict) -> dict:
    """``exec`` {cmd, selector, timeout} -> {groups: [{stdout, stderr, rc, nodes}], missing: [{node, reason}],
    expected, answered, elapsed}: run a shell command on the selected nodes, merged up the tree."""
    cmd = args.get("cmd")
    if not isinstance(cmd, str) or not cmd.strip():
        raise CommandError(BAD_ARGS, "exec needs a command, e.g. bus-ctl exec -- hostname")
    ids, expected = _targets(mgr, args.get("selector"))
    timeout = _timeout(args)
    t0 = mgr.root.clock()
    result = await mgr.root.broadcast("exec", {"cmd": cmd}, ids=ids, timeout=timeout)
    out = mgr.root.outcome(result, expected)
    groups = []
    for g in out["groups"]:
        v = g["value"] if isinstance(g["value"], dict) else {}
        if "error" in v:
            v = {"stdout": "", "stderr": v["error"] + "\n", "rc": 255}
        groups.append({"stdout": v.get("stdout", ""), "stderr": v.get("stderr", ""), "rc": v.get("rc", 255),
                       "nodes": g["nodes"]})
    return {"groups": groups, "missing": out["missing"], "expected": out["expected"], "answered": out["answered"],
            "elapsed": round(mgr.root.clock() - t0, 4)}


@command
async def cmd_broadcast(mgr, args: dict) -> dict:
    """``broadcast`` {op: ping|info, selector, timeout} -> {groups: [{value, nodes}], missing, expected,
    answered, elapsed}: a no-op or info round trip through the whole tree (benchmarks, debugging)."""
    op = args.get("op", "ping")
    if op not in ("ping", "info"):
        raise CommandError(BAD_ARGS, "broadcast op must be ping or info")
    ids, expected = _targets(mgr, args.get("selector"))
    t0 = mgr.root.clock()
    result = await mgr.root.broadcast(op, {}, ids=ids, timeout=_timeout(args))
    out = mgr.root.outcome(result, expected)
    out["elapsed"] = round(mgr.root.clock() - t0, 4)
    return dict(out)


# -- applications (manager/apps.py) ---------------------------------------------------------

def _apps(mgr):
    if mgr.apps is None:
        raise CommandError(FAILED, "this manager runs without a state directory, so it hosts no applications; "
                                   "start it with --state-dir (bus-ctl up does)")
    return mgr.apps


async def _app_call(coro):
    from manager.apps import DeployError

    try:
        return await coro
    except DeployError as e:
        raise CommandError(e.code, str(e)) from None


@command
async def cmd_deploy(mgr, args: dict) -> dict:
    """``deploy`` {spec, spec_file, resources, resources_file, cwd, timeout, force} -> {app, gen, already, phase,
    assignment}: check everything, then deploy in the background (follow it with ``progress``).
    Deploying the same spec and directory again is a no-op while the app is deployed (``already``)."""
    return await _app_call(_apps(mgr).deploy(args))


@command
async def cmd_apps(mgr, args: dict) -> dict:
    """``apps`` -> {apps: [{name, phase, gen, nodes, created, error}]}."""
    return {"apps": _apps(mgr).list()}


@command
async def cmd_progress(mgr, args: dict) -> dict:
    """``progress`` {app} -> {name, phase, error, phases: [{key, state, done, failed}], barriers, events, ...}:
    the manager's record only (no node is asked)."""
    return await _app_call(_sync(_apps(mgr).progress, args.get("app")))


@command
async def cmd_app_status(mgr, args: dict) -> dict:
    """``app_status`` {app, timeout} -> progress plus {processes: [{node, component, name, block, state, pid,
    restarts, exit_code, reason}], missing: [{node, reason}]} asked of the app's nodes."""
    return await _app_call(_apps(mgr).status(args.get("app"), _timeout(args, 5.0)))


@command
async def cmd_logs(mgr, args: dict) -> dict:
    """``logs`` {app, node, process, stream: out|err, offsets: {node: {process: offset}}, limit} ->
    {logs: {node: {process: {text, offset, size}}}, missing}: log bytes from each offset (negative: the tail)."""
    return await _app_call(_apps(mgr).logs(args, _timeout(args, 5.0)))


@command
async def cmd_stop(mgr, args: dict) -> dict:
    """``stop`` {app} -> {app, done, failed, missing}: stop every process (they are not restarted)."""
    return await _app_call(_apps(mgr).stop(args.get("app"), _timeout(args, 30.0)))


@command
async def cmd_start(mgr, args: dict) -> dict:
    """``start`` {app} -> {app, done, failed, missing}: start again what ``stop`` stopped."""
    return await _app_call(_apps(mgr).start(args.get("app"), _timeout(args, 30.0)))


@command
async def cmd_cleanup(mgr, args: dict) -> dict:
    """``cleanup`` {app} -> {app, done, failed, missing, removed}: stop everything and remove the files on
    every node, then forget the app; idempotent."""
    name = args.get("app")
    if not isinstance(name, str) or not name:
        raise CommandError(BAD_ARGS, "cleanup needs an application name")
    return await _app_call(_apps(mgr).cleanup(name, _timeout(args, 30.0)))


@command
async def cmd_services(mgr, args: dict) -> dict:
    """``services`` -> {services: [{name, app, classes: [{worker, min, max, high_water, pending, decision}],
    instances: [{id, w, node, cache, overflow, q, busy, smoothed, cost, heard, done, failed, crashes, ...}]}],
    events: [{t, kind, svc, detail}], counters, subscribers}: the TACC load table and spawn/reap history."""
    return mgr.services.status()


@command
async def cmd_svc_enable(mgr, args: dict) -> dict:
    """``svc_enable`` {svc, worker, enabled: bool} -> {svc, worker, enabled}: disable a TACC worker class
    (its instances are reaped and none is spawned) or enable it again."""
    if not isinstance(args.get("enabled"), bool):
        raise CommandError(BAD_ARGS, "enabled must be true or false")
    try:
        return mgr.services.set_enabled(str(args.get("svc")), str(args.get("worker")), args["enabled"])
    except LookupError as e:
        raise CommandError(BAD_ARGS, str(e).strip('"')) from None


@command
async def cmd_keys(mgr, args: dict) -> dict:
    """``keys`` {op: list|add|accept|revoke, name, key, ref, force} -> the store's answer (see
    :func:`manager.keys.apply_key_command`); a change is pushed down the tree at once (``push``)."""
    if mgr.keys is None:
        raise CommandError(FAILED, "this manager runs --insecure: it has no keys (restart it without --insecure)")
    from bus.security import SecurityError

    try:
        return await mgr.keys.command(args)
    except (SecurityError, ValueError) as e:
        raise CommandError(BAD_ARGS, str(e)) from None


async def _sync(fn, *a):
    return fn(*a)


@command
async def cmd_shutdown(mgr, args: dict) -> dict:
    """``shutdown`` -> {}: stop the manager (nodes keep running and wait for it to return)."""
    mgr.request_stop()
    return {}


async def dispatch(mgr, body: dict) -> dict:
    """Run one request; always returns a CTL_REPLY body."""
    name = body.get("cmd") if isinstance(body, dict) else None
    handler = COMMANDS.get(name) if isinstance(name, str) else None
    if handler is None:
        return {"ok": False, "code": UNKNOWN_COMMAND,
                "error": f"unknown command {name!r}; known: {', '.join(sorted(COMMANDS))}"}
    args = body.get("args") or {}
    if not isinstance(args, dict):
        return {"ok": False, "code": BAD_ARGS, "error": "args must be a map"}
    try:
        return {"ok": True, "result": await handler(mgr, args)}
    except CommandError as e:
        return {"ok": False, "code": e.code, "error": str(e)}
