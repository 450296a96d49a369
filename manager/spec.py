"""Plush-style application specs: parse, validate, return frozen dataclasses.

A spec is read in three passes, and every problem found is collected, so the
user sees all of them at once (Plush's users found error reporting its weakest
part):

1. **Well-formedness and safety.** lxml parses with entity resolution, DTD
   loading and network access off; any ``<!DOCTYPE>`` (the carrier of
   billion-laughs and external-entity attacks) is rejected outright.
2. **Schema.** ``manager/schema/plush.xsd`` (XSD rather than RelaxNG: libxml2
   reports *every* XSD violation with the offending node, where RelaxNG stops
   at the first and names the parent).
3. **Semantics.** Required singletons (``<process>`` needs one ``<path>``),
   ranges (``num_hosts >= 1``, barrier ``max >= 1``), duplicate names, unknown
   references and ``predecessor`` cycles.

A pass runs only when the previous one found nothing (semantic checks need a
schema-valid tree), so a fix can reveal the next layer of problems. An
invalid spec never yields an :class:`Application`.

Positions. Every problem carries ``file:line:col``. Lines come from libxml2.
Columns: libxml2 gives real columns only for syntax errors; schema and
semantic problems are pinned to the ``<`` of the offending element's start
tag, found by scanning the source text (comments, CDATA and processing
instructions blanked out) for the n-th start tag, n being the element's
index in document order. Attribute problems point at their element. Syntax
errors keep libxml2's own column (near the end of the offending token). The
``<!DOCTYPE`` check is a byte scan, so it also fires on a DOCTYPE inside a
comment (harmless: specs have no use for one); the parser flags stay the
real defence.

Vocabulary accepted (Plush's, plus ours, marked *)::

    <plush><project name>          (or a bare <project name> root)
      <software name [type=tar|tar.gz|tgz|zip|none]>
        <package name type="web|file"><path>URL or controller path</path>
                 [<dest>file name</dest>]</package>
        *<install [timeout=S]>shell command run after extraction</install>
      <component name>
        <num_hosts>N</num_hosts>      (or inside <rspec>)
        <resource [type] [group]><attr name value/>...</resource>
                                      (or inside <resources>)
        <software name/>              (reference)
      <experiment [name]>
        [<execution>] <component_block name [predecessor="a b"]>
          <component name/>           (defaults to the block's name)
          <process_block name [predecessor]>
            <barrier name [max] [timeout]/>   (enter before starting)
            <process name>
              <path>program</path> <cmdline><arg>..</arg></cmdline>
              *<env name value/> *<cwd>dir</cwd>
              *<restart policy="never|on-failure|always" [max] [backoff]
                        [flap_window]/>
              *<timeout [run=S] [grace=S]/>  *<exit_codes>0 3</exit_codes>
          <barrier_block name [max] [timeout] [predecessor]>
            [<barrier name [max]/>]   (the barrier waited on; default: block name)
          <barrier name [max] [timeout] [predecessor]/>  (a barrier block)

Block names (component, process and barrier blocks) share one namespace, so a
``predecessor`` may name any block; a block starts only after all its
predecessors finished. Process names are unique in the application (logs and
status address processes by name).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Literal, Union

from lxml import etree

from core.errors import BusError

__all__ = [
    "SpecError",
    "Problem",
    "Application",
    "Software",
    "Package",
    "Selector",
    "Component",
    "ComponentBlock",
    "ProcessBlock",
    "BarrierBlock",
    "Process",
    "Barrier",
    "RestartPolicy",
    "load",
    "parse",
]

_SCHEMA_DIR = Path(__file__).with_name("schema")


# ---------------------------------------------------------------- errors


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a spec, at a 1-based line and column."""

    file: str
    line: int
    column: int
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.column}: {self.message}"


class SpecError(BusError, ValueError):
    """A spec (or resource directory) that cannot be used; see ``problems``."""

    def __init__(self, problems: Iterable[Problem]) -> None:
        # Sorted by position: the first problem is the first one in the file.
        self.problems: tuple[Problem, ...] = tuple(
            sorted(problems, key=lambda p: (p.file, p.line, p.column)))
        super().__init__("\n".join(str(p) for p in self.problems))


