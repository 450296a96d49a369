"""The manager's XML-RPC API: Plush's programmatic interface, on the standard library.

Off unless enabled (``python -m manager --xmlrpc 7072``, or ``xmlrpc = "7072"`` in
``[manager]`` of snsbus.toml).  It binds loopback; another address is refused
unless ``allow_remote`` is set, and then a token is required.  With a token,
every request must carry it as the HTTP basic-auth password (any user name):
``ServerProxy("http://snsbus:TOKEN@127.0.0.1:7072/")``.

Each method runs the manager's control API (:mod:`manager.commands`) on the
manager's event loop (``asyncio.run_coroutine_threadsafe``) from the server's
request threads, so XML-RPC never touches manager state from another thread.
The spec parser (lxml) also runs on that loop.

Methods (the docstrings below are served by ``system.methodHelp``; the full
table is in docs/operations.md):

====================================  ==============================================================
``ping()``                            ``{pid, epoch, uptime, members}``
``list_nodes(selector="")``           ``[{id, name, parent, depth, children, subtree, state, attrs, ...}]``
``load_spec(spec, resources, opts)``  ``{ok, handle, app, components, resources, assignment, unmet}``
                                      or ``{ok: false, problems: [{file, line, column, message, text}]}``
``deploy(handle, opts)``              ``{app, gen, already, phase, assignment}`` (returns at once)
``wait(app, timeout=600)``            progress, once the phase is no longer ``deploying``
``progress(app)`` / ``status(app)``   the manager's record / plus every process, asked of the nodes
``stop`` / ``start`` / ``cleanup``    ``{app, done, failed, missing}`` (+ ``removed`` for cleanup)
``exec(cmd, selector="", timeout)``   ``{groups: [{stdout, stderr, rc, nodes}], missing, expected, ...}``
``logs(app, opts)``                   ``{logs: {node: {process: {text, offset, size}}}, missing}``
``apps()`` / ``services()``           applications and their phase / the TACC load table
====================================  ==============================================================

Values are made XML-RPC safe: map keys are strings; keys whose value is null
are left out (no ``<nil/>``, which many clients refuse); integers outside
XML-RPC's 32-bit ``<int>`` and every node id (``id``, ``parent``, ``path``,
``epoch``) are decimal strings; characters XML cannot carry (control
characters other than tab and newline) become U+FFFD.

Errors are :class:`xmlrpc.client.Fault` with ``faultCode`` from
:data:`FAULT_CODES` and ``faultString`` ``"CODE: sentence"``.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import hashlib
import hmac
import inspect
import ipaddress
import logging
import math
import os
import re
import socket
import socketserver
import threading
import time
from collections import OrderedDict
from pathlib import Path
from xmlrpc.client import Binary, Fault
from xmlrpc.server import SimpleXMLRPCRequestHandler, SimpleXMLRPCServer

from core.errors import BusError
from manager import commands

__all__ = ["FAULT_CODES", "XmlRpcError", "XmlRpcServer", "start_xmlrpc", "parse_address", "to_xmlrpc",
           "is_loopback", "METHODS"]

log = logging.getLogger(__name__)

#: faultCode of each error; the control API's own codes keep their names in faultString.
FAULT_CODES = {
    "BAD_ARGS": 2,  # wrong arguments (types, counts, values)
    "UNKNOWN_METHOD": 3,
    "BAD_SELECTOR": 4,  # the selector matches no live node (bus-ctl exits 4 for the same)
    "TIMEOUT": 5,  # the manager did not finish in time (bus-ctl exits 5)
    "FAILED": 6,  # any other refusal of the manager (e.g. it runs without a state directory)
    "BAD_SPEC": 10,  # the spec or resource directory is invalid (see load_spec for the problems)
    "NOT_ENOUGH_NODES": 11,  # fewer live matching nodes than a component needs
    "BAD_PACKAGE": 12,  # a package is missing, unreadable or fails its sha256
    "NO_SUCH_APP": 13,
    "NO_SUCH_HANDLE": 14,  # deploy(handle) with a handle load_spec never gave (or forgot)
    "STOPPING": 15,  # the manager is shutting down
}

INT32 = 1 << 31
ID_KEYS = frozenset({"id", "parent", "path", "epoch", "ids"})
_BAD_XML_CHARS = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")
_HANDLES = 64  # loaded specs kept (least recently used dropped)
_POLL = 0.25  # seconds between progress polls in wait()
_MARGIN = 30.0  # seconds a call waits for the manager beyond the command's own timeout
_DEPLOY_CHECK = 600.0  # seconds deploy() waits for the manager's checks (web packages are downloaded then)


class XmlRpcError(BusError, ValueError):
    """The XML-RPC server cannot be started as asked (address, token)."""


def _fault(code: str, message: str) -> Fault:
    return Fault(FAULT_CODES.get(code, FAULT_CODES["FAILED"]), f"{code}: {message}")


# ------------------------------------------------------------------------ values


def to_xmlrpc(value, as_id: bool = False):
    """``value`` (msgpack/JSON-shaped) as something every XML-RPC client can read; see the module doc."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return str(value) if as_id or not -INT32 <= value < INT32 else value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, str):
        return _BAD_XML_CHARS.sub("\ufffd", value)
    if isinstance(value, dict):
        return {to_xmlrpc(str(k)): to_xmlrpc(v, str(k) in ID_KEYS) for k, v in value.items() if v is not None}
    if isinstance(value, (set, frozenset)):
        value = sorted(value, key=str)
    if isinstance(value, (list, tuple)):
        return ["" if v is None else to_xmlrpc(v, as_id) for v in value]
    if isinstance(value, (bytes, bytearray, memoryview)):
        return Binary(bytes(value))
    if value is None:
        return ""
    return to_xmlrpc(str(value))


