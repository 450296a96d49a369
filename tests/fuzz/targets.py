"""Fuzz targets shared by atheris (``python -m tools.fuzz``), hypothesis (tests/fuzz) and the regressions.

A target is ``fn(data: bytes) -> None``: it turns the bytes into inputs with
:class:`tests.fuzz.source.Source`, feeds them to one parser or handler and
checks the invariants of issue 7:

* no exception escapes except the documented error classes of that entry
  point (``ProtocolError`` for the frame parser, ``SpecError`` for specs, an
  HTTP 4xx for the front end's query checks, nothing at all for handlers that
  sit behind a socket);
* drops are counted (the counters add up to the inputs);
* no hang: message storms are bounded (a storm is a failure).

A broken invariant raises :class:`InvariantBroken`; any other exception
escaping a target is a crash too.  Targets are plain functions over module
state built once per process (:func:`setup`), so atheris can run them in a
loop; every target resets what it changes.

The targets whose code differs between the fast-path twins (``frame``,
``planeloop``, ``tree``, ``convergecast``) run once per twin: in the process
whose ``BUS_NO_EXTENSIONS`` picks it.  ``frame`` also compares both codecs
against each other whenever the compiled one is built.
"""

from __future__ import annotations

import asyncio
import hashlib
import struct
import tempfile
from pathlib import Path

from bus import protocol as p
from tests.fuzz.source import KEYS, Source

__all__ = ["TARGETS", "TWIN_SENSITIVE", "MODULES", "InvariantBroken", "import_all", "run_one", "setup", "teardown"]

#: Every module the targets reach (imported lazily); atheris must import them under instrumentation.
MODULES = ("bus.planes", "bus.tree", "bus.convergecast", "bus.policy", "bus.transfer", "manager.root",
           "manager.membership", "manager.commands", "manager.spec", "manager.resources", "nodes.packages",
           "nodes.stub", "nodes.instance", "nodes.cachestore", "frontends.server", "examples.transend.distill")  # fmt: skip


class InvariantBroken(AssertionError):
    """A target's invariant does not hold for this input (a finding, like a crash)."""


def check(cond: bool, what: str) -> None:
    if not cond:
        raise InvariantBroken(what)


_state: dict = {}


def setup() -> None:
    """Build the shared state of every target once per process (idempotent)."""
    if _state:
        return
    import logging

    # Hostile inputs make every component log; formatting millions of lines would be the whole run.
    logging.disable(logging.CRITICAL)
    _state["tmp"] = tempfile.TemporaryDirectory(prefix="snsbus-fuzz-")
    _state["loop"] = asyncio.new_event_loop()


def teardown() -> None:
    """Release what :func:`setup` made (sockets, event loop, temporary files)."""
    import logging

    for name in ("planeloop_close", "stub_close"):
        closer = _state.pop(name, None)
        if closer is not None:
            closer()
    loop = _state.pop("loop", None)
    if loop is not None:
        loop.close()
    tmp = _state.pop("tmp", None)
    if tmp is not None:
        tmp.cleanup()
    _state.clear()
    logging.disable(logging.NOTSET)


def import_all() -> None:
    import importlib

    for name in MODULES:
        importlib.import_module(name)


def _tmp() -> Path:
    return Path(_state["tmp"].name)


def _wire(value):
    """``value`` as it comes off the wire (packed and unpacked), or None if it cannot be sent."""
    try:
        return p.unpackb(p.packb(value))
    except p.ProtocolError:
        return None


# ---------------------------------------------------------------- frames

_HDR = struct.Struct("<BBHQQIIBBHI")
_TYPES = [int(t) for t in p.MsgType]


def _header_bytes(src: Source, body_len: int, extra: int) -> bytes:
    version = p.VERSION if src.u8() % 8 else src.u8()
    mtype = src.choice(_TYPES) if src.u8() % 8 else src.u8()
    if src.u8() % 4 == 0:
        body_len = src.choice((0, 1, p.MAX_BODY, p.MAX_BODY + 1, 0xFFFFFFFF, body_len + 1))
    if src.u8() % 4 == 0:
        extra = src.choice((0, 1, p.MAX_EXTRA, p.MAX_EXTRA + 1, 0xFFFF, extra + 1))
    return _HDR.pack(version, mtype, src.uint(2), src.uint(8), src.uint(8), src.uint(4), src.uint(4), src.u8(),
                     src.u8(), extra, body_len)  # fmt: skip