# ---------------------------------------------------------------- model


@dataclass(frozen=True)
class Package:
    name: str
    type: Literal["web", "file"]
    path: str
    archive: Literal["tar", "tar.gz", "zip"] | None  # None: copied as is
    dest: str | None = None
    sha256: str | None = None  # pinned content (our addition)


@dataclass(frozen=True)
class Software:
    name: str
    packages: tuple[Package, ...]
    install: str | None = None
    install_timeout: float | None = None


@dataclass(frozen=True)
class Selector:
    """A ``<resource type group>`` selector; ``None`` matches anything."""

    type: str | None = None
    group: str | None = None
    attrs: tuple[tuple[str, str], ...] = ()

    def describe(self) -> str:
        parts = [f"{k}={v!r}" for k, v in (("type", self.type), ("group", self.group)) if v]
        parts += [f"attr {k}={v!r}" for k, v in self.attrs]
        return "<resource " + (" ".join(parts) or "(any)") + ">"


@dataclass(frozen=True)
class Component:
    name: str
    num_hosts: int
    software: tuple[str, ...] = ()
    resources: tuple[Selector, ...] = ()  # any one matching is enough; () = all


@dataclass(frozen=True)
class RestartPolicy:
    policy: Literal["never", "on-failure", "always"] = "never"
    max: int | None = None  # None: unlimited
    backoff: float = 1.0
    flap_window: float = 60.0


@dataclass(frozen=True)
class Process:
    name: str
    path: str
    args: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    cwd: str | None = None
    restart: RestartPolicy = field(default_factory=RestartPolicy)
    run_timeout: float | None = None
    stop_grace: float | None = None
    exit_codes: frozenset[int] = frozenset({0})
    wait: Literal["exit", "start"] = "exit"  # the block is done when it exited (ok), or once it runs


@dataclass(frozen=True)
class Barrier:
    name: str
    max: int | None = None  # None: every host of the components using it
    timeout: float | None = None


@dataclass(frozen=True)
class ProcessBlock:
    name: str
    processes: tuple[Process, ...]
    predecessors: tuple[str, ...] = ()
    barrier: str | None = None  # entered before the processes start


@dataclass(frozen=True)
class BarrierBlock:
    name: str
    barrier: str
    predecessors: tuple[str, ...] = ()


@dataclass(frozen=True)
class ComponentBlock:
    name: str
    component: str
    blocks: tuple[Union[ProcessBlock, BarrierBlock], ...]
    predecessors: tuple[str, ...] = ()


@dataclass(frozen=True)
class ServiceWorker:
    """A TACC worker class: the manager keeps between ``min`` and ``max`` instances by load."""

    name: str
    callable: str  # "module:function"
    component: str  # the hosts its instances may run on (overflow ones only when the rest is full)
    kind: Literal["transformation", "aggregation"] = "transformation"
    min: int = 1
    max: int | None = None
    high_water: float = 4.0  # H: smoothed queue per worker above which one more is spawned
    delay: float = 1.0  # D: seconds after a spawn before the next decision
    idle_after: float = 30.0
    calm_for: float = 10.0


@dataclass(frozen=True)
class ServiceCache:
    component: str
    instances: int = 1
    max_bytes: int = 64 << 20


@dataclass(frozen=True)
class Service:
    name: str
    workers: tuple[ServiceWorker, ...] = ()
    caches: tuple[ServiceCache, ...] = ()
    slots: int = 2  # worker processes per node


@dataclass(frozen=True)
class Application:
    name: str
    software: tuple[Software, ...]
    components: tuple[Component, ...]
    blocks: tuple[ComponentBlock, ...]
    barriers: tuple[Barrier, ...] = ()
    source: str = "<spec>"
    services: tuple[Service, ...] = ()

    def software_named(self, name: str) -> Software:
        return next(s for s in self.software if s.name == name)

    def component_named(self, name: str) -> Component:
        return next(c for c in self.components if c.name == name)

    def processes(self) -> Iterator[Process]:
        for cb in self.blocks:
            for b in cb.blocks:
                if isinstance(b, ProcessBlock):
                    yield from b.processes