# ------------------------------------------------------------------------ addresses


def parse_address(text: str) -> tuple[str, int]:
    """``PORT``, ``HOST:PORT`` or ``[V6]:PORT`` -> (host, port); the host defaults to 127.0.0.1."""
    text = str(text).strip()
    host, port = "127.0.0.1", text
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep:
            raise XmlRpcError(f"{text!r}: expected [ADDRESS]:PORT")
    elif ":" in text:
        host, _, port = text.rpartition(":")
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise XmlRpcError(f"{text!r}: expected PORT or HOST:PORT with a port from 0 to 65535")
    return host or "127.0.0.1", int(port)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# ------------------------------------------------------------------------ the methods


def _need_str(value, what: str, empty: bool = False) -> str:
    if not isinstance(value, str) or (not empty and not value):
        raise _fault("BAD_ARGS", f"{what} must be a {'string' if empty else 'non-empty string'}")
    return value


def _need_seconds(value, what: str = "timeout") -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 86400:
        raise _fault("BAD_ARGS", f"{what} must be a number of seconds, more than 0")
    return float(value)


def _options(opts, allowed: dict) -> dict:
    if opts in ("", None):
        return {}
    if not isinstance(opts, dict):
        raise _fault("BAD_ARGS", "options must be a struct")
    for k, v in opts.items():
        if k not in allowed:
            raise _fault("BAD_ARGS", f"unknown option {k!r}; known: {', '.join(allowed)}")
        if not isinstance(v, allowed[k]) or (allowed[k] is not bool and isinstance(v, bool)):
            raise _fault("BAD_ARGS", f"option {k!r} has the wrong type ({type(v).__name__})")
    return dict(opts)


async def _run(fn, *args):
    return fn(*args)