def gen_frames(src: Source) -> list:
    """One message's frames (no routing ids): garbage, a fuzzed header, or a mutated valid message."""
    mode = src.u8() % 5
    if mode == 0:
        frames = [src.blob(48) for _ in range(src.below(5))]
    elif mode == 4:  # too many frames, each small, the header telling the truth
        extra = [src.blob(2) for _ in range(src.choice((0, 1, p.MAX_EXTRA, p.MAX_EXTRA + 1, 200)))]
        try:
            frames = p.encode(src.choice(_TYPES), {}, extra=extra[:p.MAX_EXTRA])
        except p.ProtocolError:
            frames = [b"", b""]
        else:
            frames[0] = frames[0][:30] + len(extra).to_bytes(2, "little") + frames[0][32:]
            frames[2:] = extra
    elif mode == 1:
        body = p.packb(_wire(src.value()) or {}) if src.flag() else src.blob(40)
        extra = [src.blob(8) for _ in range(src.below(4))]
        frames = [_header_bytes(src, len(body), len(extra)), body, *extra]
    else:
        try:
            frames = p.encode(src.choice(_TYPES), _wire(src.mapping()), src=src.uint(4), dst=src.uint(4),
                              ref=src.uint(8), ttl=src.u8(), hops=src.u8(),
                              extra=[src.blob(8) for _ in range(src.below(3))])  # fmt: skip
        except p.ProtocolError:
            frames = [b"", b""]
        if mode == 3 and frames:
            i = src.below(len(frames))
            f = bytearray(frames[i])
            op = src.u8() % 4
            if op == 0 and f:
                f[src.below(len(f))] ^= 1 << src.below(8)
            elif op == 1:
                del f[src.below(len(f) + 1):]
            elif op == 2:
                f += src.blob(4)
            else:
                frames.insert(i, bytes(src.blob(36)))
            frames[i] = bytes(f)
    kind = src.u8() % 8
    if kind == 1:
        frames = [bytearray(f) for f in frames]
    elif kind == 2:
        frames = [memoryview(f) for f in frames]
    return frames


def _codecs():
    from core import fastpath

    out = [("python", fastpath.FrameCodecPy)]
    if hasattr(fastpath, "FrameCodecC"):
        out.append(("cython", fastpath.FrameCodecC))
    return out


def t_frame(data: bytes) -> None:
    """bus.protocol decode/decode_checked/peek_type and both twins' header codec."""
    src = Source(data)
    frames = gen_frames(src)
    header = frames[0] if frames else src.blob(40)
    results = []
    for name, cls in _codecs():
        c = cls(p.VERSION, _TYPES, p.MAX_BODY, p.MAX_FRAME)
        before = dict(c.statistics())
        try:
            out = ("ok", c.parse(header).as_tuple())
        except p.ProtocolError as e:
            out = (type(e).__name__, int(e.code))
        after = dict(c.statistics())
        changed = {k: after[k] - before[k] for k in after if after[k] != before[k]}
        check(len(changed) == 1 and set(changed.values()) == {1},
              f"{name} codec: one parse must move exactly one counter by one, moved {changed}")
        if out[0] == "ok":
            check(changed == {"parsed": 1}, f"{name} codec: a valid header counted as {changed}")
            adv = c.parse(c.advance(header))
            h = out[1]
            check(adv.ttl == max(h[7] - 1, 0) and adv.hops == min(h[8] + 1, 255), f"{name} codec: advance broke")
        results.append((name, out))
    check(len({r[1] for r in results}) == 1, f"the twins disagree on a header: {results}")
    try:
        msg = p.decode(frames)
    except p.ProtocolError:
        return
    check(p.peek_type(frames[0]) == msg.header.type, "peek_type disagrees with decode")
    check(len(msg.extra) <= p.MAX_EXTRA, f"decode accepted {len(msg.extra)} extra frames")
    again = p.decode_checked(frames, 0, p.new_codec())
    check(again.header == msg.header and p.packb(again.body) == p.packb(msg.body), "decode_checked != decode")
    if isinstance(msg.body, dict):
        h = msg.header
        frames2 = p.encode(h.type, msg.body, src=h.src, dst=h.dst, msg_id=h.msg_id, ref=h.ref, flags=h.flags,
                           ttl=h.ttl, hops=h.hops, extra=msg.extra)  # fmt: skip
        back = p.decode(frames2)
        check(back.header.as_tuple()[:10] == h.as_tuple()[:10], "encode(decode(x)) changed the header")


# ---------------------------------------------------------------- PlaneLoop validation


def _planeloop():
    if "planeloop" not in _state:
        import zmq

        from bus.planes import PlaneLoop

        ctx = zmq.Context()
        got: list = []
        loop = PlaneLoop()
        socks = {
            "ctl-router": ctx.socket(zmq.ROUTER),
            "data-router": ctx.socket(zmq.ROUTER),
            "ctl-dealer": ctx.socket(zmq.DEALER),
        }
        for name, sock in socks.items():
            sock.setsockopt(zmq.LINGER, 0)
            plane = p.Plane.DATA if name.startswith("data") else p.Plane.CONTROL
            loop.add(sock, plane, got.extend, name=name)

        def close():
            for sock in socks.values():
                sock.close(0)
            ctx.term()

        _state["planeloop"] = (loop, [loop._regs[s] for s in socks.values()], got)
        _state["planeloop_close"] = close
    return _state["planeloop"]


