"""Network namespaces for partition tests: a bridge, N namespaces on veth pairs, cut and heal.

Each :class:`Netns` owns, for the life of one ``with`` block::

    root namespace                       namespace snsbus-<tag>-<i> (i = 0 .. n-1)
    bridge snsb<tag> 10.213.K.1/24  ──  veth snsh<tag>x<i> ═══ eth0 10.213.K.(10+i)/24, lo up

``<tag>`` is this process's pid in hex, so two harnesses never share a name,
and ``K`` is the first /24 of 10.213.0.0/16 that no address or route of the
root namespace overlaps.  Processes run inside a namespace through ``ip netns
exec`` (:meth:`Netns.popen`, or in the root namespace with ``where=None``);
:meth:`Netns.cut` takes a namespace's link down (its packets are dropped, no
connection is closed: a real partition, found only by silence) and
:meth:`Netns.heal` brings it back.

Teardown always happens: on leaving the ``with`` block, at interpreter exit
(``atexit``), and for what a killed run left behind, at the start of the next
one (:func:`cleanup_leftovers`: names with this prefix whose owner pid is
gone).  It kills every process this harness started (its session) and every
process still inside the namespaces (``ip netns pids``: the supervised
processes that left the session too), then deletes the namespaces (which
destroys the veth pairs) and the bridge.

Needs root and iproute2.  ``python -m tools.netns check`` says whether this
machine can run it; ``python -m tools.netns cleanup`` removes leftovers.
"""

from __future__ import annotations

import atexit
import ipaddress
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from bus.protocol import BusError
from tools import state

__all__ = ["NetnsError", "Netns", "available", "cleanup_leftovers", "main"]

log = logging.getLogger(__name__)

NS_PREFIX = "snsbus-"  # namespaces: snsbus-<tag>-<i>
BRIDGE_PREFIX = "snsb"  # bridge: snsb<tag>
VETH_PREFIX = "snsh"  # host side of a pair: snsh<tag>x<i> (the namespace side is renamed eth0)
SUPERNET = ipaddress.ip_network("10.213.0.0/16")  # test-only addresses; one /24 per harness
FIRST_HOST = 10  # namespace i gets .FIRST_HOST+i; the bridge is .1
MAX_NAMESPACES = 200

_NS_RE = re.compile(rf"^{re.escape(NS_PREFIX)}([0-9a-f]+)-\d+$")
_LINK_RE = re.compile(rf"^(?:{BRIDGE_PREFIX}([0-9a-f]+)|{VETH_PREFIX}([0-9a-f]+)x\d+)$")


class NetnsError(BusError, RuntimeError):
    """A namespace, link or address could not be set up or removed; the message says what failed."""


def _ip(*args: str, check: bool = True, timeout: float = 10.0) -> subprocess.CompletedProcess:
    try:
        res = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise NetnsError(f"`ip {' '.join(args)}` could not run: {e}") from e
    if check and res.returncode != 0:
        raise NetnsError(f"`ip {' '.join(args)}` failed ({res.returncode}): {res.stderr.strip()}")
    return res


def _json(*args: str) -> list:
    out = _ip("-j", *args, check=False).stdout.strip()
    try:
        return json.loads(out) if out else []
    except ValueError:
        return []