# ------------------------------------------------- shared XML machinery


def _safe_parser() -> etree.XMLParser:
    return etree.XMLParser(
        resolve_entities=False, no_network=True, load_dtd=False, huge_tree=False
    )


_BLANKED = re.compile(rb"<!--.*?-->|<!\[CDATA\[.*?\]\]>|<\?.*?\?>", re.S)
_START_TAG = re.compile(rb"<(?![/!?])")


def _start_tag_positions(data: bytes) -> list[tuple[int, int]]:
    """(line, column) of every start tag's ``<``, in document order.

    Columns count characters (UTF-8 decoded), 1-based.
    """
    text = _BLANKED.sub(lambda m: re.sub(rb"[^\n]", b" ", m.group()), data)
    out: list[tuple[int, int]] = []
    line, line_start, pos = 1, 0, 0
    for m in _START_TAG.finditer(text):
        nl = text.count(b"\n", pos, m.start())
        if nl:
            line += nl
            line_start = text.rfind(b"\n", 0, m.start()) + 1
        pos = m.start()
        col = len(text[line_start:pos].decode("utf-8", "replace")) + 1
        out.append((line, col))
    return out


class _Doc:
    """A parsed document plus what is needed to point into its source."""

    def __init__(self, data: bytes, filename: str) -> None:
        self.filename = filename
        self.problems: list[Problem] = []
        self.root: etree._Element | None = None
        self._cols: dict[etree._Element, int] = {}
        doctype = re.search(rb"<!DOCTYPE", data)
        if doctype:
            # Reject before parsing: never give entities a chance.
            line = data.count(b"\n", 0, doctype.start()) + 1
            col = doctype.start() - (data.rfind(b"\n", 0, doctype.start()) + 1) + 1
            self.problems.append(
                Problem(filename, line, col,
                        "<!DOCTYPE> is not allowed (no DTDs or entities in a spec); remove it")
            )
            return
        parser = _safe_parser()
        try:
            self.root = etree.fromstring(data, parser)
        except etree.XMLSyntaxError as e:
            line, col = e.position
            msg = re.sub(r"(, line \d+, column \d+)?( \(.*, line \d+\))?$", "", e.msg)
            self.problems.append(
                Problem(filename, line or 1, col or 1,
                        f"malformed XML: {msg}; fix the markup before anything else")
            )
            return
        docinfo = self.root.getroottree().docinfo
        if docinfo.doctype or docinfo.internalDTD is not None or docinfo.externalDTD is not None:
            # A DOCTYPE the byte scan above cannot see (UTF-16/UTF-32 text): refuse the document
            # whole, so nothing its entities produced is ever used.
            self.root = None
            self.problems.append(Problem(filename, 1, 1, "<!DOCTYPE> is not allowed (no DTDs or entities in a "
                                                         "spec); remove it"))
            return
        positions = _start_tag_positions(data)
        for el, pos in zip(self.root.iter(tag=etree.Element), positions):
            # A mismatch means the scan was fooled; fall back to column 1.
            self._cols[el] = pos[1] if pos[0] == el.sourceline else 1

    def at(self, el: etree._Element, message: str) -> None:
        self.problems.append(
            Problem(self.filename, el.sourceline or 1, self._cols.get(el, 1), message)
        )

    def validate(self, schema: etree.XMLSchema) -> bool:
        assert self.root is not None
        if schema.validate(self.root):
            return True
        tree = self.root.getroottree()
        for entry in schema.error_log:
            el = None
            if entry.path:
                try:
                    found = tree.xpath(entry.path)
                except etree.XPathError:  # a namespace prefix xpath() does not know: no element to point at
                    found = []
                el = found[0] if found else None
            parent = el.getparent() if el is not None else None
            msg = _schema_message(entry.message, parent.tag if parent is not None else None)
            if el is not None:
                self.at(el, msg)
            else:
                self.problems.append(Problem(self.filename, entry.line or 1, 1, msg))
        return False