def _framing_ok(frames, n_ids: int, is_data: bool) -> bool:
    """The reference: what ``bus.protocol.decode`` accepts (the body aside), on the socket's plane."""
    if len(frames) < n_ids + 2:
        return False
    try:
        msg = p.decode(frames[n_ids:])
    except p.MalformedBody:
        h = p.codec.parse(frames[n_ids])
    except p.ProtocolError:
        return False
    else:
        h = msg.header
    return (h.type >= p.DATA_PLANE_MIN) == is_data


def t_planeloop(data: bytes) -> None:
    """PlaneLoop._dispatch on raw batches: valid ones reach the handler, the rest are counted and dropped."""
    src = Source(data)
    loop, regs, got = _planeloop()
    reg = src.choice(regs)
    batch = []
    for _ in range(1 + src.below(6)):
        frames = [bytes(f) for f in gen_frames(src)]
        if reg.n_ids and src.u8() % 8:
            frames.insert(0, b"\x01" + src.blob(7))
        batch.append(frames)
    before = loop.statistics().plane(reg.plane)
    got.clear()
    loop._dispatch(reg, batch)
    after = loop.statistics().plane(reg.plane)
    dropped = after.dropped_total - before.dropped_total
    passed = after.messages - before.messages
    check(passed + dropped == len(batch), f"{len(batch)} messages but {passed} passed and {dropped} were counted")
    check(passed == len(got), "handler got a different number of messages than counted")
    want = [f for f in batch if _framing_ok(f, reg.n_ids, reg.is_data)]
    if [id(f) for f in got] != [id(f) for f in want]:
        odd = {id(f) for f in got} ^ {id(f) for f in want}
        if all(len(f) - reg.n_ids - 2 > p.MAX_EXTRA for f in batch if id(f) in odd):
            raise InvariantBroken(f"PlaneLoop passed a message with {max(len(f) for f in batch) - reg.n_ids - 2} "
                                  "extra frames, over MAX_EXTRA")
        raise InvariantBroken(f"PlaneLoop passed {len(got)} messages, the protocol accepts {len(want)}")


# ---------------------------------------------------------------- tree handlers

_CONTROL_TYPES = [int(t) for t in p.MsgType if t < p.DATA_PLANE_MIN]


def _tree(max_children: int = 2):
    """A fresh in-memory tree: root, n0 and n1 under it, n2 under n0, j joining at the root."""
    from bus.policy import TreeConfig
    from tests.bus.fakenet import FakeNet

    net = FakeNet(TreeConfig(max_children=max_children), seed=3)
    for name in ("n0", "n1", "n2"):
        net.add(name)
        net.run()
    net.tick(0.3)
    log = list(_recorded(net))
    net.add("j")  # its JOIN stays queued: j is JOINING
    net.queue.clear()
    return net, log


def _recorded(net):
    """Every message the build sent (replay material: real REGISTERs, ROUTE_ADDs, JOIN_ACCEPTs...)."""
    for t in net.transports.values():
        for identity, frames in t.to_children:
            yield ("parent", identity, frames)


def _shaped_body(src: Source, mtype: int, net) -> object:
    ids = [n.node_id for n in net.nodes.values()]
    idv = lambda: src.choice(ids) if src.u8() % 4 else src.integer()  # noqa: E731
    if src.u8() % 4 == 0:
        return _wire(src.value())
    T = p.MsgType
    shapes = {
        T.JOIN: lambda: {"id": idv(), "name": src.text(), "ctl": src.text(), "data": src.text(),
                         "sub": [idv() for _ in range(src.below(4))], "attrs": src.mapping(0), "pid": src.integer()},
        T.JOIN_ACCEPT: lambda: {"id": idv(), "parent": idv(), "depth": src.integer(), "path": [idv() for _ in range(src.below(4))],
                                "gp": src.text(), "pdata": src.text(), "rep": src.text(), "rid": idv(), "ep": src.integer(),
                                "cfg": {"k": src.integer(), "pol": src.text(), "hb": src.number(), "mi": src.integer()}},
        T.JOIN_REDIRECT: lambda: {"to": src.text(), "id": idv()},
        T.HEARTBEAT: lambda: {"d": src.integer(), "gp": src.text(), "ep": src.integer(), "rep": src.text(),
                              "path": [idv() for _ in range(src.below(4))]},
        T.ROUTE_ADD: lambda: {"ids": [idv() for _ in range(src.below(4))], "h": src.integer()},
        T.ROUTE_LOST: lambda: {"ids": [idv() for _ in range(src.below(4))], "reason": src.text(), "dead": idv(),
                               "h": src.integer()},
        T.ROUTE_SYNC: lambda: {"ids": [idv() for _ in range(src.below(4))]},
        T.REGISTER: lambda: {"id": idv(), "name": src.text(), "parent": idv(), "ctl": src.text(), "data": src.text(),
                             "attrs": src.mapping(0), "pid": src.integer(), "reason": src.text(),
                             "orphaned_for": src.number(), "retry": src.flag()},
        T.REGISTER_ACK: lambda: {"ep": src.integer()},
        T.COMMAND: lambda: {"op": src.choice(("ping", "info", "nope", None)), "a": src.mapping(0),
                            "rem": src.number(), **({"ids": [idv() for _ in range(src.below(3))]} if src.flag() else {})},
        T.REPLY: lambda: _reply_body(src, idv),
    }  # fmt: skip
    make = shapes.get(mtype)
    body = make() if make else src.mapping()
    for _ in range(src.below(3)):  # then break a field or two
        body[src.choice(KEYS)] = src.value(1)
    return _wire(body)


