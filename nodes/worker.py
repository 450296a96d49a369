"""A TACC worker instance's process: both ends of the pipe between it and the stub.

The worker stub (:mod:`nodes.stub`) starts one process per worker instance
with ``python -m nodes.worker`` (:meth:`WorkerProcess.start`, the stub's end)
and talks to it over the process's stdin and stdout pipes (:func:`main`, the
process's end).  The process imports the registered callable
(``module:function``) once, then serves one request at a time until its
stdin closes.

Pipe messages mirror the bus framing (a msgpack body, then raw bytes frames)
so inputs and results of up to ``bus.protocol.MAX_FRAME`` bytes travel
without being packed into msgpack::

    u32 frame count, then per frame: u32 length, the bytes   (little-endian)

Frame 0 is a msgpack map (packed by :mod:`bus.protocol`, the only msgpack
configuration); the rest are raw bytes.  The conversation:

1. stub -> process: ``{"callable", "kind", "path"}`` (``path``: entries put in
   front of ``sys.path`` before the import).
2. process -> stub: ``{"ready": true, "pid"}``, or ``{"ready": false,
   "err"}`` and the process exits.
3. For each request, stub -> process: ``{"p": params, "dl"?}`` + the input objects;
   process -> stub: ``{"ok": true, "ct", "info", "run_s"}`` + the result (``run_s``:
   the callable's own time, so the stub can tell its overhead), or
   ``{"ok": false, "err"}`` when the callable raised (the process keeps
   serving).  A process that dies instead has crashed; the stub restarts it.
   Answers come in the order of the requests.

The stub may write requests before the last one is answered (pipelining: the
next request is there the moment the process is free, and a quick callable
gets several per write, so each side wakes once per batch, not per request).  A request written behind others carries
``dl``, its deadline on the host's monotonic clock (``time.monotonic()``,
the same in every process); if it passed while the request waited behind the
ones ahead of it, the process answers ``{"ok": false, "code": "deadline",
"err"}`` without running it.  Each answer is written as soon as it is made:
the answers that reached the pipe before a crash are the stub's to read, so
the first request not answered is the one that was running.

The callable takes ``{"params": map, "data": bytes}`` (transformation) or
``{"params": map, "items": [bytes, ...]}`` (aggregation) and returns
``{"data": bytes, "content_type": str, "info": map}`` (or just bytes).

Before anything else the process moves the protocol off fds 0 and 1 and
points fd 1 at stderr, so a ``print()`` in the callable cannot corrupt the
pipe; it also runs in its own session, so a Ctrl-C at the bus-node's terminal
reaches the stub, which stops its workers itself.
"""

from __future__ import annotations

import fcntl
import importlib
import os
import signal
import struct
import sys
import time
from pathlib import Path
from typing import BinaryIO, Callable, Mapping

from bus import protocol as p  # msgpack and the header codec: no zmq, no asyncio

__all__ = [
    "TRANSFORMATION",
    "AGGREGATION",
    "KINDS",
    "PipeError",
    "pack_message",
    "read_message",
    "MessageReader",
    "WorkerProcess",
    "load_callable",
    "tune_allocator",
    "main",
]

TRANSFORMATION = "transformation"
AGGREGATION = "aggregation"
KINDS = (TRANSFORMATION, AGGREGATION)
ENTRY_POINT_GROUP = "snsbus.workers"  # callable="entrypoint:NAME" loads a worker registered there

_U32 = struct.Struct("<I")
MAX_FRAMES = p.MAX_EXTRA + 1  # a body and the extra frames of one bus message
DEFAULT_CONTENT_TYPE = "application/octet-stream"
STOP_GRACE = 1.0  # seconds a process gets to exit once its stdin closed
_COALESCE = 64 * 1024  # messages up to this size go to the pipe in one write
_READ_BUFFER = 64 * 1024  # the process's read buffer: the small requests written together come in one read
DEADLINE_CODE = "deadline"  # the code of an answer to a request whose ``dl`` passed in the pipe
PIPE_SIZE = 1 << 20  # bytes of each pipe's kernel buffer, where the system allows
_ROOT = str(Path(__file__).resolve().parent.parent)  # the directory holding the nodes package


class PipeError(Exception):
    """The other end broke the pipe protocol (or went away mid-message)."""


def pack_message(frames) -> list:
    """The pieces to write for one message of ``frames`` (bytes-like), in order."""
    out = [_U32.pack(len(frames))]
    for frame in frames:
        out.append(_U32.pack(len(frame)))
        out.append(frame)
    return out


