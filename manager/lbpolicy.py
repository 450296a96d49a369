"""Load balancing and worker spawning for SNS services, as pure functions.

The SNS manager (Fox et al., SOSP '97, section 3.1.2) collects each worker's
queue length, smooths it, beacons a load table to the front ends, spawns a
worker when the smoothed queue length of a worker class passes a threshold
``H`` (then waits ``D`` so the new worker can absorb load before judging
again), uses *overflow* nodes only when the main pool is full, and reaps idle
workers.  This module holds those decisions; the manager and the front ends
hold the state and do the I/O.

Nothing here reads a clock, touches a socket, logs or uses the global random
generator: ``now`` and a ``random.Random`` are arguments, so every decision is
reproducible in a test.  Every decision comes back as a small frozen value
with a ``reason`` sentence the manager can log and the monitor can show.

* Smoothing: :func:`smooth` (fixed report interval) and :class:`Ewma`
  (irregular reports, time constant ``tau``).
* Choosing a worker: :func:`choose` (power of two choices by default, lottery
  on request) over :class:`WorkerLoad` entries plus the caller's own in-flight
  counts.
* Scaling: :func:`should_spawn`, :func:`should_reap`, :func:`calm_since` and
  :func:`give_back_overflow` over a :class:`PoolState` snapshot, with the
  thresholds gathered in :class:`ScalingConfig`.

Tested in tests/manager/test_lbpolicy.py.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Hashable, Iterable, Mapping, NamedTuple, Sequence

from core.errors import NoWorkers

__all__ = [
    "P2C",
    "LOTTERY",
    "METHODS",
    "MAIN",
    "OVERFLOW",
    "smooth",
    "Ewma",
    "WorkerLoad",
    "Choice",
    "score",
    "choose",
    "ScalingConfig",
    "PoolState",
    "SpawnDecision",
    "should_spawn",
    "WorkerIdle",
    "ReapDecision",
    "should_reap",
    "calm_since",
    "GiveBack",
    "give_back_overflow",
]

P2C = "p2c"
LOTTERY = "lottery"
METHODS = (P2C, LOTTERY)

MAIN = "main"
OVERFLOW = "overflow"


def _finite(value: float, name: str, *, minimum: float = 0.0) -> float:
    # NaN compares false with everything, so one bad report would freeze a
    # decision forever; refuse it at the door instead.
    value = float(value)
    if not math.isfinite(value) or value < minimum:
        raise ValueError(f"{name} must be a finite number >= {minimum:g}, got {value!r}")
    return value


# -- smoothing -----------------------------------------------------------------


def smooth(prev: float | None, sample: float, alpha: float) -> float:
    """Exponentially weighted moving average: ``prev + alpha * (sample - prev)``.

    ``alpha`` in (0, 1] is the weight of the new sample (1 keeps only the
    sample).  ``prev`` None (no history yet) returns the sample itself, so a
    new worker's first report counts in full.  Use this when reports arrive at
    a fixed interval; :class:`Ewma` when they do not.
    """
    sample = _finite(sample, "sample")
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"alpha must be in (0, 1], got {alpha!r}")
    if prev is None:
        return sample
    return prev + alpha * (sample - _finite(prev, "prev"))


@dataclass(frozen=True)
class Ewma:
    """A smoothed value and the time of its last sample, for irregular reports.

    The weight of a sample grows with the time since the previous one,
    ``alpha = 1 - exp(-dt / tau)``, so a burst of reports from one worker does
    not outweigh a steady reporter, and after a pause of several ``tau`` the
    estimate follows the new sample.  Immutable: :meth:`update` returns a new
    value.
    """

    value: float
    at: float

    @classmethod
    def first(cls, sample: float, now: float) -> Ewma:
        """The estimate after a single sample."""
        return cls(_finite(sample, "sample"), float(now))

    def update(self, sample: float, now: float, tau: float) -> Ewma:
        """Fold in ``sample`` taken at ``now`` with time constant ``tau`` (seconds).

        A sample older than the current one (``now < at``, a reordered report)
        is ignored; one taken at the same instant has no weight.  ``tau`` 0
        keeps only the sample.
        """
        sample = _finite(sample, "sample")
        tau = _finite(tau, "tau")
        if now < self.at:
            return self
        if tau == 0.0:
            return Ewma(sample, float(now))
        alpha = -math.expm1(-(now - self.at) / tau)
        return Ewma(self.value + alpha * (sample - self.value), float(now))


# -- choosing a worker ---------------------------------------------------------


@dataclass(frozen=True)
class WorkerLoad:
    """One row of the beaconed load table.

    ``queue`` is the worker's (smoothed) reported queue length, ``cost`` its
    expected service time per request in seconds (any positive unit works if
    all rows use the same one; 1.0 when unknown).
    """

    worker: Hashable
    queue: float = 0.0
    cost: float = 1.0

    def __post_init__(self):
        _finite(self.queue, "queue")
        if _finite(self.cost, "cost") <= 0.0:
            raise ValueError(f"cost must be > 0, got {self.cost!r}")


class Choice(NamedTuple):
    """The worker :func:`choose` picked, its score and why."""

    worker: Hashable
    score: float
    reason: str


def score(load: WorkerLoad, inflight: int = 0) -> float:
    """Expected time for a new request on this worker: ``(queue + inflight + 1) * cost``.

    The queue ahead of the request plus the request itself, times the service
    time.  The ``+ 1`` makes an idle slow worker score worse than an idle fast
    one, so a 4x slower worker gets work only once the fast ones have queues.
    """
    return (load.queue + inflight + 1.0) * load.cost


def choose(
    workers: Sequence[WorkerLoad] | Mapping[Hashable, WorkerLoad],
    inflight: Mapping[Hashable, int],
    rng: random.Random,
    *,
    method: str = P2C,
    exclude: Iterable[Hashable] = (),
) -> Choice:
    """Pick a worker from the beaconed load plus the caller's own in-flight counts.

    ``workers`` are the rows of the last load beacon (a sequence, or a mapping
    whose values are rows); ``inflight`` maps worker -> requests this front end
    has sent there and not yet seen answered (missing means 0).  ``exclude``
    names workers not to use, e.g. the one a request just timed out on.
    Raises :class:`~core.errors.NoWorkers` when no worker is left.

    Why not simply the least loaded: the beacon is stale by up to one beacon
    period and several front ends read the same table, so they would all send
    to the same "least loaded" worker until the next beacon and overload it
    (herding).  Our own in-flight counts correct this for one front end only.

    * ``p2c`` (default): sample two distinct workers at random and take the
      one with the lower :func:`score`.  With stale information this keeps
      most of the benefit of balancing while never herding (Mitzenmacher,
      "How useful is old information?", 2000), its maximum load is
      exponentially better than random placement (the power of two choices),
      and a worker whose score is strictly the highest is never chosen.  With
      two workers it is least-loaded.
    * ``lottery``: draw with probability proportional to ``1 / score``, as
      TranSend's front ends did (lottery scheduling weighted by inverse queue
      length).  Also herd-free, but it keeps sending a share of the traffic
      to a loaded worker (one worker with queue 10 among three idle ones
      still gets ~3%), so it is kept for comparison, not as the default.

    Ties in p2c go to the first of the two samples, which is itself random.
    """
    rows = list(workers.values()) if isinstance(workers, Mapping) else list(workers)
    if exclude:
        banned = set(exclude)
        rows = [w for w in rows if w.worker not in banned]
    if not rows:
        raise NoWorkers("no worker to choose from" + (" (all excluded)" if exclude else ""))
    get = inflight.get
    if len(rows) == 1:
        only = rows[0]
        return Choice(only.worker, score(only, get(only.worker, 0)), "only candidate")
    if method == P2C:
        i, j = rng.sample(range(len(rows)), 2)
        a, b = rows[i], rows[j]
        sa, sb = score(a, get(a.worker, 0)), score(b, get(b.worker, 0))
        if sb < sa:
            return Choice(b.worker, sb, "p2c: lower score of two sampled")
        return Choice(a.worker, sa, "p2c: lower score of two sampled")
    if method == LOTTERY:
        scores = [score(w, get(w.worker, 0)) for w in rows]
        weights = [1.0 / s for s in scores]
        k = rng.choices(range(len(rows)), weights=weights)[0]
        return Choice(rows[k].worker, scores[k], "lottery: weighted by inverse score")
    raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")


# -- spawning, reaping, overflow ----------------------------------------------


@dataclass(frozen=True)
class ScalingConfig:
    """Thresholds of one worker class (service), as the manager reads them from the spec.

    * ``high_water`` (the paper's H): smoothed queue length per worker above
      which a worker is spawned.
    * ``delay`` (the paper's D): seconds after a spawn before the next one may
      be decided, so the new worker can absorb load first.  TranSend converged
      in ~5 s; our spawns start a process on a live bus-node in well under a
      second, so the default is 1 s.
    * ``minimum`` / ``maximum``: bounds on the worker count (``maximum`` None:
      only free slots bound it).
    * ``idle_after``: seconds a worker must have been idle before it is reaped.
    * ``low_water``: the burst is over when the smoothed queue length stays at
      or below this for ``calm_for`` seconds; overflow workers are then given
      back.
    * ``tau``: time constant of the queue-length smoothing (:class:`Ewma`).
    """

    high_water: float = 4.0
    delay: float = 1.0
    minimum: int = 1
    maximum: int | None = None
    idle_after: float = 30.0
    low_water: float = 0.5
    calm_for: float = 10.0
    tau: float = 1.0

    def __post_init__(self):
        for name in ("high_water", "delay", "idle_after", "low_water", "calm_for", "tau"):
            _finite(getattr(self, name), name)
        if self.minimum < 0:
            raise ValueError(f"minimum must be >= 0, got {self.minimum}")
        if self.maximum is not None and self.maximum < max(self.minimum, 1):
            raise ValueError(f"maximum ({self.maximum}) must be >= minimum ({self.minimum}) and >= 1")
        if self.low_water > self.high_water:
            raise ValueError(f"low_water ({self.low_water:g}) must not exceed high_water ({self.high_water:g})")


@dataclass(frozen=True)
class PoolState:
    """What the manager knows about one worker class and the nodes that could host it.

    ``workers`` counts running workers of the class (on any pool), ``pending``
    spawns requested and not yet reported up.  ``main_free`` / ``overflow_free``
    are free worker slots on live nodes of the main pool and on live nodes
    marked ``overflow`` in the resource directory.  ``minimum`` and ``maximum``
    bound the worker count (``maximum`` None: unbounded).
    """

    workers: int
    main_free: int
    overflow_free: int = 0
    pending: int = 0
    minimum: int = 1
    maximum: int | None = None

    def __post_init__(self):
        for name in ("workers", "main_free", "overflow_free", "pending", "minimum"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.maximum is not None and self.maximum < self.minimum:
            raise ValueError(f"maximum ({self.maximum}) must be >= minimum ({self.minimum})")

    @property
    def total(self) -> int:
        """Workers running or starting."""
        return self.workers + self.pending


class SpawnDecision(NamedTuple):
    """Whether to spawn a worker now, on which pool (``MAIN``/``OVERFLOW``/None) and why."""

    spawn: bool
    pool: str | None
    reason: str


def _slot(pool: PoolState, why: str) -> SpawnDecision:
    # The main pool first: overflow nodes are borrowed and given back after
    # the burst, so they are used only when no main node has room.
    if pool.main_free > 0:
        return SpawnDecision(True, MAIN, why)
    if pool.overflow_free > 0:
        return SpawnDecision(True, OVERFLOW, why + "; main pool full, using an overflow node")
    return SpawnDecision(False, None, why + ", but no free slot in the main or the overflow pool")


def should_spawn(
    smoothed_queue: float,
    high_water: float,
    last_spawn_at: float | None,
    now: float,
    delay: float,
    pool: PoolState,
) -> SpawnDecision:
    """Spawn one worker of this class now?

    ``smoothed_queue`` is the class's smoothed queue length per worker,
    ``high_water`` the paper's H, ``delay`` its D, ``last_spawn_at`` the time
    of the previous spawn (None if never).  In order:

    1. Below ``pool.minimum`` (counting pending spawns) it spawns, whatever the
       load or D: the class must exist to be balanced at all.
    2. Within D of the last spawn it waits; likewise while a spawn is pending.
    3. At ``pool.maximum`` it does not spawn.
    4. It spawns when ``smoothed_queue > high_water``.

    A spawn goes to the main pool when it has a free slot, else to an
    overflow node, else it is refused with the reason.  One call decides at
    most one spawn; the manager calls again on its next tick.
    """
    q = _finite(smoothed_queue, "smoothed_queue")
    h = _finite(high_water, "high_water")
    d = _finite(delay, "delay")
    if pool.total < pool.minimum:
        return _slot(pool, f"{pool.total} workers, below the minimum of {pool.minimum}")
    if last_spawn_at is not None and now - last_spawn_at < d:
        return SpawnDecision(False, None, f"waiting D: {now - last_spawn_at:.2f}s of {d:g}s since the last spawn")
    if pool.pending:
        return SpawnDecision(False, None, f"{pool.pending} spawned worker(s) still starting")
    if pool.maximum is not None and pool.total >= pool.maximum:
        return SpawnDecision(False, None, f"at the maximum of {pool.maximum} workers")
    if q <= h:
        return SpawnDecision(False, None, f"queue {q:.2f} <= H {h:g}")
    return _slot(pool, f"queue {q:.2f} > H {h:g}")


@dataclass(frozen=True)
class WorkerIdle:
    """A running worker as the scaling policies see it.

    ``idle_since`` is when its queue and in-flight count last became zero
    (None while it has work); ``overflow`` whether it runs on an overflow node.
    """

    worker: Hashable
    idle_since: float | None = None
    overflow: bool = False


class ReapDecision(NamedTuple):
    """The worker to stop now (None: none) and why."""

    worker: Hashable | None
    reason: str


def _idle_order(w: WorkerIdle):
    # Overflow workers first (they are borrowed), then the longest idle; busy
    # workers last.  The id breaks ties so the choice is deterministic.
    idle = w.idle_since if w.idle_since is not None else math.inf
    return (not w.overflow, idle, str(w.worker))


def should_reap(workers: Sequence[WorkerIdle], now: float, minimum: int, idle_after: float) -> ReapDecision:
    """Stop one idle worker, never going below ``minimum`` workers?

    A worker is reapable when it has been idle for at least ``idle_after``
    seconds.  Among those, a worker on an overflow node goes first, then the
    one idle longest.  One call reaps at most one worker; the manager should
    take the worker out of the load beacon before it stops it.
    """
    idle_after = _finite(idle_after, "idle_after")
    if len(workers) <= minimum:
        return ReapDecision(None, f"{len(workers)} workers, at or below the minimum of {minimum}")
    reapable = [w for w in workers if w.idle_since is not None and now - w.idle_since >= idle_after]
    if not reapable:
        return ReapDecision(None, f"no worker idle for {idle_after:g}s")
    victim = min(reapable, key=_idle_order)
    where = "overflow " if victim.overflow else ""
    return ReapDecision(victim.worker, f"{where}worker idle for {now - victim.idle_since:.1f}s (>= {idle_after:g}s)")


def calm_since(prev: float | None, smoothed_queue: float, low_water: float, now: float) -> float | None:
    """Track when the burst ended: the time the queue fell to ``low_water``, or None.

    Call it on every tick with the value it returned last time; the result
    stays put while the queue is calm and resets to None as soon as it rises.
    """
    if _finite(smoothed_queue, "smoothed_queue") > low_water:
        return None
    return now if prev is None else prev


class GiveBack(NamedTuple):
    """Overflow workers to stop, how many to start on the main pool instead, and why."""

    release: tuple
    respawn_main: int
    reason: str


def give_back_overflow(
    workers: Sequence[WorkerIdle],
    calm: float | None,
    now: float,
    calm_for: float,
    minimum: int,
    main_free: int,
) -> GiveBack:
    """Return overflow nodes once the burst is over.

    ``calm`` is the result of :func:`calm_since`.  When the queue has been calm
    for ``calm_for`` seconds, every overflow worker is released, except that
    the class keeps ``minimum`` workers: the shortfall is started on the main
    pool where it has free slots (``respawn_main``), and only what the main
    pool cannot take stays on overflow nodes.  Releases go idle-longest first.
    The manager should drain a released worker (out of the beacon, in-flight
    requests finished) before stopping it, and start replacements first.
    """
    borrowed = sorted((w for w in workers if w.overflow), key=_idle_order)
    if not borrowed:
        return GiveBack((), 0, "no overflow workers")
    calm_for = _finite(calm_for, "calm_for")
    if calm is None:
        return GiveBack((), 0, "burst not over: queue above low water")
    if now - calm < calm_for:
        return GiveBack((), 0, f"calm for {now - calm:.1f}s of {calm_for:g}s")
    on_main = len(workers) - len(borrowed)
    shortfall = max(0, minimum - on_main)
    respawn = min(shortfall, max(main_free, 0), len(borrowed))
    keep = min(shortfall - respawn, len(borrowed))
    release = tuple(w.worker for w in borrowed[: len(borrowed) - keep])
    if not release:
        return GiveBack((), 0, f"main pool has no room to keep the minimum of {minimum}; overflow kept")
    reason = f"calm for {now - calm:.1f}s: giving back {len(release)} overflow worker(s)"
    if respawn:
        reason += f", starting {respawn} on the main pool to keep the minimum of {minimum}"
    if keep:
        reason += f", keeping {keep} on overflow (main pool full)"
    return GiveBack(release, respawn, reason)