def _reply_body(src: Source, idv) -> dict:
    groups = []
    for _ in range(src.below(3)):
        value = src.value(1)
        key = p.packb(_wire(value)) if src.u8() % 4 else src.value(0)
        groups.append([key, value, [idv() for _ in range(src.below(3))]])
    return {"g": groups, "m": [[idv(), src.text()] for _ in range(src.below(3))]}


def _header(src: Source, mtype: int, net, ops=()):
    ids = [n.node_id for n in net.nodes.values()] + [p.BROADCAST_ID]
    refs = list(ops) or [0]
    frames = p.codec.pack(mtype, src.uint(2) & 7, src.uint(8) if src.flag() else src.choice(refs),
                          src.choice(refs) if src.flag() else src.uint(8), src.choice(ids) if src.flag() else src.uint(4),
                          src.choice(ids) if src.flag() else src.uint(4), src.u8(), src.u8(), 0, 0)  # fmt: skip
    return p.codec.parse(frames)


def _storm_check(net) -> None:
    n = net.run(limit=5000)
    check(n < 5000 and not net.queue, "message storm: 5000 deliveries and the queue is not empty")


def t_tree(data: bytes) -> None:
    """Every control handler of TreeNode/RootNode on fuzzed, replayed and reordered messages."""
    src = Source(data)
    net, log = _tree()
    nodes = [net.root, net.nodes["n0"], net.nodes["n1"], net.nodes["n2"], net.nodes["j"]]
    for _ in range(1 + src.below(6)):
        action = src.u8() % 8
        if action == 0 and log:  # replay a real message, maybe to someone else, maybe many times
            kind, identity, frames = src.choice(log)
            for _ in range(1 + src.below(3)):
                ep = net.identities.get(identity)
                if ep and not src.flag():
                    net.queue.append((kind, ep, identity, list(frames)))
                else:
                    node = src.choice(nodes)
                    msg = p.decode(frames)
                    node.on_child(identity, msg) if src.flag() else node.on_parent(msg)
        elif action == 1:
            src_pos = src.below(len(net.queue) + 1)  # reorder: deliver the queue out of order
            if net.queue:
                net.queue.insert(src_pos, net.queue.pop())
        elif action == 2:
            net.tick(src.choice((0.0, 0.3, 1.0, 3.5)))
        else:
            node = src.choice(nodes)
            mtype = src.choice(_CONTROL_TYPES) if src.u8() % 8 else src.u8()
            if not p.codec.is_valid_type(mtype):
                mtype = p.MsgType.PING
            msg = p.Message(_header(src, mtype, net), _shaped_body(src, mtype, net), [])
            where = src.u8() % 4
            if where == 0:
                node.on_parent(msg)
            elif where == 1:
                node.deliver(msg, src.choice((-1, 0, 1)))
            else:
                child_ids = [c.identity for c in node.children.values()] or [b"\x01nobody"]
                identity = src.choice(child_ids) if src.flag() else b"\x01" + src.blob(7)
                node.on_child(identity, msg)
        _storm_check(net)


# ---------------------------------------------------------------- convergecast REPLY merging


def t_convergecast(data: bytes) -> None:
    """REPLY merging at an interior node and the root: groups, gaps, duplicates, late and forged replies."""
    src = Source(data)
    net, _ = _tree()
    root, n0 = net.root, net.nodes["n0"]
    loop = _state["loop"]
    fut = loop.create_future()
    op_id = p.next_msg_id()
    body = {"op": "ping", "a": {}, "rem": 5.0}
    frames = p.encode(p.MsgType.COMMAND, body, src=root.node_id, dst=p.BROADCAST_ID, msg_id=op_id)
    root._gone = {}
    links = root.send_down(frames, list(root.children))
    root._open_op(op_id, links, 5.0, body, reply_dst=0, now=net.now, future=fut)
    expected = {n.node_id for n in net.live()}
    if src.flag():
        net.run()  # the command reaches n0, which now owes its parent a merged reply
    for _ in range(1 + src.below(4)):
        target = src.choice((root, n0))
        kids = list(target.children.values())
        if not kids:
            continue
        child = src.choice(kids)
        ids = [n.node_id for n in net.nodes.values()]
        idv = lambda: src.choice(ids) if src.u8() % 4 else src.integer()  # noqa: E731
        rbody = _wire(_reply_body(src, idv) if src.u8() % 4 else src.value())
        ref = op_id if src.u8() % 4 else src.uint(8)
        h = p.codec.parse(p.codec.pack(p.MsgType.REPLY, 0, src.uint(8), ref, child.node_id,
                                       target.node_id if src.u8() % 4 else src.uint(4), 64, 0, 0, 0))
        for _ in range(1 + src.below(2)):  # a duplicate now and then
            target.on_child(child.identity, p.Message(h, rbody, []))
        if src.flag():
            _storm_check(net)
    _storm_check(net)
    net.now += 6.0
    for node in (n0, net.nodes["n2"], root):
        node.tick(net.now)
        _storm_check(net)
    check(fut.done(), "the root's operation never finished (not even at its deadline)")
    out = root.outcome(fut.result(), expected)
    named = [n for g in out["groups"] for n in g["nodes"]] + [m["node"] for m in out["missing"]]
    check(out["answered"] <= out["expected"] == len(expected), f"outcome counts are off: {out}")
    missing = {m["node"] for m in out["missing"]}
    check(all(net.root.membership.name_of(i) in set(named) for i in expected),
          "an expected node is neither in a group nor missing")
    check(not (missing & {n for g in out["groups"] for n in g["nodes"]}), "a node is both answered and missing")