def read_message(f: BinaryIO, max_frame: int) -> list | None:
    """One message from a blocking binary file; None at a clean end of file."""
    head = f.read(4)
    if not head:
        return None
    if len(head) < 4:
        raise PipeError("the pipe closed inside a message")
    (count,) = _U32.unpack(head)
    if not 1 <= count <= MAX_FRAMES:
        raise PipeError(f"a message of {count} frames")
    frames = []
    for _ in range(count):
        raw = f.read(4)
        if len(raw) < 4:
            raise PipeError("the pipe closed inside a message")
        (n,) = _U32.unpack(raw)
        if n > max_frame:
            raise PipeError(f"a frame of {n} bytes exceeds {max_frame}")
        frame = f.read(n)
        if len(frame) < n:
            raise PipeError("the pipe closed inside a message")
        frames.append(frame)
    return frames


class MessageReader:
    """Messages parsed from the chunks a non-blocking pipe delivers (the stub's end)."""

    def __init__(self, max_frame: int = p.MAX_FRAME):
        self._buf = bytearray()
        self._max = max_frame

    def feed(self, data: bytes) -> list:
        """The messages completed by ``data``; raises :class:`PipeError` on nonsense.

        Each frame is copied once, out of ``data`` itself when nothing was
        left over from the last chunk (the usual case), so only an incomplete
        tail is ever buffered.
        """
        buf = self._buf
        if buf:
            buf += data
            src = buf
        else:
            src = data
        out, pos = [], 0
        with memoryview(src) as view:
            while True:
                msg, end = self._one(src, view, pos)
                if msg is None:
                    break
                out.append(msg)
                pos = end
        if src is buf:
            if pos:
                del buf[:pos]  # cheap: CPython trims a bytearray's head in place
        elif pos < len(data):
            buf += data[pos:] if pos else data
        return out

    def _one(self, buf, view: memoryview, pos: int):
        have = len(buf)
        if have - pos < 4:
            return None, pos
        (count,) = _U32.unpack_from(buf, pos)
        if not 1 <= count <= MAX_FRAMES:
            raise PipeError(f"a message of {count} frames")
        off, sizes = pos + 4, []
        for _ in range(count):
            if have - off < 4:
                return None, pos
            (n,) = _U32.unpack_from(buf, off)
            if n > self._max:
                raise PipeError(f"a frame of {n} bytes exceeds {self._max}")
            off += 4 + n
            if off > have:
                return None, pos  # the rest has not arrived yet
            sizes.append(n)
        frames, off = [], pos + 4
        for n in sizes:
            frames.append(view[off + 4:off + 4 + n].tobytes())
            off += 4 + n
        return frames, off


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
_allocator_tuned = False


def tune_allocator(mmap_threshold: int = 16 << 20, trim_threshold: int = 64 << 20) -> bool:
    """Have this process's glibc malloc keep freed large buffers for reuse; True if it did (once per process).

    By default glibc serves a buffer over its mmap threshold (128 KiB at
    first, moved as such buffers come and go) with a fresh mapping, unmaps
    it when freed and trims the heap as it shrinks, so a process that moves
    images keeps paying for page faults on zeroed pages.  Buffers up to
    ``mmap_threshold`` then come from the heap, which keeps up to
    ``trim_threshold`` bytes free for the next ones.  Called by the bus's
    data movers (the front end, the worker stub), not by worker processes:
    their callables allocate as they would anywhere else.
    """
    global _allocator_tuned
    if _allocator_tuned:
        return True
    try:
        import ctypes

        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False  # not glibc (or no C library to ask): the default allocator works too
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    _allocator_tuned = bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(
        mallopt(_M_TRIM_THRESHOLD, trim_threshold))
    return _allocator_tuned