_ELEMENT_PREFIX = re.compile(r"^Element '([^']+)'(?:, attribute '([^']+)')?: ")


def _schema_message(raw: str, parent: str | None = None) -> str:
    """Rewrite a libxml2 XSD message as a sentence about the spec."""
    m = _ELEMENT_PREFIX.match(raw)
    if not m:
        return raw
    tag, attr = m.group(1), m.group(2)
    rest = raw[m.end():].rstrip(".")
    if rest.startswith("This element is not expected"):
        expected = re.search(r"Expected is(?: one of)? \( ?(.*?) ?\)", rest)
        hint = f"; expected one of: {expected.group(1)}" if expected else ""
        inside = f" inside <{parent}>" if parent else " here"
        return f"<{tag}> is not allowed{inside}{hint}"
    if rest.startswith("The attribute '") and "is required" in rest:
        need = rest.split("'")[1]
        return f"<{tag}> needs a {need}=\"...\" attribute"
    if rest.startswith("The attribute '") and "is not allowed" in rest:
        return f"<{tag}> does not take a {rest.split(chr(39))[1]}= attribute"
    where = f"<{tag} {attr}=...>" if attr else f"<{tag}>"
    rest = rest.replace("[facet 'enumeration'] ", "")
    return f"{where}: {rest}"


@functools.lru_cache(maxsize=None)
def _schema(name: str) -> etree.XMLSchema:
    return etree.XMLSchema(etree.parse(str(_SCHEMA_DIR / name), _safe_parser()))


def _read(path: str | Path) -> bytes:
    return Path(path).read_bytes()


# ---------------------------------------------------------------- building


def _text(el: etree._Element) -> str:
    return (el.text or "").strip()


def _names(value: str | None) -> tuple[str, ...]:
    return tuple(n for n in re.split(r"[\s,]+", value or "") if n)


def _archive(path: str, hint: str | None) -> Literal["tar", "tar.gz", "zip"] | None:
    if hint == "none":
        return None
    if hint:
        return "tar.gz" if hint == "tgz" else hint  # type: ignore[return-value]
    lower = path.lower().split("?", 1)[0]
    if lower.endswith((".tar.gz", ".tgz")):
        return "tar.gz"
    if lower.endswith(".tar"):
        return "tar"
    if lower.endswith(".zip"):
        return "zip"
    return None