# ---------------------------------------------------------------- manager control API


class _FakeServices:
    def status(self) -> dict:
        return {"services": [], "events": [], "counters": {}, "subscribers": 0}


class _FakeManager:
    """Just enough of ``manager.server.Manager`` for ``commands.dispatch``: a root on the in-memory net."""

    def __init__(self, net):
        self.root = net.root
        self.apps = None
        self.keys = None  # runs without CURVE: `keys` is refused
        self.services = _FakeServices()
        self.stopped = False

    @property
    def membership(self):
        return self.root.membership

    def uptime(self) -> float:
        return 1.0

    def status(self) -> dict:
        return {"members": self.membership.snapshot(), "counters": dict(self.root.counters)}

    def request_stop(self) -> None:
        self.stopped = True


def t_commands(data: bytes) -> None:
    """manager.commands.dispatch on garbage requests: always a CTL_REPLY body, never an exception."""
    from manager import commands

    src = Source(data)
    net, _ = _tree(max_children=4)
    mgr = _FakeManager(net)
    names = sorted(commands.COMMANDS) + ["svc_subscribe", "nope"]
    if src.u8() % 8:
        args = _wire(src.mapping(2, keys=KEYS + ("cmd",))) if src.u8() % 4 else _wire(src.value())
        if isinstance(args, dict) and src.flag():
            args["timeout"] = src.choice((0.05, 1, 0, -1, 3600, 3601, "1", None, float("nan"), True))
        body = {"cmd": src.choice(names), "args": args}
    else:
        body = _wire(src.value())
    loop = _state["loop"]
    task = loop.create_task(commands.dispatch(mgr, body))
    for _ in range(50):  # drive the event loop and the in-memory net until the reply is in
        loop.run_until_complete(asyncio.sleep(0))
        if task.done():
            break
        net.run(limit=5000)
        net.now += 0.5
        net.root.tick(net.now)
    else:
        net.now += 4000.0
        net.root.tick(net.now)
        loop.run_until_complete(asyncio.sleep(0))
    check(task.done(), f"dispatch({body!r:.200}) did not answer within the timeout plus one tick")
    reply = task.result()
    check(isinstance(reply, dict) and isinstance(reply.get("ok"), bool), f"not a CTL_REPLY body: {reply!r:.200}")
    if not reply["ok"]:
        check(isinstance(reply.get("code"), str) and isinstance(reply.get("error"), str), "error without code/text")
    p.packb(reply)  # the reply must be sendable


# ---------------------------------------------------------------- ChunkService request parser


class _FakeLoop:
    running = False

    def __init__(self):
        self.sent: list = []

    def send(self, sock, frames) -> bool:
        self.sent.append(frames)
        return True


class _FakeLink:
    data = object()


_OBJECT = bytes(range(256)) * 5


def _chunks():
    if "chunks" not in _state:
        from bus.transfer import ChunkService
        from nodes.packages import PackageCache

        cache = PackageCache(_tmp() / "cache")
        digest = cache.put(_OBJECT)
        loop = _FakeLoop()
        svc = ChunkService(None, loop, cache, root=True)
        svc.serve(_FakeLink(), hook=False)
        _state["chunks"] = (svc, loop, digest)
    return _state["chunks"]


