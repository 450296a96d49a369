"""``python -m tools.demo``: a guided tour of snsbus on this machine.

The tour starts real bus processes (``python -m tools.demo node ...``), drives
them over the control plane from this process, prints what happens, stops
everything and exits 0.  It is a list of steps (:data:`STEPS`); later issues
append theirs (cluster, deploy, TACC) with :func:`tour_step`.

Today's tour, "two planes":

1. start two bus processes, *alpha* and *beta*, each binding a control and a
   data ROUTER on ``127.0.0.1:0`` (they report the real ports on stdout);
2. a control-plane ping-pong between them, idle;
3. a data-plane burst of N messages from beta to alpha, with beta pinging
   alpha's control plane throughout: data msgs/s and the control RTT while
   the burst runs;
4. the counters of both nodes (``PlaneLoop.statistics()``);
5. stop: both processes are asked to leave and are always reaped.

The tour talks to the nodes with ``COMMAND``/``REPLY`` messages whose body is
``{"cmd": name, ...}``; :data:`NODE_COMMANDS` lists them.  Every socket speaks
CurveZMQ, as everywhere in snsbus: the tour makes one key pair for itself and
its nodes (``$SNSBUS_DEMO_KEY``), which each node's ZAP handler admits.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Awaitable, Callable

import zmq

from bus.planes import PlaneLoop, SocketFactory, endpoint_of
from bus.protocol import Flag, MsgType, Plane, encode

__all__ = ["Tour", "STEPS", "tour_step", "run_tour", "serve_node", "NODE_COMMANDS", "main"]

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
PING_GAP = 0.002  # seconds between a PONG and the next PING while measuring
REPLY_TIMEOUT = 30.0
START_TIMEOUT = 20.0


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms"


def _percentiles(samples: list[float]) -> dict:
    s = sorted(samples)
    if not s:
        return {"n": 0}
    return {"n": len(s), "p50": s[len(s) // 2], "p99": s[min(len(s) - 1, int(len(s) * 0.99))], "max": s[-1]}


# --------------------------------------------------------------------------
# a bus node (child process)
# --------------------------------------------------------------------------


class _Node:
    """One demo bus process: two ROUTERs, PING/PONG, DATA counting, commands."""

    def __init__(self, name: str, factory: SocketFactory, loop: PlaneLoop):
        self.name = name
        self.factory = factory
        self.pl = loop
        self.control: zmq.Socket | None = None
        self.data: zmq.Socket | None = None
        self.received = 0
        self.stopping = asyncio.Event()
        self._peers: dict[str, tuple[zmq.Socket, zmq.Socket]] = {}
        self._pongs: dict[int, asyncio.Future] = {}

    def bind(self, control_bind: str, data_bind: str) -> dict:
        self.control = self.factory.control_router(control_bind)
        self.data = self.factory.data_router(data_bind)
        self.pl.add(self.control, Plane.CONTROL, self._on_control, name=f"{self.name}/control")
        self.pl.add(self.data, Plane.DATA, self._on_data, name=f"{self.name}/data")
        return {"name": self.name, "pid": os.getpid(), "control": endpoint_of(self.control), "data": endpoint_of(self.data)}

    # -- receiving ---------------------------------------------------------
    def _on_data(self, batch: list) -> None:
        # Counting needs no body decode: the loop has already checked the header.
        self.received += len(batch)

    def _on_control(self, batch: list) -> None:
        for frames in batch:
            decoded = self.pl.decode(self.control, frames)
            if decoded is None:
                continue
            ids, msg = decoded
            if msg.type is MsgType.PING:
                pong = encode(MsgType.PONG, {"received": self.received}, ref=msg.header.msg_id)
                self.pl.send(self.control, [*ids, *pong])
            elif msg.type is MsgType.COMMAND:
                self.pl.spawn(self._command(ids, msg), name=f"cmd-{msg.header.msg_id}")

    def _on_peer_control(self, sock: zmq.Socket) -> Callable[[list], None]:
        def handler(batch: list) -> None:
            for frames in batch:
                decoded = self.pl.decode(sock, frames)
                if decoded is None or decoded[1].type is not MsgType.PONG:
                    continue
                fut = self._pongs.pop(decoded[1].header.ref, None)
                if fut is not None and not fut.done():
                    fut.set_result(decoded[1].body.get("received", 0))

        return handler

    async def _command(self, ids: list, msg) -> None:
        body = msg.body if isinstance(msg.body, dict) else {}
        handler = NODE_COMMANDS.get(body.get("cmd"))
        flags = Flag.UPWARD
        try:
            if handler is None:
                raise ValueError(f"unknown command {body.get('cmd')!r}; known: {sorted(NODE_COMMANDS)}")
            result = await handler(self, body)
        except Exception as e:  # reported to the caller, never fatal to the node
            logger.warning("command %r failed: %s", body.get("cmd"), e)
            result, flags = {"error": str(e)}, flags | Flag.ERROR
        reply = encode(MsgType.REPLY, result, ref=msg.header.msg_id, flags=flags)
        self.pl.send(self.control, [*ids, *reply])

    # -- talking to a peer -------------------------------------------------
    def _peer(self, control_ep: str, data_ep: str) -> tuple[zmq.Socket, zmq.Socket]:
        key = f"{control_ep} {data_ep}"
        if key not in self._peers:
            ident = self.name.encode()
            ctl = self.factory.control_dealer(control_ep, ident)
            data = self.factory.data_dealer(data_ep, ident)
            self.pl.add(ctl, Plane.CONTROL, self._on_peer_control(ctl), name=f"{self.name}->{control_ep}")
            self.pl.add(data, Plane.DATA, lambda batch: None, name=f"{self.name}->{data_ep}")
            self._peers[key] = (ctl, data)
        return self._peers[key]

    async def ping(self, ctl: zmq.Socket) -> tuple[float, int]:
        """One PING/PONG round trip: (seconds, data messages the peer had received)."""
        frames = encode(MsgType.PING)
        fut = asyncio.get_running_loop().create_future()
        self._pongs[int.from_bytes(frames[0][4:12], "little")] = fut
        t0 = time.perf_counter()
        if not self.pl.send(ctl, frames):
            raise RuntimeError("control queue to the peer is full")
        received = await asyncio.wait_for(fut, REPLY_TIMEOUT)
        return time.perf_counter() - t0, received


async def _cmd_ping(node: _Node, body: dict) -> dict:
    """``{"cmd": "ping", "control", "data", "count"}``: idle PING/PONG RTTs to a peer."""
    ctl, _ = node._peer(body["control"], body["data"])
    rtts = []
    for _ in range(int(body.get("count", 20))):
        rtts.append((await node.ping(ctl))[0])
        await asyncio.sleep(PING_GAP)
    return {"rtt": _percentiles(rtts)}


async def _cmd_burst(node: _Node, body: dict) -> dict:
    """``{"cmd": "burst", "control", "data", "count"}``: send DATA, ping throughout.

    Returns when a PONG reports that the peer has received all ``count``.
    """
    ctl, data = node._peer(body["control"], body["data"])
    count = int(body["count"])
    header, raw = encode(MsgType.DATA, {})
    done = asyncio.Event()

    async def flood():
        i = 0
        while i < count:
            if node.pl.send(data, [header, raw]):
                i += 1
                if i % 128 == 0:
                    await asyncio.sleep(0)  # let PONGs in, so pings measure the receiver
            elif not await node.pl.writable(data, timeout=REPLY_TIMEOUT):
                raise RuntimeError(f"data plane stuck after {i} messages")

    started = time.perf_counter()
    task = node.pl.spawn(flood(), name="burst")
    task.add_done_callback(lambda t: done.set())
    rtts, during, received = [], 0, 0
    while received < count:
        rtt, received = await node.ping(ctl)
        if received < count:
            rtts.append(rtt)
            during += 1
        if task.done() and task.exception() is not None:
            raise task.exception()
        await asyncio.sleep(PING_GAP)
    seconds = time.perf_counter() - started
    await done.wait()
    return {"count": count, "seconds": seconds, "pings_during": during, "rtt": _percentiles(rtts)}


async def _cmd_stats(node: _Node, body: dict) -> dict:
    """``{"cmd": "stats"}``: this node's PlaneLoop counters and data received."""
    return {"name": node.name, "received": node.received, "statistics": node.pl.statistics().as_dict()}