class _Api:
    """The XML-RPC methods.  Each public method's docstring is its ``system.methodHelp``."""

    def __init__(self, mgr, loop: asyncio.AbstractEventLoop):
        self.mgr = mgr
        self.loop = loop
        self.closing = threading.Event()
        self.pending: set[concurrent.futures.Future] = set()
        self._lock = threading.Lock()
        self._handles: OrderedDict[str, dict] = OrderedDict()

    # -- plumbing --------------------------------------------------------------------------
    def _on_loop(self, coro, wait: float):
        """Run ``coro`` on the manager's loop; its result, or a Fault."""
        if self.closing.is_set() or self.loop.is_closed():
            coro.close()
            raise _fault("STOPPING", "the manager is stopping")
        try:
            fut = asyncio.run_coroutine_threadsafe(coro, self.loop)
        except RuntimeError:  # the loop closed between the check and the call
            coro.close()
            raise _fault("STOPPING", "the manager is stopping") from None
        with self._lock:
            self.pending.add(fut)
        deadline = time.monotonic() + wait
        try:
            while True:
                try:
                    return fut.result(timeout=min(0.2, max(0.0, deadline - time.monotonic())))
                except concurrent.futures.TimeoutError:
                    if self.closing.is_set():
                        fut.cancel()
                        raise _fault("STOPPING", "the manager is stopping") from None
                    if time.monotonic() >= deadline:
                        fut.cancel()
                        raise _fault("TIMEOUT", f"the manager did not answer within {wait:g}s") from None
        except concurrent.futures.CancelledError:
            raise _fault("STOPPING", "the manager is stopping") from None
        finally:
            with self._lock:
                self.pending.discard(fut)

    def _cmd(self, cmd: str, args: dict | None = None, wait: float = _MARGIN):
        reply = self._on_loop(commands.dispatch(self.mgr, {"cmd": cmd, "args": args or {}}), wait)
        if not reply.get("ok"):
            raise _fault(str(reply.get("code") or "FAILED"), str(reply.get("error")))
        return reply["result"]

    def _read(self, text_or_path: str, what: str, cwd: str) -> tuple[str | None, str, str | None]:
        """(XML text, file name, problem): XML text is used as is; anything else is a path to read."""
        if text_or_path.lstrip("\ufeff \t\r\n").startswith("<"):
            return text_or_path, f"<{what}>", None
        path = Path(text_or_path).expanduser()
        path = path if path.is_absolute() else Path(cwd) / path
        try:
            return path.read_text(encoding="utf-8"), str(path.resolve()), None
        except (OSError, UnicodeDecodeError) as e:
            why = e.strerror if isinstance(e, OSError) else "not UTF-8 text"
            return None, str(path), f"cannot read the {what} {path}: {why}"

    def _check(self, spec_text, spec_file, res_text, res_file) -> dict:
        """Runs on the manager's loop: parse both documents, match components to live nodes."""
        from manager import plan
        from manager.resources import NotEnoughResources, parse_directory
        from manager.spec import SpecError, parse

        problems, app, resources = [], None, None
        try:
            app = parse(spec_text, spec_file)
        except SpecError as e:
            problems += e.problems
        try:
            resources = parse_directory(res_text, res_file)
        except SpecError as e:
            problems += e.problems
        if problems:
            return {"ok": False, "problems": [{"file": p.file, "line": p.line, "column": p.column,
                                               "message": p.message, "text": str(p)} for p in problems]}
        live = [m.name for m in self.mgr.membership.alive() if m.name]
        try:
            assignment, unmet = plan.assign(app, resources, live), ""
        except NotEnoughResources as e:
            assignment, unmet = {}, str(e)
        return {"ok": True, "app": app.name,
                "components": [{"name": c.name, "num_hosts": c.num_hosts} for c in app.components],
                "resources": [r.name for r in resources], "assignment": assignment, "unmet": unmet}

    # -- methods -----------------------------------------------------------------------------
    def ping(self):
        """ping() -> {pid, epoch, uptime, members}: is the manager there, and how many nodes registered."""
        return self._cmd("ping")

    def list_nodes(self, selector=""):
        """list_nodes(selector="") -> [{id, name, parent, depth, children, subtree, control, data, pid, attrs,
        state, ...}]: the members of the tree (live and recently dead), optionally only those a selector
        picks ('web-*,db-?' globs on names, or 'key=value' on attributes)."""
        selector = _need_str(selector, "selector", empty=True)
        members = self._cmd("status")["members"]
        if selector.strip() in ("", "*"):
            return members
        from bus.policy import select

        chosen = set(select(members, selector))
        return [m for m in members if m["id"] in chosen]

    def load_spec(self, spec, resources, options=None):
        """load_spec(spec, resources, options={}) -> {ok: true, handle, app, components: [{name, num_hosts}],
        resources: [names], assignment: {component: [nodes]}, unmet} or {ok: false, problems: [{file, line,
        column, message, text}]}.

        spec and resources are XML text, or paths on the manager's machine (relative to options.cwd, else
        to the manager's working directory). Validates both (every problem as file:line:column), matches
        the components to the live nodes (unmet says which cannot be served now) and returns a handle for
        deploy(). options: cwd (where package paths are looked up; default the spec's directory and the
        manager's working directory), spec_file, resources_file (names used in problems)."""
        opts = _options(options, {"cwd": str, "spec_file": str, "resources_file": str})
        cwd = opts.get("cwd") or os.getcwd()
        spec_text, spec_file, p1 = self._read(_need_str(spec, "spec"), "spec", cwd)
        res_text, res_file, p2 = self._read(_need_str(resources, "resources"), "resources", cwd)
        spec_file, res_file = opts.get("spec_file") or spec_file, opts.get("resources_file") or res_file
        if p1 or p2:
            return {"ok": False, "problems": [{"file": f, "line": 0, "column": 0, "message": p, "text": p}
                                              for f, p in ((spec_file, p1), (res_file, p2)) if p]}
        out = self._on_loop(_run(self._check, spec_text, spec_file, res_text, res_file), _MARGIN)
        if not out["ok"]:
            return out
        digest = hashlib.sha256("\0".join((spec_text, res_text, spec_file, res_file, cwd)).encode()).hexdigest()
        handle = digest[:20]
        with self._lock:
            self._handles[handle] = {"spec": spec_text, "spec_file": spec_file, "resources": res_text,
                                     "resources_file": res_file, "cwd": cwd}
            self._handles.move_to_end(handle)
            while len(self._handles) > _HANDLES:
                self._handles.popitem(last=False)
        return {"handle": handle, **out}

    def deploy(self, handle, options=None):
        """deploy(handle, options={}) -> {app, gen, already, phase, assignment}: start deploying what
        load_spec(handle) loaded and return at once (follow it with wait() or progress()). The nodes must be
        in the tree already. Deploying the same spec again is a no-op while it is deployed (already: true)
        unless options.force. options: force (bool), timeout (seconds the whole deploy may take, 600)."""
        opts = _options(options, {"force": bool, "timeout": (int, float)})
        with self._lock:
            loaded = self._handles.get(_need_str(handle, "handle"))
        if loaded is None:
            raise _fault("NO_SUCH_HANDLE", f"no spec loaded as {handle!r}; call load_spec() first "
                                           f"(the last {_HANDLES} specs are kept)")
        timeout = _need_seconds(opts.get("timeout", 600.0))
        args = dict(loaded, force=bool(opts.get("force")), timeout=timeout)
        return self._cmd("deploy", args, wait=_DEPLOY_CHECK)

    def progress(self, app):
        """progress(app) -> {name, phase, gen, error, assignment, replaced, phases: [{key, state, component,
        done, failed}], barriers, events: [[time, text]]}: the manager's record (no node is asked)."""
        return self._cmd("progress", {"app": _need_str(app, "app")})

    def wait(self, app, timeout=600):
        """wait(app, timeout=600) -> progress(app), returned once the phase is no longer 'deploying'
        (running, completed, failed, stopped) or when timeout seconds passed: check phase."""
        app, timeout = _need_str(app, "app"), _need_seconds(timeout)
        deadline = time.monotonic() + timeout
        while True:
            prog = self._cmd("progress", {"app": app})
            if prog.get("phase") != "deploying" or time.monotonic() >= deadline:
                return prog
            if self.closing.wait(min(_POLL, max(0.0, deadline - time.monotonic()))):
                raise _fault("STOPPING", "the manager is stopping")

    def status(self, app, timeout=5):
        """status(app, timeout=5) -> progress plus {processes: [{node, component, name, block, state, pid,
        restarts, exit_code, reason}], missing: [{node, reason}]}: asks every node of the application."""
        t = _need_seconds(timeout)
        return self._cmd("app_status", {"app": _need_str(app, "app"), "timeout": t}, wait=t + _MARGIN)

    def _app_op(self, cmd: str, app, timeout):
        t = _need_seconds(timeout)
        return self._cmd(cmd, {"app": _need_str(app, "app"), "timeout": t}, wait=t + _MARGIN)

    def stop(self, app, timeout=30):
        """stop(app, timeout=30) -> {app, done: [nodes], failed: {node: why}, missing: [{node, reason}]}:
        stop every process of the application (they are not restarted)."""
        return self._app_op("stop", app, timeout)

    def start(self, app, timeout=30):
        """start(app, timeout=30) -> {app, done, failed, missing}: start again what stop() stopped."""
        return self._app_op("start", app, timeout)

    def cleanup(self, app, timeout=30):
        """cleanup(app, timeout=30) -> {app, done, failed, missing, removed}: stop everything and remove the
        files on every node, then forget the application (removed: true); safe to repeat."""
        return self._app_op("cleanup", app, timeout)

    def exec(self, cmd, selector="", timeout=10):
        """exec(cmd, selector="", timeout=10) -> {groups: [{stdout, stderr, rc, nodes}], missing: [{node,
        reason}], expected, answered, elapsed}: run cmd through the shell on the selected nodes (all when
        selector is empty); identical outputs are grouped."""
        t = _need_seconds(timeout)
        args = {"cmd": _need_str(cmd, "cmd"), "selector": _need_str(selector, "selector", empty=True) or None,
                "timeout": t}
        return self._cmd("exec", args, wait=t + _MARGIN)

    def logs(self, app, options=None):
        """logs(app, options={}) -> {logs: {node: {process: {text, offset, size}}}, missing}: the tail of the
        output of the application's processes. options: node, process, stream ('out' or 'err'), tail (bytes
        per log, 8192), timeout (5)."""
        opts = _options(options, {"node": str, "process": str, "stream": str, "tail": int, "timeout": (int, float)})
        if opts.get("stream", "out") not in ("out", "err"):
            raise _fault("BAD_ARGS", "stream must be 'out' or 'err'")
        if not 0 < opts.get("tail", 8192) <= 1 << 20:
            raise _fault("BAD_ARGS", "tail must be a number of bytes from 1 to 1048576")
        t = _need_seconds(opts.get("timeout", 5.0))
        args = {"app": _need_str(app, "app"), "node": opts.get("node") or None,
                "process": opts.get("process") or None, "stream": opts.get("stream", "out"),
                "offsets": {}, "limit": opts.get("tail", 8192), "timeout": t}
        return self._cmd("logs", args, wait=t + _MARGIN)

    def apps(self):
        """apps() -> [{name, phase, gen, nodes, created, error}]: the applications the manager knows."""
        return self._cmd("apps")["apps"]

    def services(self):
        """services() -> {services: [...], events, counters, subscribers}: the TACC services' load table,
        spawns and reaps (the shape of `bus-ctl services --json`)."""
        return self._cmd("services")