def t_chunk_request(data: bytes) -> None:
    """ChunkService's CHUNK_REQUEST parser and server: every request gets exactly one well-formed answer."""
    src = Source(data)
    svc, loop, digest = _chunks()
    other = hashlib.sha256(b"absent").hexdigest()
    body = {"d": src.choice((digest, other, digest.upper(), digest[:63], src.text())),
            "o": src.choice((0, 1, 255, len(_OBJECT) - 1, len(_OBJECT))) if src.flag() else src.integer(),
            "n": src.choice((1, 16, len(_OBJECT), p.MAX_FRAME, p.MAX_FRAME + 1)) if src.flag() else src.integer(),
            "s": src.choice((len(_OBJECT), None, 0)) if src.flag() else src.value(0),
            "t": src.number() if src.flag() else None}  # fmt: skip
    for _ in range(src.below(3)):
        body[src.choice(("d", "o", "n", "s", "t", "x"))] = src.value(1)
    body = _wire(body) if src.u8() % 8 else _wire(src.value())
    mtype = p.MsgType.CHUNK_REQUEST if src.u8() % 8 else src.choice(_TYPES)
    h = p.codec.parse(p.codec.pack(mtype, 0, src.uint(8), 0, 0, 0, 64, 0, 0, 0))
    loop.sent.clear()
    svc.handle(b"\x01peer", p.Message(h, body, []))
    if mtype != p.MsgType.CHUNK_REQUEST:
        check(not loop.sent, "a non-request was answered")
        return
    check(len(loop.sent) == 1, f"{len(loop.sent)} answers to one request {body!r:.200}")
    ident, *frames = loop.sent[0]
    reply = p.decode([bytes(f) for f in frames])
    check(reply.header.ref == h.msg_id and reply.header.type == p.MsgType.CHUNK, "answer does not match request")
    if not reply.header.flags & p.Flag.ERROR:
        check(body["d"] == digest and reply.body["o"] == body["o"], "served something else than asked")
        check(bytes(reply.extra[0]) == _OBJECT[body["o"]:body["o"] + body["n"]], "served the wrong bytes")


# ---------------------------------------------------------------- spec and directory XML

_TAGS = ("plush", "project", "software", "package", "path", "dest", "install", "component", "num_hosts", "rspec",
         "resource", "resources", "attr", "experiment", "execution", "component_block", "process_block", "process",
         "cmdline", "arg", "env", "cwd", "restart", "timeout", "exit_codes", "barrier", "barrier_block", "service",
         "worker", "cache", "directory")  # fmt: skip
_ATTRS = ("name", "type", "group", "value", "max", "timeout", "predecessor", "policy", "run", "grace", "backoff",
          "flap_window", "address", "port", "user", "sha256", "xmlns:xi", "xml:base", "href")  # fmt: skip
_SENTINEL = "SNSBUS-FUZZ-SENTINEL-7f3a"


def _xml(src: Source, depth: int = 0) -> str:
    tag = src.choice(_TAGS)
    attrs = "".join(f' {src.choice(_ATTRS)}="{src.choice(_ATTR_VALUES)}"' for _ in range(src.below(3)))
    if depth > 4 or src.u8() % 3 == 0:
        return f"<{tag}{attrs}/>"
    inner = []
    for _ in range(src.below(4)):
        k = src.u8() % 8
        if k < 4:
            inner.append(_xml(src, depth + 1))
        elif k == 4:
            inner.append(src.choice(("&x;", "&lol9;", "&#65;", "&#x0;", "&amp;", "&xxe;", "<![CDATA[<a>]]>",
                                     "<!-- <!DOCTYPE x> -->", "<?pi x?>",
                                     '<xi:include xmlns:xi="http://www.w3.org/2001/XInclude" href="/etc/passwd" '
                                     'parse="text"/>')))
        else:
            inner.append(src.text(16).replace("<", "&lt;").replace("&", "&amp;"))
    return f"<{tag}{attrs}>{''.join(inner)}</{tag}>"


_ATTR_VALUES = ("a", "b", "1", "0", "-1", "web", "tar", "zip", "none", "tar.gz", "file", "ssh", "local", "never",
                "on-failure", "always", "99999999999999999999", "a b", "&x;", "&#0;", "2", "x" * 100)  # fmt: skip


#: Valid documents (a spec, a directory) with entity references where a value goes: the deep passes.
_TEMPLATES = (
    '<plush><project name="{v}"><software name="s"><package name="p" type="web"><path>http://x/a.zip</path>'
    '</package></software><component name="c"><rspec><num_hosts>1</num_hosts></rspec><software name="s"/>'
    '</component><experiment><execution><component_block name="c"><process_block name="b">'
    '<process name="{v}"><path>date</path></process></process_block></component_block></execution>'
    '</experiment></project></plush>',
    '<resources><resource name="{v}" address="127.0.0.1" type="local" group="g"><attr name="a" value="{v}"/>'
    '</resource></resources>',
)  # fmt: skip