async def _cmd_stop(node: _Node, body: dict) -> dict:
    """``{"cmd": "stop"}``: reply, then leave."""
    asyncio.get_running_loop().call_later(0.05, node.stopping.set)  # let the REPLY go out first
    return {"name": node.name, "stopping": True}


#: The commands a demo node understands: name -> coroutine(node, body) -> reply body.
NODE_COMMANDS: dict[str, Callable[[_Node, dict], Awaitable[dict]]] = {
    "ping": _cmd_ping,
    "burst": _cmd_burst,
    "stats": _cmd_stats,
    "stop": _cmd_stop,
}


DEMO_KEY_VAR = "SNSBUS_DEMO_KEY"  # "PUBLIC:SECRET" in hex: the tour's key pair, shared with its nodes


def _demo_security(pair=None):
    """CURVE for the tour and its nodes: one key pair, pinned as the 'manager' key and admitted."""
    from bus.security import KeyPair, Security, decode_key

    if pair is None:
        public, _, secret = os.environ[DEMO_KEY_VAR].partition(":")
        pair = KeyPair(decode_key(public), decode_key(secret))
    return Security(pair, manager_key=pair.public)


async def serve_node(name: str, control_bind: str, data_bind: str) -> None:
    """Run one demo bus node until a ``stop`` command or SIGTERM/SIGINT.

    Prints one JSON line on stdout with its real endpoints once it is serving.
    """
    ctx = zmq.Context()
    factory = SocketFactory(ctx, linger=0, security=_demo_security())
    pl = PlaneLoop()
    node = _Node(name, factory, pl)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, node.stopping.set)
    try:
        async with pl:
            print(json.dumps(node.bind(control_bind, data_bind)), flush=True)
            await node.stopping.wait()
    finally:
        factory.close(0)
        ctx.term()