METHODS = ("ping", "list_nodes", "load_spec", "deploy", "wait", "progress", "status", "stop", "start", "cleanup",
           "exec", "logs", "apps", "services")


# ------------------------------------------------------------------------ the server


class _Handler(SimpleXMLRPCRequestHandler):
    rpc_paths = ("/", "/RPC2")
    timeout = 30  # seconds a client may take to send its request

    def do_POST(self):
        token = self.server.token
        if token is not None and not _authorized(self.headers.get("Authorization"), token):
            self.close_connection = True
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="snsbus"')
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        super().do_POST()

    def log_message(self, format, *args):  # noqa: A002 (the stdlib's name)
        log.debug("%s %s", self.address_string(), format % args)


def _authorized(header: str | None, token: str) -> bool:
    if not header or not header.startswith("Basic "):
        return False
    try:
        _, _, password = base64.b64decode(header[6:].strip(), validate=True).decode("utf-8").partition(":")
    except (ValueError, UnicodeDecodeError):
        return False
    return hmac.compare_digest(password.encode(), token.encode())


class _Methods:
    """What ``register_instance`` needs: the dispatcher calls these for every name not in ``system.*``."""

    def __init__(self, api: _Api):
        self.api = api

    def _listMethods(self):
        return list(METHODS)

    def _methodHelp(self, method):
        fn = getattr(self.api, method) if method in METHODS else None
        return inspect.cleandoc(fn.__doc__ or "") if fn else ""

    def _dispatch(self, method, params):
        if method not in METHODS:
            raise _fault("UNKNOWN_METHOD", f"no method {method!r}; known: {', '.join(METHODS)}")
        fn = getattr(self.api, method)
        try:
            inspect.signature(fn).bind(*params)
        except TypeError:
            raise _fault("BAD_ARGS", f"{method}{inspect.signature(fn)} got {len(params)} argument(s)") from None
        try:
            return to_xmlrpc(fn(*params))
        except Fault:
            raise
        except Exception as e:  # a bug answers the client, with the traceback in the manager's log
            log.exception("XML-RPC %s failed", method)
            raise _fault("FAILED", f"internal error: {type(e).__name__}: {e}") from None