def available() -> tuple[bool, str]:
    """(True, "") when this process can create namespaces and bridges, else (False, why)."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return False, "network namespaces need root"
    if shutil.which("ip") is None:
        return False, "iproute2 (`ip`) is not installed"
    probe = f"{NS_PREFIX}{os.getpid():x}-probe"
    res = _ip("netns", "add", probe, check=False)
    if res.returncode != 0:
        return False, f"`ip netns add` failed: {res.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return True, ""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is gone for our purpose
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def _ns_pids(ns: str) -> list[int]:
    res = _ip("netns", "pids", ns, check=False)
    return [int(x) for x in res.stdout.split() if x.isdigit()]


def _kill_ns_processes(ns: str, deadline: float) -> list[int]:
    """SIGKILL every process inside ``ns`` until none is left or ``deadline``; returns the survivors."""
    return state.kill_until_gone(lambda: [p for p in _ns_pids(ns) if _pid_alive(p)], deadline, pause=0.02)


def _delete(namespaces: list[str], links: list[str]) -> list[str]:
    """Kill what runs in ``namespaces``, delete them and ``links``; returns problems (empty: all gone)."""
    problems = []
    for ns in namespaces:
        left = _kill_ns_processes(ns, time.monotonic() + 5.0)
        if left:
            problems.append(f"processes {left} in {ns} did not die")
        res = _ip("netns", "del", ns, check=False)
        if res.returncode != 0 and ns in _namespaces():
            problems.append(f"cannot delete namespace {ns}: {res.stderr.strip()}")
    for link in links:
        res = _ip("link", "del", link, check=False)
        if res.returncode != 0 and link in _links():
            problems.append(f"cannot delete link {link}: {res.stderr.strip()}")
    return problems


def _namespaces() -> list[str]:
    return [row.get("name", "") for row in _json("netns", "list")]


def _links() -> list[str]:
    return [row.get("ifname", "") for row in _json("link", "show")]


def cleanup_leftovers(*, everything: bool = False) -> list[str]:
    """Remove namespaces and links of this prefix whose owner process is gone; returns their names.

    ``everything`` removes them whoever owns them (``python -m tools.netns cleanup --all``).
    """
    def stale(tag: str) -> bool:
        return everything or not _pid_alive(int(tag, 16))

    namespaces = [ns for ns in _namespaces() if (m := _NS_RE.match(ns)) and stale(m.group(1))]
    links = [ln for ln in _links() if (m := _LINK_RE.match(ln)) and stale(m.group(1) or m.group(2))]
    problems = _delete(namespaces, links)
    if problems:
        raise NetnsError("; ".join(problems))
    return namespaces + links


def _used_networks() -> list[ipaddress.IPv4Network]:
    nets = []
    for row in _json("-4", "addr", "show"):
        for a in row.get("addr_info", []):
            try:
                nets.append(ipaddress.ip_network(f"{a['local']}/{a['prefixlen']}", strict=False))
            except (KeyError, ValueError):
                continue
    for row in _json("-4", "route", "show", "table", "all"):
        dst = row.get("dst")
        if dst and dst != "default":
            try:
                nets.append(ipaddress.ip_network(dst if "/" in dst else f"{dst}/32", strict=False))
            except ValueError:
                continue
    return nets


def _free_subnet(start: int) -> ipaddress.IPv4Network:
    used = _used_networks()
    subnets = list(SUPERNET.subnets(new_prefix=24))
    for k in range(len(subnets)):
        net = subnets[(start + k) % len(subnets)]
        if net.network_address.packed[2] == 0:
            continue  # keep 10.213.0.0/24 for hand-made setups
        if not any(net.overlaps(u) for u in used):
            return net
    raise NetnsError(f"every /24 of {SUPERNET} overlaps an address or route of this machine")


class Netns:
    """A bridge and ``n`` namespaces (see the module docstring).  No I/O before :meth:`open`.

    ``net.ns(i)`` is namespace ``i``'s name, ``net.addr(i)`` its address,
    ``net.bridge_addr`` the root namespace's address on the bridge.
    """

    def __init__(self, n: int, *, tag: str | None = None):
        if not 1 <= n <= MAX_NAMESPACES:
            raise ValueError(f"between 1 and {MAX_NAMESPACES} namespaces, not {n}")
        self.n = n
        self.tag = tag or f"{os.getpid():x}"
        self.bridge = f"{BRIDGE_PREFIX}{self.tag}"
        self.subnet: ipaddress.IPv4Network | None = None
        self._procs: list[subprocess.Popen] = []
        self._created_ns: list[str] = []
        self._created_links: list[str] = []
        self._cut: set[int] = set()
        self._open = False

    # -- names and addresses ------------------------------------------------------------
    def ns(self, i: int) -> str:
        return f"{NS_PREFIX}{self.tag}-{i}"

    def veth(self, i: int) -> str:
        return f"{VETH_PREFIX}{self.tag}x{i}"

    @property
    def bridge_addr(self) -> str:
        return str(self.subnet.network_address + 1)

    def addr(self, i: int) -> str:
        return str(self.subnet.network_address + FIRST_HOST + i)

    # -- lifecycle -------------------------------------------------------------------------
    def open(self) -> "Netns":
        """Remove leftovers of dead runs, then create the bridge and the namespaces."""
        if self._open:
            return self
        cleanup_leftovers()
        self._open = True
        atexit.register(self.close)
        try:
            self.subnet = _free_subnet(os.getpid() % 255)
            plen = self.subnet.prefixlen
            _ip("link", "add", self.bridge, "type", "bridge", "forward_delay", "0", "stp_state", "0")
            self._created_links.append(self.bridge)
            _ip("addr", "add", f"{self.bridge_addr}/{plen}", "dev", self.bridge)
            _ip("link", "set", self.bridge, "up")
            for i in range(self.n):
                ns, host, peer = self.ns(i), self.veth(i), f"snsn{self.tag}x{i}"
                _ip("netns", "add", ns)
                self._created_ns.append(ns)
                _ip("link", "add", host, "type", "veth", "peer", "name", peer)
                self._created_links.append(host)
                _ip("link", "set", peer, "netns", ns)
                _ip("-n", ns, "link", "set", peer, "name", "eth0")
                _ip("-n", ns, "addr", "add", f"{self.addr(i)}/{plen}", "dev", "eth0")
                _ip("-n", ns, "link", "set", "eth0", "up")
                _ip("-n", ns, "link", "set", "lo", "up")
                _ip("link", "set", host, "master", self.bridge)
                _ip("link", "set", host, "up")
        except BaseException:
            self.close()
            raise
        log.info("netns: bridge %s %s/%d, %d namespaces", self.bridge, self.bridge_addr, self.subnet.prefixlen,
                 self.n)
        return self

    def close(self) -> None:
        """Kill every process started here or running inside the namespaces; delete everything.

        Idempotent; raises :class:`NetnsError` only when something could not be removed.
        """
        if not self._open:
            return
        self._open = False
        try:
            atexit.unregister(self.close)
        except Exception:  # interpreter shutting down
            pass
        for proc in self._procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
        for proc in self._procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        problems = _delete(list(self._created_ns), list(reversed(self._created_links)))
        self._created_ns, self._created_links, self._procs = [], [], []
        if problems:
            raise NetnsError("; ".join(problems))

    def __enter__(self) -> "Netns":
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- processes ------------------------------------------------------------------------
    def popen(self, where: int | None, argv: list[str], *, log_path: str | os.PathLike | None = None,
              env: dict | None = None, cwd: str | os.PathLike | None = None) -> subprocess.Popen:
        """Start ``argv`` in namespace ``where`` (None: the root namespace), in its own session.

        Output goes to ``log_path`` (else nowhere); the process is killed on :meth:`close`.
        """
        if not self._open:
            raise NetnsError("open the Netns first (use it as a context manager)")
        full = list(argv) if where is None else ["ip", "netns", "exec", self.ns(where), *argv]
        out = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115 (handed to the child)
        try:
            proc = subprocess.Popen(full, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True, env=env, cwd=cwd)
        finally:
            if log_path:
                out.close()
        self._procs.append(proc)
        return proc

    def run(self, where: int | None, argv: list[str], timeout: float = 10.0) -> subprocess.CompletedProcess:
        """Run ``argv`` to completion in namespace ``where``; output captured as text."""
        full = list(argv) if where is None else ["ip", "netns", "exec", self.ns(where), *argv]
        return subprocess.run(full, capture_output=True, text=True, timeout=timeout)

    def pids(self, i: int) -> list[int]:
        """Every live process inside namespace ``i``."""
        return [p for p in _ns_pids(self.ns(i)) if _pid_alive(p)]

    # -- partitions ------------------------------------------------------------------------
    def cut(self, i: int) -> None:
        """Take namespace ``i``'s link down: everything it sends or should receive is dropped."""
        _ip("link", "set", self.veth(i), "down")
        self._cut.add(i)

    def heal(self, i: int) -> None:
        """Bring namespace ``i``'s link back up."""
        _ip("link", "set", self.veth(i), "up")
        self._cut.discard(i)

    def is_cut(self, i: int) -> bool:
        return i in self._cut


def main(argv: list[str] | None = None) -> int:
    """``python -m tools.netns check|cleanup [--all]``."""
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] not in ("check", "cleanup"):
        print("usage: python -m tools.netns check | cleanup [--all]", file=sys.stderr)
        return 2
    ok, why = available()
    if args[0] == "check":
        print("network namespaces: available" if ok else f"network namespaces: not available ({why})")
        return 0 if ok else 1
    if not ok:
        print(f"cannot clean up: {why}", file=sys.stderr)
        return 1
    try:
        removed = cleanup_leftovers(everything="--all" in args[1:])
    except NetnsError as e:
        print(f"cleanup incomplete: {e}", file=sys.stderr)
        return 1
    print(f"removed {len(removed)}: {' '.join(removed)}" if removed else "nothing to remove")
    return 0


if __name__ == "__main__":
    sys.exit(main())
