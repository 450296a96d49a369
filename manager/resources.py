"""The resource directory (which machines exist) and matching components to them.

Directory XML, validated against ``manager/schema/directory.xsd`` with the same
safe parser and ``file:line:col`` problems as specs (see :mod:`manager.spec`)::

    <resources>
      <resource name="n1" address="10.0.0.5" type="ssh" user="me" port="2222"
                group="rack1">
        <attr name="arch" value="x86_64"/>
      </resource>
    </resources>

``type`` is ``local`` or ``ssh``; ``port`` defaults to 22 for ``ssh`` (``None``
for ``local``); ``address`` defaults to ``127.0.0.1`` for ``local`` and is
required for ``ssh``. A bus-node joins the tree under its resource's name, so
"live nodes" below are resource names.

:func:`match` is a pure policy function (no sockets, no clock).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Collection, Literal, Sequence

from core.errors import BusError
from manager.spec import Component, Selector, SpecError, _Doc, _read, _schema

__all__ = [
    "Resource",
    "DirectoryError",
    "NotEnoughResources",
    "load_directory",
    "parse_directory",
    "selector_matches",
    "match",
]


@dataclass(frozen=True)
class Resource:
    name: str
    address: str
    type: Literal["local", "ssh"]
    port: int | None = None
    user: str | None = None
    group: str | None = None
    attrs: tuple[tuple[str, str], ...] = ()

    def attr(self, name: str) -> str | None:
        return dict(self.attrs).get(name)


class DirectoryError(SpecError):
    """A resource directory that cannot be used; see ``problems``."""


class NotEnoughResources(BusError):
    """Fewer live matching nodes than a component's ``num_hosts``."""

    def __init__(self, component: str, wanted: int, matched: int, reason: str) -> None:
        self.component = component
        self.wanted = wanted
        self.matched = matched
        self.reason = reason
        super().__init__(
            f"component {component!r} wants {wanted} host(s) but only {matched} live "
            f"node(s) match: {reason}")


def parse_directory(data: bytes | str, filename: str = "<directory>") -> tuple[Resource, ...]:
    """Validate a directory held in memory; raise :class:`DirectoryError`."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    doc = _Doc(data, filename)
    if doc.root is None or not doc.validate(_schema("directory.xsd")):
        raise DirectoryError(doc.problems)
    out = []
    first_line: dict[str, int] = {}
    for el in doc.root.findall("resource"):
        name, rtype = el.get("name"), el.get("type")
        if name in first_line:
            doc.at(el, f"duplicate resource name {name!r} (first defined on line "
                       f"{first_line[name]}); rename one")
            continue
        first_line[name] = el.sourceline
        address = el.get("address")
        if address is None and rtype == "ssh":
            doc.at(el, f"<resource name={name!r} type=\"ssh\"> needs an address=\"...\" "
                       "(the host to ssh to)")
            continue
        port = el.get("port")
        out.append(Resource(
            name, address or "127.0.0.1", rtype,
            int(port) if port else (22 if rtype == "ssh" else None),
            el.get("user"), el.get("group"),
            tuple((a.get("name"), a.get("value")) for a in el.findall("attr"))))
    if doc.problems:
        raise DirectoryError(doc.problems)
    return tuple(out)


def load_directory(path: str | Path) -> tuple[Resource, ...]:
    """Read and validate the directory file at ``path`` (``OSError`` if unreadable)."""
    return parse_directory(_read(path), str(path))


def selector_matches(selector: Selector, resource: Resource) -> bool:
    """Whether ``resource`` satisfies every constraint of ``selector``."""
    return ((selector.type is None or selector.type == resource.type)
            and (selector.group is None or selector.group == resource.group)
            and all(resource.attr(k) == v for k, v in selector.attrs))


def _component_matches(component: Component, resource: Resource) -> bool:
    # Selectors are alternatives (Plush listed several resources to pick from).
    return not component.resources or any(
        selector_matches(s, resource) for s in component.resources)


def _why(selector: Selector, resources: Sequence[Resource], live: Collection[str]) -> str:
    """Name the first constraint of ``selector`` that nothing satisfies, or count."""
    pool = list(resources)
    steps: list[tuple[str, object]] = []
    if selector.type is not None:
        steps.append((f"type={selector.type!r}", lambda r: r.type == selector.type))
    if selector.group is not None:
        steps.append((f"group={selector.group!r}", lambda r: r.group == selector.group))
    for k, v in selector.attrs:
        steps.append((f"attr {k}={v!r}", lambda r, k=k, v=v: r.attr(k) == v))
    for label, test in steps:
        kept = [r for r in pool if test(r)]  # type: ignore[operator]
        if not kept:
            return f"{selector.describe()}: no resource in the directory has {label}"
        pool = kept
    alive = [r.name for r in pool if r.name in live]
    return (f"{selector.describe()}: {len(pool)} resource(s) in the directory "
            f"({', '.join(r.name for r in pool)}), {len(alive)} of them live")


def match(component: Component, resources: Sequence[Resource],
          live_nodes: Collection[str], taken: Collection[str] = ()) -> list[Resource]:
    """Pick ``component.num_hosts`` live resources matching the component.

    Resources not in ``taken`` (already given to another component) come
    first; taken ones are reused only when the untaken do not suffice. Order
    within each group is directory order, so the answer is deterministic.
    Raises :class:`NotEnoughResources` naming the failing selector(s).
    """
    candidates = [r for r in resources
                  if r.name in live_nodes and _component_matches(component, r)]
    if len(candidates) < component.num_hosts:
        if component.resources:
            reason = "; ".join(_why(s, resources, live_nodes) for s in component.resources)
        else:
            reason = f"no selector, {len(resources)} resource(s) in the directory"
        raise NotEnoughResources(component.name, component.num_hosts, len(candidates), reason)
    free = [r for r in candidates if r.name not in taken]
    used = [r for r in candidates if r.name in taken]
    return (free + used)[: component.num_hosts]