class _Server(socketserver.ThreadingMixIn, SimpleXMLRPCServer):
    daemon_threads = False
    block_on_close = True  # server_close() joins the request threads
    allow_reuse_address = True

    def __init__(self, addr, api: _Api, token: str | None, family: int):
        self.address_family = family
        self.token = token
        self.api = api
        super().__init__(addr, requestHandler=_Handler, logRequests=False, allow_none=False,
                         encoding="utf-8", bind_and_activate=True, use_builtin_types=False)
        self.register_introspection_functions()
        self.register_multicall_functions()
        self.register_instance(_Methods(api))

    def handle_error(self, request, client_address):
        log.exception("XML-RPC request from %s failed", client_address)


class XmlRpcServer:
    """A running XML-RPC server; ``await aclose()`` (from the manager's loop) or ``close()`` stops it."""

    def __init__(self, server: _Server, thread: threading.Thread):
        self._server = server
        self._thread = thread
        self._closed = False
        host, port = server.server_address[:2]
        self.host, self.port = host, port
        self.url = f"http://{f'[{host}]' if ':' in host else host}:{port}/"

    def close(self) -> None:
        """Stop serving: refuse new calls, cancel the ones in flight, join every thread.  Idempotent."""
        if self._closed:
            return
        self._closed = True
        api = self._server.api
        api.closing.set()
        with api._lock:
            pending = list(api.pending)
        for fut in pending:
            fut.cancel()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()
        log.info("XML-RPC API stopped")

    async def aclose(self) -> None:
        """``close()`` off the loop: calls in flight need the loop to finish."""
        await asyncio.to_thread(self.close)