class _Builder:
    """Turns a schema-valid tree into an Application, collecting problems."""

    def __init__(self, doc: _Doc) -> None:
        self.doc = doc
        self.at = doc.at

    def one(self, parent: etree._Element, tag: str, why: str) -> etree._Element | None:
        """The single ``<tag>`` child (searching through Plush's wrappers)."""
        found = [c for c in parent.iter(tag) if c.getparent() is not None and c is not parent
                 and (c.getparent() is parent or c.getparent().tag in _WRAPPERS)]
        if not found:
            self.at(parent, f"<{parent.tag}> needs a <{tag}> ({why})")
            return None
        for extra in found[1:]:
            self.at(extra, f"<{parent.tag}> takes only one <{tag}>; remove this one")
        return found[0]

    def unique(self, els: list[etree._Element], what: str) -> None:
        seen: dict[str, etree._Element] = {}
        for el in els:
            name = el.get("name")
            if name in seen:
                self.at(el, f"duplicate {what} name {name!r} "
                            f"(first defined on line {seen[name].sourceline}); rename one")
            else:
                seen[name] = el

    def build(self, root: etree._Element) -> Application | None:
        project = root if root.tag == "project" else root.find("project")
        softs = project.findall("software")
        comps = project.findall("component")
        self.unique(softs, "software")
        self.unique(comps, "component")
        software = tuple(filter(None, (self.software(s) for s in softs)))
        soft_names = {s.get("name") for s in softs}
        components = tuple(filter(None, (self.component(c, soft_names) for c in comps)))
        comp_names = {c.get("name") for c in comps}

        cblocks = [cb for exp in project.findall("experiment")
                   for cb in exp.iter("component_block")]
        block_els = [b for cb in cblocks for b in
                     (cb, *cb.findall("process_block"), *cb.findall("barrier_block"),
                      *cb.findall("barrier"))]
        self.unique(block_els, "block")
        self.unique([p for cb in cblocks for p in cb.iter("process")], "process")
        self.check_predecessors(block_els)
        barriers = self.barriers(cblocks)
        blocks = tuple(filter(None, (self.component_block(cb, comp_names) for cb in cblocks)))
        if not cblocks and project.findall("experiment"):
            self.at(project.find("experiment"),
                    "<experiment> needs at least one <component_block> (what to run where)")
        services = tuple(self.service(s, comp_names) for s in project.findall("service"))
        self.unique(project.findall("service"), "service")
        if self.doc.problems:
            return None
        return Application(project.get("name"), software, components, blocks, barriers,
                           self.doc.filename, services)

    def service(self, el: etree._Element, comp_names: set[str]) -> Service:
        workers, caches = [], []
        self.unique(el.findall("worker"), "worker")
        for w in el.findall("worker"):
            if w.get("component") not in comp_names:
                self.at(w, f"<worker name={w.get('name')!r}> runs on unknown component {w.get('component')!r}; "
                           f"known: {_known(comp_names)}")
            lo = int(w.get("min", 1))
            hi = int(w.get("max")) if w.get("max") else None
            if hi is not None and hi < lo:
                self.at(w, f"<worker name={w.get('name')!r}>: max ({hi}) is below min ({lo})")
            workers.append(ServiceWorker(
                w.get("name"), w.get("callable"), w.get("component"), w.get("kind", "transformation"), lo, hi,
                float(w.get("high_water", 4.0)), float(w.get("delay", 1.0)), float(w.get("idle_after", 30.0)),
                float(w.get("calm_for", 10.0))))
        for c in el.findall("cache"):
            if c.get("component") not in comp_names:
                self.at(c, f"<cache> runs on unknown component {c.get('component')!r}; known: {_known(comp_names)}")
            caches.append(ServiceCache(c.get("component"), int(c.get("instances", 1)),
                                       int(c.get("max_bytes", 64 << 20))))
        if not workers:
            self.at(el, f"<service name={el.get('name')!r}> needs at least one <worker>")
        return Service(el.get("name"), tuple(workers), tuple(caches), int(el.get("slots", 2)))

    def software(self, el: etree._Element) -> Software | None:
        pkgs = []
        for p in el.findall("package"):
            path_el = self.one(p, "path", "the URL or controller file to ship")
            if path_el is None:
                continue
            path = _text(path_el)
            if p.get("type") == "web" and not re.match(r"https?://\S+$", path):
                self.at(path_el, f"a type=\"web\" package needs an http(s) URL, got {path!r}")
            elif not path:
                self.at(path_el, "<path> is empty; give the file to ship")
            dest = p.find("dest")
            pkgs.append(Package(p.get("name"), p.get("type"), path,
                                _archive(path, el.get("type")),
                                _text(dest) if dest is not None else None,
                                (p.get("sha256") or "").lower() or None))
        if not el.findall("package"):
            self.at(el, f"<software name={el.get('name')!r}> needs a <package> (what to ship)")
        inst = el.findall("install")
        for extra in inst[1:]:
            self.at(extra, "<software> takes only one <install>; remove this one")
        install = _text(inst[0]) if inst else None
        timeout = float(inst[0].get("timeout")) if inst and inst[0].get("timeout") else None
        return Software(el.get("name"), tuple(pkgs), install or None, timeout)

    def component(self, el: etree._Element, soft_names: set[str]) -> Component | None:
        nh = self.one(el, "num_hosts", "how many hosts to run on")
        num = 0
        if nh is not None:
            num = int(_text(nh))
            if num < 1:
                self.at(nh, f"<num_hosts> must be at least 1, got {num}")
        refs = []
        for s in el.findall("software"):
            if s.get("name") not in soft_names:
                self.at(s, f"component {el.get('name')!r} uses unknown software "
                           f"{s.get('name')!r}; known: {_known(soft_names)}")
            refs.append(s.get("name"))
        sels = tuple(
            Selector(r.get("type"), r.get("group"),
                     tuple((a.get("name"), a.get("value")) for a in r.findall("attr")))
            for r in el.iter("resource"))
        return Component(el.get("name"), num, tuple(refs), sels)

    def check_predecessors(self, block_els: list[etree._Element]) -> None:
        by_name = {b.get("name"): b for b in block_els}
        graph: dict[str, tuple[str, ...]] = {}
        for b in block_els:
            preds = _names(b.get("predecessor"))
            for p in preds:
                if p not in by_name:
                    self.at(b, f"<{b.tag} name={b.get('name')!r}> has unknown predecessor "
                               f"{p!r}; known blocks: {_known(by_name)}")
                elif p == b.get("name"):
                    self.at(b, f"block {p!r} cannot be its own predecessor")
            graph[b.get("name")] = tuple(p for p in preds if p in by_name and p != b.get("name"))
        # Iterative DFS; each cycle reported once, at its first block in document order.
        state: dict[str, int] = {}
        for start in by_name:
            if start in state:
                continue
            stack = [(start, iter(graph[start]))]
            path = [start]
            state[start] = 1
            while stack:
                node, it = stack[-1]
                nxt = next(it, None)
                if nxt is None:
                    state[node] = 2
                    stack.pop()
                    path.pop()
                elif state.get(nxt) == 1:
                    cycle = path[path.index(nxt):] + [nxt]
                    first = min(cycle[:-1], key=lambda n: block_els.index(by_name[n]))
                    self.at(by_name[first], "predecessor cycle: " + " -> ".join(cycle)
                            + "; no block in it could ever start")
                elif nxt not in state:
                    state[nxt] = 1
                    stack.append((nxt, iter(graph[nxt])))
                    path.append(nxt)

    def barriers(self, cblocks: list[etree._Element]) -> tuple[Barrier, ...]:
        seen: dict[str, tuple[Barrier, etree._Element]] = {}
        for cb in cblocks:
            for el in cb.iter("barrier", "barrier_block"):
                if el.tag == "barrier_block" and el.find("barrier") is not None:
                    continue  # the inner <barrier> defines it
                parent = el.getparent()
                mx = el.get("max") or (parent.get("max") if parent.tag == "barrier_block" else None)
                to = el.get("timeout") or (parent.get("timeout")
                                           if parent.tag == "barrier_block" else None)
                if mx is not None and int(mx) < 1:
                    self.at(el, f"barrier {el.get('name')!r}: max must be at least 1, got {mx}")
                    continue
                b = Barrier(el.get("name"), int(mx) if mx else None,
                            float(to) if to else None)
                if b.name in seen and seen[b.name][0] != b:
                    prev = seen[b.name]
                    if prev[0].max is None and prev[0].timeout is None:
                        seen[b.name] = (b, el)
                    elif b.max is not None or b.timeout is not None:
                        self.at(el, f"barrier {b.name!r} is defined differently on line "
                                    f"{prev[1].sourceline}; give every use the same max/timeout")
                elif b.name not in seen:
                    seen[b.name] = (b, el)
        return tuple(b for b, _ in seen.values())

    def component_block(self, el: etree._Element, comp_names: set[str]) -> ComponentBlock | None:
        refs = el.findall("component")
        for extra in refs[1:]:
            self.at(extra, "<component_block> names only one <component>; remove this one")
        comp = refs[0].get("name") if refs else el.get("name")
        if comp not in comp_names:
            self.at(refs[0] if refs else el,
                    f"<component_block name={el.get('name')!r}> runs unknown component "
                    f"{comp!r}; known: {_known(comp_names)}")
        blocks: list[ProcessBlock | BarrierBlock] = []
        for b in el:
            if b.tag == "process_block":
                bar = b.findall("barrier")
                for extra in bar[1:]:
                    self.at(extra, "<process_block> waits on only one <barrier>; remove this one")
                procs = tuple(filter(None, (self.process(p) for p in b.findall("process"))))
                if not b.findall("process"):
                    self.at(b, f"<process_block name={b.get('name')!r}> needs a <process>")
                blocks.append(ProcessBlock(b.get("name"), procs, _names(b.get("predecessor")),
                                           bar[0].get("name") if bar else None))
            elif b.tag == "barrier_block":
                inner = b.findall("barrier")
                for extra in inner[1:]:
                    self.at(extra, "<barrier_block> holds only one <barrier>; remove this one")
                blocks.append(BarrierBlock(b.get("name"),
                                           inner[0].get("name") if inner else b.get("name"),
                                           _names(b.get("predecessor"))))
            elif b.tag == "barrier":
                blocks.append(BarrierBlock(b.get("name"), b.get("name"),
                                           _names(b.get("predecessor"))))
        return ComponentBlock(el.get("name"), comp, tuple(blocks), _names(el.get("predecessor")))

    def process(self, el: etree._Element) -> Process | None:
        path_el = self.one(el, "path", "the program to run")
        for tag in ("cmdline", "cwd", "restart", "timeout", "exit_codes"):
            for extra in el.findall(tag)[1:]:
                self.at(extra, f"<process> takes only one <{tag}>; remove this one")
        if path_el is None:
            return None
        if not _text(path_el):
            self.at(path_el, "<path> is empty; give the program to run")
        cmd = el.find("cmdline")
        args = tuple((a.text or "") for a in cmd.findall("arg")) if cmd is not None else ()
        env = []
        names: dict[str, etree._Element] = {}
        for e in el.findall("env"):
            if e.get("name") in names:
                self.at(e, f"<env name={e.get('name')!r}> is set twice; keep one")
            names[e.get("name")] = e
            env.append((e.get("name"), e.get("value")))
        cwd = el.find("cwd")
        r = el.find("restart")
        restart = RestartPolicy()
        if r is not None:
            restart = RestartPolicy(
                r.get("policy"),
                int(r.get("max")) if r.get("max") is not None else None,
                float(r.get("backoff", restart.backoff)),
                float(r.get("flap_window", restart.flap_window)))
            if restart.policy == "never" and any(r.get(k) for k in ("max", "backoff",
                                                                      "flap_window")):
                self.at(r, 'restart policy="never" takes no max/backoff/flap_window; '
                           "drop them or choose on-failure/always")
        t = el.find("timeout")
        codes = el.find("exit_codes")
        exit_codes = frozenset({0})
        if codes is not None:
            exit_codes = frozenset(int(x) for x in (codes.text or "").split())
            if not exit_codes:
                self.at(codes, "<exit_codes> is empty; list the expected codes, e.g. 0")
        return Process(
            el.get("name"), _text(path_el), args, tuple(env),
            _text(cwd) if cwd is not None else None, restart,
            float(t.get("run")) if t is not None and t.get("run") else None,
            float(t.get("grace")) if t is not None and t.get("grace") else None,
            exit_codes, el.get("wait", "exit"))


_WRAPPERS = frozenset({"rspec", "resources", "execution"})


def _known(names: Iterable[str]) -> str:
    names = sorted(n for n in names if n)
    return ", ".join(repr(n) for n in names) if names else "(none defined)"


# ---------------------------------------------------------------- API


def parse(data: bytes | str, filename: str = "<spec>") -> Application:
    """Validate a spec held in memory; raise :class:`SpecError` listing every problem."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    doc = _Doc(data, filename)
    if doc.root is None:
        raise SpecError(doc.problems)
    if not doc.validate(_schema("plush.xsd")):
        raise SpecError(doc.problems)
    app = _Builder(doc).build(doc.root)
    if app is None:
        raise SpecError(doc.problems)
    return app


def load(path: str | Path) -> Application:
    """Read and validate the spec file at ``path`` (``OSError`` if unreadable)."""
    return parse(_read(path), str(path))
