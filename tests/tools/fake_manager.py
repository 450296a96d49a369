"""A fake manager speaking the real control API over a real zmq ROUTER.

Two uses:

* in-process: ``FakeManager(members=make_members(30))`` serves canned ``ping``,
  ``status``, ``tree``, ``exec`` and ``shutdown`` from a thread (fixture in
  conftest.py); tests can add handlers, delay or drop commands and read the
  requests it received;
* as a process standing in for ``python -m manager`` (same flags): it writes
  ``manager.json`` when ready, counts the nodes that ``fake_node.py`` registers
  (command ``fake_join``) and exits 0 on SIGTERM.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import zmq

from bus import protocol
from bus.protocol import MsgType


class FakeError(Exception):
    """Raised by a handler: the fake answers ``ok: False`` with this code and sentence."""

    def __init__(self, code: str, sentence: str):
        super().__init__(sentence)
        self.code = code


def make_members(n: int, fanout: int = 4, *, dead=(), prefix: str = "node", groups=("web", "db")):
    """``n`` members in a breadth-first tree under root id 1; names in ``dead`` are dead."""
    members = []
    for i in range(n):
        parent = 1 if i < fanout else (i - fanout) // fanout + 2
        members.append({
            "id": i + 2, "name": f"{prefix}-{i}", "parent": parent, "depth": 0,
            "children": 0, "subtree": 1, "control": f"tcp://127.0.0.1:{20000 + i}",
            "data": f"tcp://127.0.0.1:{30000 + i}", "pid": 1000 + i,
            "attrs": {"group": groups[i % len(groups)]} if groups else {},
            "last_heard": 0.25, "state": "dead" if f"{prefix}-{i}" in dead else "alive",
        })
    return _fill(members)


def _fill(members):
    by_id = {m["id"]: m for m in members}
    kids: dict = {}
    for m in members:
        kids.setdefault(m["parent"], []).append(m)
    # Parents come before children in these lists (ids grow with depth): one pass each way.
    for m in sorted(members, key=lambda m: m["id"]):
        parent = by_id.get(m["parent"])
        m["depth"] = parent["depth"] + 1 if parent else 1
        m["children"] = len(kids.get(m["id"], ()))
    for m in sorted(members, key=lambda m: -m["id"]):
        m["subtree"] = 1 + sum(k["subtree"] for k in kids.get(m["id"], ()))
    return members


def fake_exec(name: str, cmd: str):
    """``(stdout, stderr, rc)`` a node would produce for a few well-known commands."""
    if cmd == "true":
        return "", "", 0
    if cmd == "false":
        return "", "", 1
    if cmd == "hostname":
        return f"{name}\n", "", 0
    if cmd.startswith("echo "):
        return cmd[5:] + "\n", "", 0
    return "", f"sh: 1: {cmd.split()[0] if cmd.split() else cmd}: not found\n", 127


class FakeManager:
    """A control-API server in a thread.  ``start()`` binds; ``stop()`` joins and closes."""

    def __init__(self, members=None, *, host="127.0.0.1", max_children=4, policy="randtree",
                 events=None, counters=None, run=fake_exec, timeouts=(), socket_endpoint=None):
        self.members = list(members or [])
        self.max_children = max_children
        self.policy = policy
        self.events = list(events or [])
        self.counters = dict(counters or {"joins": len(self.members)})
        self.run = run
        self.timeouts = set(timeouts)  # node names whose exec "times out"
        self.delay: dict[str, float] = {}  # cmd -> seconds before the reply
        self.drop: set[str] = set()  # cmds never answered
        self.handlers = {
            "ping": self.ping, "status": self.status, "tree": self.status,
            "exec": self.exec, "shutdown": self.shutdown, "fake_join": self.fake_join,
        }
        self.requests: list[tuple[str, dict]] = []
        self.started = time.time()
        self.stopping = threading.Event()
        self._host = host
        self._bind = socket_endpoint
        self._ctx = None
        self._sock = None
        self._thread = None
        self.endpoint = None

    # ---------------------------------------------------------------- handlers

    def ping(self, args):
        return {"pid": os.getpid(), "epoch": 1, "uptime": time.time() - self.started,
                "members": len(self.members)}

    def status(self, args):
        return {
            "root": {"id": 1, "name": "manager", "control": self.endpoint, "data": "tcp://127.0.0.1:1",
                     "max_children": self.max_children, "policy": self.policy},
            "members": [dict(m) for m in self.members],
            "events": list(self.events),
            "counters": dict(self.counters),
        }

    def _select(self, selector):
        if not selector:
            return list(self.members)
        if "=" in selector:
            key, _, value = selector.partition("=")
            chosen = [m for m in self.members if str(m.get("attrs", {}).get(key.strip())) == value.strip()]
        else:
            globs = [g.strip() for g in selector.split(",") if g.strip()]
            chosen = [m for m in self.members if any(fnmatch.fnmatchcase(m["name"], g) for g in globs)]
        if not chosen:
            raise FakeError("BAD_SELECTOR", f"selector {selector!r} matches no node")
        return chosen

    def exec(self, args):
        t0 = time.monotonic()
        chosen = self._select(args.get("selector"))
        groups: dict = {}
        missing = []
        for m in chosen:
            if m.get("state") == "dead":
                missing.append({"node": m["name"], "reason": "dead"})
            elif m["name"] in self.timeouts:
                missing.append({"node": m["name"], "reason": "timed out"})
            else:
                out, err, rc = self.run(m["name"], args.get("cmd", ""))
                groups.setdefault((out, err, rc), []).append(m["name"])
        return {
            "groups": [{"stdout": o, "stderr": e, "rc": rc, "nodes": names}
                       for (o, e, rc), names in groups.items()],
            "missing": missing, "expected": len(chosen),
            "answered": len(chosen) - len(missing), "elapsed": time.monotonic() - t0,
        }

    def shutdown(self, args):
        self.stopping.set()
        return {}

    def fake_join(self, args):
        fanout = self.max_children
        for name in args.get("names", []):
            i = len(self.members)
            self.members.append({
                "id": i + 2, "name": name, "parent": 1 if i < fanout else (i - fanout) // fanout + 2,
                "depth": 0, "children": 0, "subtree": 1, "control": "", "data": "",
                "pid": args.get("pid"), "attrs": {"group": args["group"]} if args.get("group") else {},
                "last_heard": 0.0, "state": "alive",
            })
            self.events.append({"t": time.time(), "kind": "joined", "node": name, "detail": ""})
        _fill(self.members)
        return {"members": len(self.members)}

    # ---------------------------------------------------------------- serving

    def bind(self):
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        if self._bind:
            self._sock.bind(self._bind)
            self.endpoint = self._bind
        else:
            port = self._sock.bind_to_random_port(f"tcp://{self._host}")
            self.endpoint = f"tcp://{self._host}:{port}"
        return self.endpoint

    def start(self):
        self.bind()
        self._thread = threading.Thread(target=self.serve, name="fake-manager", daemon=True)
        self._thread.start()
        return self

    def stop(self):
        self.stopping.set()
        if self._thread is not None:
            self._thread.join(5)
        self.close()

    def close(self):
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def _answer(self, frames):
        ids, msg = frames[:-2], protocol.decode(frames[-2:])
        cmd = (msg.body or {}).get("cmd")
        args = (msg.body or {}).get("args") or {}
        self.requests.append((cmd, args))
        if cmd in self.drop:
            return None, 0
        handler = self.handlers.get(cmd)
        if handler is None:
            reply = {"ok": False, "error": f"unknown command {cmd!r}", "code": "UNKNOWN_COMMAND"}
        else:
            try:
                reply = {"ok": True, "result": handler(args)}
            except FakeError as e:
                reply = {"ok": False, "error": str(e), "code": e.code}
        frames_out = [*ids, *protocol.encode(MsgType.CTL_REPLY, reply, ref=msg.header.msg_id)]
        return frames_out, time.monotonic() + self.delay.get(cmd, 0.0)

    def serve(self):
        pending: list = []  # (due, frames): delayed replies, so other requests are still served
        while not self.stopping.is_set():
            now = time.monotonic()
            for item in [p for p in pending if p[0] <= now]:
                pending.remove(item)
                self._sock.send_multipart(item[1])
            wait = min([p[0] for p in pending], default=now + 0.05) - now
            if not self._sock.poll(max(1, int(wait * 1000))):
                continue
            frames = self._sock.recv_multipart()
            out, due = self._answer(frames)
            if out is not None:
                pending.append((due, out))
            if self.stopping.is_set():
                for _, f in pending:  # answer `shutdown` before leaving
                    self._sock.send_multipart(f)
                pending.clear()


def _main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="fake snsbus manager for tests")
    ap.add_argument("--control", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--state-dir", required=True)
    ap.add_argument("--max-children", type=int, default=4)
    ap.add_argument("--policy", default="randtree")
    ap.add_argument("--heartbeat", type=float)
    ap.add_argument("--misses", type=int)
    ap.add_argument("--fail", action="store_true", help="exit 2 at once, as a broken manager would")
    ap.add_argument("--keys")  # accepted like the real manager's; this fake speaks plain TCP only
    ap.add_argument("--insecure", action="store_true")
    opts = ap.parse_args(argv)
    if opts.fail:
        print("fake manager: failing on purpose", file=sys.stderr)
        return 2
    fake = FakeManager(max_children=opts.max_children, policy=opts.policy, socket_endpoint=opts.control)
    fake.bind()
    signal.signal(signal.SIGTERM, lambda *a: fake.stopping.set())
    state = Path(opts.state_dir)
    tmp = state / ".manager.json.tmp"
    tmp.write_text(json.dumps({"pid": os.getpid(), "control": opts.control, "data": opts.data, "epoch": 1,
                              "key": None}))
    os.replace(tmp, state / "manager.json")
    print(f"fake manager ready at {opts.control}", file=sys.stderr)
    try:
        fake.serve()
    finally:
        fake.close()
    return 0


if __name__ == "__main__":
    sys.exit(_main())