def _xml_document(src: Source) -> bytes:
    sentinel = _tmp() / "sentinel.txt"
    if not sentinel.exists():
        sentinel.write_text(_SENTINEL)
    if src.u8() % 4 == 0:
        body = src.choice(_TEMPLATES).replace("{v}", src.choice(("&x;", "&xxe;", "&lol9;", "&#65;", "n")))
    else:
        body = _xml(src)
    prolog = src.u8() % 8
    decl = '<?xml version="1.0"?>\n' if src.flag() else ""
    if prolog == 0:
        doc = (decl + f'<!DOCTYPE p [<!ENTITY xxe SYSTEM "file://{sentinel}"><!ENTITY x "{_SENTINEL}">'
               '<!ENTITY lol "lol"><!ENTITY lol1 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">'
               '<!ENTITY lol9 "&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;">]>\n' + body)
    elif prolog == 1:
        doc = decl + f'<!doctype p SYSTEM "file://{sentinel}">' + body
    elif prolog == 2:
        doc = decl + f'<!DOCTYPE  p PUBLIC "x" "http://127.0.0.1:9/x.dtd">' + body
    else:
        doc = decl + body
    enc = src.u8() % 8
    if enc == 0:
        raw = ('<?xml version="1.0" encoding="UTF-16"?>' + doc.removeprefix(decl)).encode("utf-16")
    elif enc == 1:
        raw = doc.encode("utf-8-sig")
    else:
        raw = doc.encode("utf-8", "surrogatepass")
    if src.u8() % 8 == 0 and raw:
        i = src.below(len(raw))
        raw = raw[:i] + src.blob(8) + raw[i:]
    return raw


def t_spec(data: bytes) -> None:
    """Spec and resource-directory parsing: SpecError only, no entity expanded, no file read."""
    from manager import resources, spec

    src = Source(data)
    raw = _xml_document(src) if src.u8() % 16 else src.blob(256)
    parse = spec.parse if b"plush" in raw or b"p\0l\0u\0s\0h" in raw or src.flag() else resources.parse_directory
    try:
        out = repr(parse(raw))
    except spec.SpecError as e:
        out = str(e)
    check(_SENTINEL not in out, "an entity was expanded or a local file was read into the result")


# ---------------------------------------------------------------- the stub's TASK parsing


class _StubNode:
    name, node_id = "fuzz", 9

    def __init__(self):
        self.reports: list = []

    def send_up(self, msg_type, body, to_parent: bool = False) -> None:
        self.reports.append((msg_type, body))


class _StubLink:
    data_endpoint = "tcp://127.0.0.1:1"

    def __init__(self, loop):
        self.loop = loop
        self.data = _OpenSock()


class _OpenSock:
    closed = False


def _stub():
    if "stub" not in _state:
        from nodes import stub as st

        loop = _state["loop"]
        fake = _FakeLoop()
        s = st.WorkerStub(_StubNode(), _StubLink(fake), queue_limit=4)
        s._caches["svc/cache@fuzz#1"] = st._Cache("svc", "svc/cache@fuzz#1", 1 << 16)

        async def make():
            for kind, iid in (("transformation", "svc/t@fuzz#1"), ("aggregation", "svc/a@fuzz#1")):
                inst = st._Instance(s, "svc", kind[0], "m:f", kind, iid, [])
                s._workers[iid] = inst  # STARTING: requests queue, no process is ever started

        loop.run_until_complete(make())
        _state["stub"] = (s, fake)
        _state["stub_close"] = lambda: [inst.ready.cancel() for inst in s._workers.values()]
    return _state["stub"]


def t_stub_task(data: bytes) -> None:
    """WorkerStub.on_task on fuzzed TASKs: each is queued or answered exactly once, never an exception."""
    src = Source(data)
    stub, fake = _stub()
    wids = list(stub._workers) + list(stub._caches) + ["svc/none@fuzz#1", ""]
    body = {"rid": src.value(0), "w": src.choice(wids) if src.u8() % 8 else src.value(0), "p": src.mapping(1),
            "dl": src.number() if src.flag() else None, "op": src.choice(("get", "put", "del", "x")),
            "k": src.text() if src.u8() % 4 else src.value(0)}  # fmt: skip
    if src.flag():
        body["put"] = {"w": src.choice(wids), "k": src.text(), "data": src.text(), "meta": src.value(1)}
    for _ in range(src.below(3)):
        body[src.choice(("rid", "w", "p", "dl", "put", "op", "k", "meta", "svc"))] = src.value(1)
    body = _wire(body) if src.u8() % 8 else _wire(src.value())
    mtype = p.MsgType.TASK if src.u8() % 8 else src.choice(_TYPES)
    h = p.codec.parse(p.codec.pack(mtype, 0, src.uint(8), 0, 0, 0, 64, 0, 0, 0))
    extra = [src.blob(32) for _ in range(src.below(3))]
    queued = sum(len(i.queue) for i in stub._workers.values())
    fake.sent.clear()
    stub.on_task(b"\x01fe", p.Message(h, body, extra))
    now_queued = sum(len(i.queue) for i in stub._workers.values())
    if mtype != p.MsgType.TASK:
        check(not fake.sent and now_queued == queued, "a non-TASK was served")
        return
    check(len(fake.sent) + (now_queued - queued) == 1,
          f"one TASK gave {len(fake.sent)} replies and {now_queued - queued} queued: {body!r:.200}")
    for frames in fake.sent:
        reply = p.decode([bytes(f) for f in frames[1:]])
        check(reply.type == p.MsgType.TASK_REPLY and reply.header.ref == h.msg_id, "a reply to something else")
    for inst in stub._workers.values():
        inst.queue.clear()


