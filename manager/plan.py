"""Deploy planning as pure functions: who runs what, in which order, who replaces whom.

No sockets and no clock here; :mod:`manager.apps` drives a deploy with these.
"""

from __future__ import annotations

from typing import Collection, Iterable, Sequence

from manager.resources import NotEnoughResources, Resource, match
from manager.spec import Application, BarrierBlock, Component, ComponentBlock, Process, ProcessBlock

__all__ = ["assign", "spare_for", "barrier_expected", "process_def", "software_of", "block_key", "phase_keys"]


def assign(app: Application, resources: Sequence[Resource], live: Collection[str]) -> dict[str, list[str]]:
    """{component: [node names]}: ``num_hosts`` live matching nodes per component.

    Components are served in spec order; a node already given to one component
    is reused by another only when no free one matches (see :func:`manager.resources.match`).
    Raises :class:`NotEnoughResources` naming the first component that cannot be served.
    """
    taken: set[str] = set()
    out: dict[str, list[str]] = {}
    resources = [r for r in resources if not is_overflow(r)]  # borrowed only by the spawner, in a burst
    for comp in app.components:
        picked = match(comp, resources, live, taken)
        out[comp.name] = [r.name for r in picked]
        taken.update(out[comp.name])
    return out


def is_overflow(resource: Resource) -> bool:
    """Marked ``<attr name="overflow" value="true"/>`` in the directory (SNS's overflow pool)."""
    return (resource.attr("overflow") or "").lower() in ("true", "yes", "1")


def overflow_pool(app: Application, resources: Sequence[Resource]) -> dict[str, list[str]]:
    """{component: [overflow nodes matching it]}: where a service may spawn once its main pool is full."""
    from manager.resources import _component_matches

    return {c.name: [r.name for r in resources if is_overflow(r) and _component_matches(c, r)]
            for c in app.components}


def spare_for(component: Component, resources: Sequence[Resource], live: Collection[str],
              used: Collection[str]) -> str | None:
    """A live matching node that no component uses yet (Plush's partial-failure handling), or None."""
    resources = [r for r in resources if not is_overflow(r)]  # borrowed by the spawner only
    try:
        pool = match(Component(component.name, 1, component.software, component.resources), resources,
                     [n for n in live if n not in used])
    except NotEnoughResources:
        return None
    return pool[0].name if pool else None


def barrier_expected(app: Application, assignment: dict[str, list[str]]) -> dict[str, int]:
    """{barrier: arrivals needed}: its ``max``, else every host of every component block using it."""
    users: dict[str, int] = {}
    for cb in app.blocks:
        for b in cb.blocks:
            name = b.barrier if isinstance(b, BarrierBlock) else b.barrier if isinstance(b, ProcessBlock) else None
            if name:
                users[name] = users.get(name, 0) + len(assignment.get(cb.component, []))
    out = {}
    for bar in app.barriers:
        need = users.get(bar.name, 0)
        out[bar.name] = min(bar.max, need) if bar.max is not None and need else (bar.max or need)
    return out


def process_def(proc: Process, block: str) -> dict:
    """The msgpack-able definition a node needs to run ``proc`` (see ``nodes.apps``)."""
    return {
        "name": proc.name,
        "block": block,
        "path": proc.path,
        "args": list(proc.args),
        "env": dict(proc.env),
        "cwd": proc.cwd,
        "restart": {"policy": proc.restart.policy, "max": proc.restart.max, "backoff": proc.restart.backoff,
                    "flap_window": proc.restart.flap_window},
        "run_timeout": proc.run_timeout,
        "stop_grace": proc.stop_grace,
        "exit_codes": sorted(proc.exit_codes),
        "wait": proc.wait,
    }


def software_of(app: Application, component: str, packages: dict[tuple[str, str], dict]) -> list[dict]:
    """What ``app.prepare`` installs on a node of ``component``; ``packages`` maps
    (software, package) to {sha, size} of the controller's copy."""
    comp = app.component_named(component)
    out = []
    for sname in comp.software:
        soft = app.software_named(sname)
        out.append({
            "name": soft.name,
            "install": soft.install,
            "install_timeout": soft.install_timeout,
            "packages": [dict(packages[(soft.name, pk.name)], name=pk.name, archive=pk.archive, dest=pk.dest)
                         for pk in soft.packages],
        })
    return out


def block_key(cb: ComponentBlock, block: ProcessBlock | BarrierBlock | None = None) -> str:
    return cb.name if block is None else f"{cb.name}/{block.name}"


def phase_keys(app: Application) -> dict[str, str]:
    """{phase: component} in the order a deploy shows them: install per component, then every block."""
    keys = {f"install/{c.name}": c.name for c in app.components if c.software}
    if app.services:
        keys["services"] = app.services[0].workers[0].component if app.services[0].workers else ""
    for cb in app.blocks:
        keys.update((block_key(cb, b), cb.component) for b in cb.blocks)
    return keys


def used_nodes(assignment: dict[str, Iterable[str]]) -> set[str]:
    return {n for names in assignment.values() for n in names}