# --------------------------------------------------------------------------
# the tour (parent process)
# --------------------------------------------------------------------------


@dataclass
class _Proc:
    name: str
    process: asyncio.subprocess.Process
    info: dict
    link: zmq.Socket  # our control DEALER to the node's control ROUTER


@dataclass
class Tour:
    """State shared by the tour steps: the nodes, a control client and the results."""

    count: int
    out: Callable[[str], None] = print
    procs: dict[str, _Proc] = field(default_factory=dict)
    results: dict = field(default_factory=dict)
    ctx: zmq.Context | None = None
    factory: SocketFactory | None = None
    pl: PlaneLoop | None = None
    _replies: dict[int, asyncio.Future] = field(default_factory=dict)

    async def start_node(self, name: str) -> _Proc:
        """Start ``python -m tools.demo node`` and connect a control link to it."""
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        pair = self.factory.security.keypair
        env[DEMO_KEY_VAR] = f"{pair.public.hex()}:{pair.secret.hex()}"
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tools.demo", "node", "--name", name,
            cwd=ROOT, env=env, stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        try:
            line = await asyncio.wait_for(process.stdout.readline(), START_TIMEOUT)
            info = json.loads(line)
        except (asyncio.TimeoutError, ValueError) as e:
            process.kill()
            await process.wait()
            raise RuntimeError(f"node {name} did not report its endpoints: {e}") from e
        link = self.factory.control_dealer(info["control"], b"tour")
        self.pl.add(link, Plane.CONTROL, self._on_reply(link), name=f"tour->{name}")
        proc = _Proc(name, process, info, link)
        self.procs[name] = proc
        return proc

    def _on_reply(self, link: zmq.Socket) -> Callable[[list], None]:
        def handler(batch: list) -> None:
            for frames in batch:
                decoded = self.pl.decode(link, frames)
                if decoded is None:
                    continue
                fut = self._replies.pop(decoded[1].header.ref, None)
                if fut is not None and not fut.done():
                    fut.set_result(decoded[1])

        return handler

    async def command(self, name: str, cmd: str, **args) -> dict:
        """Send ``{"cmd": cmd, **args}`` to a node; its REPLY body (raises on an error reply)."""
        frames = encode(MsgType.COMMAND, {"cmd": cmd, **args})
        fut = asyncio.get_running_loop().create_future()
        self._replies[int.from_bytes(frames[0][4:12], "little")] = fut
        link = self.procs[name].link
        while not self.pl.send(link, frames):
            await self.pl.writable(link, timeout=1.0)
        reply = await asyncio.wait_for(fut, REPLY_TIMEOUT)
        if reply.header.flags & Flag.ERROR:
            raise RuntimeError(f"{name}: {cmd} failed: {reply.body.get('error')}")
        return reply.body

    async def close(self) -> list[str]:
        """Stop every node (command, then TERM, then KILL) and reap it; returns problems."""
        problems = []
        for name, proc in self.procs.items():
            if proc.process.returncode is None:
                try:
                    await self.command(name, "stop")
                    await asyncio.wait_for(proc.process.wait(), 5.0)
                except (asyncio.TimeoutError, RuntimeError, zmq.ZMQError) as e:
                    problems.append(f"{name} did not stop on request ({e}); terminating")
                    proc.process.terminate()
                    try:
                        await asyncio.wait_for(proc.process.wait(), 5.0)
                    except asyncio.TimeoutError:
                        proc.process.kill()
                        await proc.process.wait()
            if proc.process.returncode != 0:
                problems.append(f"{name} exited with status {proc.process.returncode}")
        return problems


TourStep = Callable[[Tour], Awaitable[None]]

#: The tour, in order: (title, step).  Append with :func:`tour_step`.
STEPS: list[tuple[str, TourStep]] = []


def tour_step(title: str) -> Callable[[TourStep], TourStep]:
    """Decorator: append ``step`` to :data:`STEPS` under ``title``."""

    def register(step: TourStep) -> TourStep:
        STEPS.append((title, step))
        return step

    return register