def _killpg(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass  # the group is gone already


def _widen(pipe_transport) -> None:
    # An image moves through a 64 KiB pipe in many wakeups of both processes;
    # a 1 MiB pipe (Linux, best effort) takes most in one write.
    setsize = getattr(fcntl, "F_SETPIPE_SZ", None)
    pipe = pipe_transport.get_extra_info("pipe") if pipe_transport is not None else None
    if setsize is None or pipe is None:
        return
    try:
        fcntl.fcntl(pipe.fileno(), setsize, PIPE_SIZE)
    except OSError:
        pass  # over /proc/sys/fs/pipe-max-size, or not Linux: the default size works too


class WorkerProcess:
    """The stub's end of one worker process, as an asyncio subprocess protocol.

    Messages from the process go to ``on_message(self, messages)``, a list of
    frame lists: every message one read of the pipe completed; its end
    goes to ``on_lost(self, why)``, once: the stdout pipe closing (at once on
    kill -9) or nonsense on it.  ``exited`` resolves to the exit code once
    asyncio's child watcher reaped it.  asyncio is imported only in these
    methods, so the worker process itself never loads it.
    """

    def __init__(self, on_message: Callable, on_lost: Callable):
        import asyncio

        self._on_message, self._on_lost = on_message, on_lost
        self.transport = None
        self.stdin = None
        self.reader = MessageReader()
        self.exited = asyncio.get_running_loop().create_future()
        self.lost = False

    @classmethod
    async def start(cls, fn: str, kind: str, path: list, on_message: Callable, on_lost: Callable) -> "WorkerProcess":
        """Start ``python -m nodes.worker`` and send it the callable to load; the greeting
        (``{"ready": ...}``) arrives as the first message.  Raises ``OSError``."""
        import asyncio

        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(x for x in (_ROOT, env.get("PYTHONPATH")) if x)
        _, proc = await asyncio.get_running_loop().subprocess_exec(
            lambda: cls(on_message, on_lost), sys.executable, "-m", "nodes.worker",
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=None, env=env,
            start_new_session=True,  # its own group: killed as a whole, deaf to the terminal's Ctrl-C
        )  # fmt: skip
        proc.send([p.packb({"callable": fn, "kind": kind, "path": [*path, *sys.path]})])
        return proc

    @property
    def pid(self) -> int:
        return self.transport.get_pid()

    # -- asyncio.SubprocessProtocol -----------------------------------------------------
    def connection_made(self, transport) -> None:
        self.transport = transport
        self.stdin = transport.get_pipe_transport(0)
        for fd in (0, 1):
            _widen(transport.get_pipe_transport(fd))

    def pause_writing(self) -> None:
        pass  # one request at a time: the pipe transport's buffer is bounded by it

    def resume_writing(self) -> None:
        pass

    def pipe_data_received(self, fd: int, data: bytes) -> None:
        try:
            messages = self.reader.feed(data)
        except PipeError as e:
            self._lose(f"it broke the pipe protocol: {e}")
            return
        if messages and not self.lost:
            # Every message of one read at once: the stub answers them and writes the next requests in one go.
            self._on_message(self, messages)

    def pipe_connection_lost(self, fd: int, exc) -> None:
        if fd == 1:
            self._lose("its pipe closed")

    def process_exited(self) -> None:
        if not self.exited.done():
            self.exited.set_result(self.transport.get_returncode())
        if not self.lost:
            # Exited, and something it started may still hold stdout open: end the group.
            _killpg(self.pid, signal.SIGKILL)

    def connection_lost(self, exc) -> None:
        pass  # every pipe is closed and the process reaped: nothing left to do

    def _lose(self, why: str) -> None:
        if not self.lost:
            self.lost = True
            self._on_lost(self, why)

    # -- use ----------------------------------------------------------------------------
    def send(self, frames) -> None:
        """Write one message (never blocks: the pipe transport buffers what does not fit)."""
        self.send_many((frames,))

    def send_many(self, messages) -> None:
        """Write several messages, small ones in one write (one syscall, one wakeup of the process)."""
        if self.lost or self.stdin.is_closing():
            return  # its end is on its way to on_lost
        pieces = []
        for frames in messages:
            pieces += pack_message(frames)
        if sum(map(len, pieces)) <= _COALESCE:
            self.stdin.write(b"".join(pieces))
        else:
            for piece in pieces:
                self.stdin.write(piece)  # no copy of big inputs

    async def retire(self, graceful: bool) -> None:
        """End the process (EOF on its stdin first when ``graceful``, else or then SIGKILL) and reap it."""
        import asyncio

        self.lost = True
        pid = self.pid
        if graceful and not self.exited.done():
            self.stdin.close()
            try:
                await asyncio.wait_for(asyncio.shield(self.exited), STOP_GRACE)
            except asyncio.TimeoutError:
                pass
        if not self.exited.done():
            _killpg(pid, signal.SIGKILL)
        await self.exited
        _killpg(pid, signal.SIGKILL)  # whatever it started dies with it
        self.transport.close()


def load_callable(spec: str):
    """Import ``module:function`` (dots allowed after the colon) and return the callable.

    ``"a:f | b:g | c:h"`` is a pipeline, as in a Unix shell: each stage's result
    (its data and content type) is the next stage's input, every stage gets the
    request's params, and the answer carries each stage's info under ``stages``.
    The first stage may be an aggregation; the others are transformations.
    """
    if "|" in spec:
        stages = [load_callable(part.strip()) for part in spec.split("|")]
        names = [part.strip() for part in spec.split("|")]

        def pipeline(request):
            infos = []
            out = None
            for i, fn in enumerate(stages):
                if i:
                    data, ct, info = _result(out, p.MAX_FRAME)
                    infos.append(info)
                    request = {"params": request.get("params") or {}, "data": data, "content_type": ct}
                out = fn(request)
            data, ct, info = _result(out, p.MAX_FRAME)
            infos.append(info)
            return {"data": data, "content_type": ct,
                    "info": {**info, "stages": [{"stage": n, **inf} for n, inf in zip(names, infos)]}}

        return pipeline
    if spec.startswith("entrypoint:"):
        # A callable registered by an installed package under the "snsbus.workers" group.
        from importlib.metadata import entry_points

        name = spec.removeprefix("entrypoint:")
        found = entry_points(group=ENTRY_POINT_GROUP, name=name)
        if not found:
            known = sorted(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))
            raise LookupError(f"no worker {name!r} in the {ENTRY_POINT_GROUP!r} entry points; "
                              f"installed: {', '.join(known) or 'none'}")
        obj = next(iter(found)).load()
        if not callable(obj):
            raise TypeError(f"{spec} is a {type(obj).__name__}, not a callable")
        return obj
    module, sep, attr = spec.partition(":")
    if not sep or not module or not attr:
        raise ValueError(f"a worker callable is named 'module:function', not {spec!r}")
    obj = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(f"{spec} is a {type(obj).__name__}, not a callable")
    return obj