# ---------------------------------------------------------------- front end query parsing

_ORIGIN = "http://127.0.0.1:8000"
_URLS = (
    _ORIGIN + "/a.jpg", "http://127.0.0.1:8000", "http://127.0.0.1/a.jpg", "https://127.0.0.1:8000/a",
    "http://169.254.169.254/latest/meta-data/", "http://[::1]:8000/a", "http://[::ffff:127.0.0.1]:8000/a",
    "http://2130706433:8000/a", "http://0x7f.1:8000/a", "http://017700000001:8000/a", "http://127.1:8000/a",
    "http://0177.0.0.1:8000/a", "http://127.0.0.1.:8000/a", "http://user:pw@127.0.0.1:8000/a",
    "http://127.0.0.1:8000@evil.example/a", "http://evil.example#@127.0.0.1:8000/a", "http://127.0.0.1%3a8000/a",
    "http://127.0.0.1:8000\\@evil.example/a", "http://127.0.0.1:08000/a", "http://127.0.0.1:8000:80/a",
    "//127.0.0.1:8000/a", "file:///etc/passwd", "gopher://127.0.0.1:8000/", "http://localhost:8000/a",
    "HTTP://127.0.0.1:8000/A", "http://127.0.0.1:8000/../../etc", "http:/127.0.0.1:8000/a", "http://[::1/",
    "http://%31%32%37.0.0.1:8000/", "http://xn--e1afmkfd.xn--p1ai:8000/", "http://é.example:8000/",
    "http://127.0.0.1:8000/%00", "http://127.0.0.1:65536/", "http://127.0.0.1:-1/",
)  # fmt: skip
_QUERY_KEYS = ("url", "w", "h", "q", "fmt", "user", "worker", "max_width", "quality", "format", "cols", "thumb",
               "columns")  # fmt: skip


def _frontend():
    if "frontend" not in _state:
        from frontends.server import FrontEnd, FrontEndConfig

        cfg = FrontEndConfig(manager="tcp://127.0.0.1:1", origins=(_ORIGIN,), max_url=512)
        _state["frontend"] = FrontEnd(cfg)
    return _state["frontend"]


def t_frontend_query(data: bytes) -> None:
    """The front end's request checks: 4xx or a URL on an allowed origin, nothing else."""
    from urllib.parse import quote

    import yarl
    from aiohttp import web
    from aiohttp.test_utils import make_mocked_request

    from frontends import server

    src = Source(data)
    fe = _frontend()
    pairs = []
    for _ in range(src.below(5)):
        key = src.choice(_QUERY_KEYS) if src.u8() % 8 else src.text(8)
        if key == "url":
            value = src.choice(_URLS) if src.u8() % 4 else src.text(40)
        else:
            value = src.text(12) if src.flag() else str(src.integer())
        raw = src.u8() % 8 == 0
        pairs.append(f"{key}={value}" if raw else f"{quote(key, safe='')}={quote(value, safe='')}")
    path = src.choice(("/distill", "/sheet")) + "?" + "&".join(pairs)
    headers = {"X-User": src.text(80)} if src.u8() % 8 == 0 else {}
    try:
        request = make_mocked_request("GET", path, headers=headers)
        request.query  # noqa: B018 - parsing it is the point
    except (ValueError, UnicodeError):
        return  # aiohttp's HTTP parser refuses such a request line before any handler runs
    try:
        fe._check_request(request)
        sheet = path.startswith("/sheet")
        urls = [fe._allowed(u) for u in request.query.getall("url", [])]
        fe._user(request)
        names = server._SHEET_QUERY if sheet else server._DISTILL_QUERY
        cls = server.SheetParams if sheet else server.DistillParams
        fe._params(cls, names, dict(server.DEFAULTS), request)
    except web.HTTPException as e:
        check(e.status in (400, 403, 414), f"status {e.status} for a bad request")
        return
    allowed = yarl.URL(_ORIGIN)
    for url in urls:
        u = yarl.URL(url)
        check(u.scheme == "http" and u.host == allowed.host and u.port == allowed.port and u.user is None
              and u.password is None, f"accepted {url!r}, which is not on the allowed origin")  # fmt: skip


# ---------------------------------------------------------------- registry

TARGETS = {
    "frame": t_frame,
    "planeloop": t_planeloop,
    "tree": t_tree,
    "convergecast": t_convergecast,
    "commands": t_commands,
    "chunk_request": t_chunk_request,
    "spec": t_spec,
    "stub_task": t_stub_task,
    "frontend_query": t_frontend_query,
}

#: Targets whose code path differs between the compiled and the pure fast-path twin.
TWIN_SENSITIVE = ("frame", "planeloop", "tree", "convergecast")


def run_one(name: str, data: bytes) -> None:
    """Run target ``name`` on ``data`` (after :func:`setup`)."""
    setup()
    TARGETS[name](data)