@tour_step("start two bus processes")
async def step_start(tour: Tour) -> None:
    for name in ("alpha", "beta"):
        p = await tour.start_node(name)
        tour.out(f"      {name:<6} pid {p.info['pid']:<7} control {p.info['control']}  data {p.info['data']}")


@tour_step("control plane ping-pong, idle")
async def step_ping(tour: Tour) -> None:
    alpha = tour.procs["alpha"].info
    r = await tour.command("beta", "ping", control=alpha["control"], data=alpha["data"], count=50)
    rtt = r["rtt"]
    tour.results["idle_rtt"] = rtt
    tour.out(f"      beta -> alpha: {rtt['n']} pings, RTT p50 {_ms(rtt['p50'])}  p99 {_ms(rtt['p99'])}")


@tour_step("data plane burst while the control plane keeps answering")
async def step_burst(tour: Tour) -> None:
    alpha = tour.procs["alpha"].info
    r = await tour.command("beta", "burst", control=alpha["control"], data=alpha["data"], count=tour.count)
    tour.results["burst"] = r
    rate = r["count"] / r["seconds"]
    tour.out(f"      beta -> alpha: {r['count']:,} messages in {r['seconds']:.2f} s = {rate:,.0f} msg/s")
    rtt = r["rtt"]
    if rtt["n"]:
        tour.out(
            f"      control RTT during the burst: {rtt['n']} pings answered mid-burst, "
            f"p50 {_ms(rtt['p50'])}  p99 {_ms(rtt['p99'])}  max {_ms(rtt['max'])}"
        )
    else:
        tour.out("      the burst finished before the first ping came back")


@tour_step("counters from PlaneLoop.statistics()")
async def step_counters(tour: Tour) -> None:
    for name in ("alpha", "beta"):
        r = await tour.command(name, "stats")
        tour.results[f"stats_{name}"] = r
        st = r["statistics"]
        for plane in ("control", "data"):
            p = st[plane]
            dropped = sum(p["dropped"].values())
            tour.out(
                f"      {name:<6} {plane:<7} recv {p['messages']:>8,} in {p['batches']:>5,} batches "
                f"(max {p['max_batch']:>3})  sent {p['sent']:>8,}  eagain {p['send_eagain']:>5,}  "
                f"queued {p['send_queued']:>3}  dropped {dropped}"
            )


async def run_tour(count: int = 100_000, out: Callable[[str], None] = print, steps=None) -> int:
    """Run ``steps`` (default :data:`STEPS`), always stop the nodes; 0 on success."""
    steps = STEPS if steps is None else steps
    tour = Tour(count=count, out=out)
    from bus.security import KeyPair

    tour.ctx = zmq.Context()
    tour.factory = SocketFactory(tour.ctx, linger=0, security=_demo_security(KeyPair.generate()))
    tour.pl = PlaneLoop()
    status = 0
    out("snsbus demo: two planes (control and data never share a socket), CurveZMQ on every socket")
    try:
        async with tour.pl:
            try:
                for i, (title, step) in enumerate(steps, 1):
                    out(f"  [{i}/{len(steps) + 1}] {title}")
                    await step(tour)
            except Exception as e:
                logger.error("tour step failed: %s", e, exc_info=logger.isEnabledFor(logging.DEBUG))
                out(f"      FAILED: {e}")
                status = 1
            finally:
                out(f"  [{len(steps) + 1}/{len(steps) + 1}] stop")
                problems = await tour.close()
                for p in problems:
                    out(f"      {p}")
                if problems:
                    status = 1
                else:
                    out(f"      {len(tour.procs)} processes stopped and reaped")
    finally:
        tour.factory.close(0)
        tour.ctx.term()
    return status


def main(argv: list[str] | None = None) -> int:
    """CLI entry: the tour (default) or one demo ``node``."""
    parser = argparse.ArgumentParser(prog="python -m tools.demo", description="A guided tour of snsbus.")
    parser.add_argument("--count", type=int, default=100_000, help="data-plane burst size (default 100000)")
    parser.add_argument("--log-level", default="WARNING")
    sub = parser.add_subparsers(dest="role")
    node = sub.add_parser("node", help="run one demo bus node (started by the tour)")
    node.add_argument("--name", required=True)
    node.add_argument("--control", default="tcp://127.0.0.1:0")
    node.add_argument("--data", default="tcp://127.0.0.1:0")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.role == "node":
        asyncio.run(serve_node(args.name, args.control, args.data))
        return 0
    if args.count < 1:
        parser.error("--count must be >= 1")
    status = asyncio.run(run_tour(args.count))
    from tools import demo_apps, demo_cluster, demo_transend

    status = status or demo_cluster.run()
    status = status or demo_apps.run()
    return status or demo_transend.run()


if __name__ == "__main__":
    sys.exit(main())