def start_xmlrpc(mgr, host: str = "127.0.0.1", port: int = 0, *, allow_remote: bool = False,
                 token: str | None = None) -> XmlRpcServer:
    """Serve the XML-RPC API of ``mgr`` on ``host:port`` (0: any free port) in a thread.

    Call it from the manager's event loop (after ``await mgr.start()``); stop it
    with ``await server.aclose()`` before ``mgr.stop()``.  A non-loopback
    ``host`` needs ``allow_remote=True`` and a ``token``.  Raises
    :class:`XmlRpcError` for a refused address and ``OSError`` if the bind fails.
    """
    loop = asyncio.get_running_loop()
    if not is_loopback(host):
        if not allow_remote:
            raise XmlRpcError(f"the XML-RPC API binds loopback only; {host} is not loopback (anyone who reaches "
                              f"it can run commands on every node): set xmlrpc_allow_remote and a token to "
                              f"allow it")
        if not token:
            raise XmlRpcError(f"binding the XML-RPC API to {host} needs a token (xmlrpc_token_file)")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    server = _Server((host, port), _Api(mgr, loop), token or None, family)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                              name="snsbus-xmlrpc", daemon=True)
    thread.start()
    handle = XmlRpcServer(server, thread)
    log.info("XML-RPC API on %s%s", handle.url, " (token required)" if token else "")
    return handle