def _sentence(e: BaseException) -> str:
    text = str(e)
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _result(out, max_frame: int) -> tuple[bytes, str, dict]:
    if isinstance(out, (bytes, bytearray, memoryview)):
        data, ct, info = out, DEFAULT_CONTENT_TYPE, {}
    elif isinstance(out, Mapping):
        data = out.get("data")
        ct = out.get("content_type") or DEFAULT_CONTENT_TYPE
        info = out.get("info") or {}
    else:
        raise TypeError(f"the worker returned a {type(out).__name__}; expected a dict with 'data' or bytes")
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"the worker's 'data' is a {type(data).__name__}, not bytes")
    if not isinstance(ct, str) or not isinstance(info, Mapping):
        raise TypeError("the worker's 'content_type' must be a str and its 'info' a map")
    if len(data) > max_frame:
        raise ValueError(f"the result of {len(data)} bytes exceeds the bus frame limit of {max_frame} bytes")
    return data, ct, dict(info)


def _write_all(fd: int, pieces: list) -> None:
    """Write ``pieces`` to the blocking ``fd``, small ones joined into one write."""
    if sum(map(len, pieces)) <= _COALESCE:
        pieces = [b"".join(pieces)]
    for piece in pieces:
        view = memoryview(piece).cast("B")
        while view:
            view = view[os.write(fd, view):]


def _serve(rf: BinaryIO, wfd: int) -> int:
    hello = read_message(rf, p.MAX_BODY)
    if hello is None:
        return 0
    init = p.unpackb(hello[0])
    try:
        extra = [d for d in init.get("path") or () if isinstance(d, str) and d not in sys.path]
        sys.path[:0] = extra
        fn = load_callable(init.get("callable", ""))
    except Exception as e:  # whatever the import raised goes back as one sentence
        _write_all(wfd, pack_message([p.packb({"ready": False, "err": f"cannot load {init.get('callable')!r}: "
                                                                       f"{_sentence(e)}"})]))  # fmt: skip
        return 1
    aggregation = init.get("kind") == AGGREGATION
    _write_all(wfd, pack_message([p.packb({"ready": True, "pid": os.getpid()})]))
    perf = time.perf_counter
    while True:
        msg = read_message(rf, p.MAX_FRAME)  # small requests: several per read of the pipe (buffered)
        if msg is None:
            return 0  # the stub closed our stdin: a clean stop
        meta = p.unpackb(msg[0])
        dl = meta.get("dl")
        t0 = perf()
        if isinstance(dl, float) and time.monotonic() > dl:
            # It waited in the pipe behind other requests for longer than it had left.
            answer = [p.packb({"ok": False, "code": DEADLINE_CODE, "err": "its deadline passed while it waited"})]
        else:
            request = {"params": meta.get("p") or {}}
            if aggregation:
                request["items"] = msg[1:]
            else:
                request["data"] = msg[1] if len(msg) > 1 else b""
            try:
                data, ct, info = _result(fn(request), p.MAX_FRAME)
                head = p.packb({"ok": True, "ct": ct, "info": info, "run_s": perf() - t0})
                if len(head) > p.MAX_BODY // 2:
                    raise ValueError(f"the worker's info takes {len(head)} bytes once packed; keep it small")
                answer = [head, data]
            except Exception as e:  # the callable's failure is the request's answer, not ours
                answer = [p.packb({"ok": False, "err": _sentence(e)})]
        _write_all(wfd, pack_message(answer))


def main() -> int:
    # The protocol gets private copies of the pipes; fd 0 becomes /dev/null and
    # fd 1 the stderr, so stray reads and prints cannot touch the protocol.
    rfd, wfd = os.dup(0), os.dup(1)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    os.dup2(2, 1)
    with os.fdopen(rfd, "rb", buffering=_READ_BUFFER) as rf:
        try:
            return _serve(rf, wfd)
        except (PipeError, BrokenPipeError):
            return 2  # the stub went away or spoke nonsense: nothing left to serve
        finally:
            os.close(wfd)


if __name__ == "__main__":
    sys.exit(main())
