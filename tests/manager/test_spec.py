"""Application spec parsing: the examples, and a table of broken specs."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from lxml import etree

from core.errors import BusError
from manager import spec
from manager.spec import (
    Application, Barrier, BarrierBlock, Component, ComponentBlock, Package, Process,
    ProcessBlock, RestartPolicy, Selector, Software, SpecError,
)

ROOT = Path(__file__).resolve().parents[2]
SPECS = Path(__file__).with_name("specs")


def _spec(body: str) -> str:
    """A project wrapper whose body starts on line 2, indented 2 columns."""
    return '<project name="t">\n' + body + "\n</project>\n"


SW = '  <software name="sw"><package name="p" type="file"><path>a.tar</path></package></software>'
COMP = '  <component name="c"><num_hosts>1</num_hosts><software name="sw"/></component>'


def _exp(*blocks: str) -> str:
    return "  <experiment>\n" + "\n".join(blocks) + "\n  </experiment>"


def _cb(inner: str, name: str = "cb", comp: str = "c", extra: str = "") -> str:
    return (f'    <component_block name="{name}"{extra}><component name="{comp}"/>\n'
            f"{inner}\n    </component_block>")


def _pb(name: str = "pb", proc: str = '<process name="x"><path>true</path></process>',
        extra: str = "") -> str:
    return f'      <process_block name="{name}"{extra}>{proc}</process_block>'


# (id, text, expected "line:col", message fragment)
BROKEN = [
    ("malformed-xml",
     _spec('  <software name="sw">\n  </softwar>'),
     "3:13", "malformed XML: Opening and ending tag mismatch"),
    ("unknown-element",
     _spec(SW + "\n" + '  <component name="c"><num_hosts>1</num_hosts><colour/></component>'),
     "3:47", "<colour> is not allowed inside <component>"),
    ("missing-attribute",
     _spec('  <software><package name="p" type="file"><path>a</path></package></software>'),
     "2:3", '<software> needs a name="..." attribute'),
    ("bad-package-type",
     _spec('  <software name="s"><package name="p" type="ftp"><path>a</path></package></software>'),
     "2:22", "'ftp' is not an element of the set {'web', 'file'}"),
    ("web-package-not-url",
     _spec('  <software name="s">\n    <package name="p" type="web"><path>/tmp/a.tar</path></package>\n'
           "  </software>"),
     "3:34", 'a type="web" package needs an http(s) URL'),
    ("num-hosts-zero",
     _spec(SW + "\n" + '  <component name="c">\n    <rspec><num_hosts>0</num_hosts></rspec>\n'
           "  </component>"),
     "4:12", "<num_hosts> must be at least 1, got 0"),
    ("num-hosts-missing",
     _spec(SW + "\n" + '  <component name="c"><software name="sw"/></component>'),
     "3:3", "<component> needs a <num_hosts> (how many hosts to run on)"),
    ("unknown-software",
     _spec(SW + "\n" + '  <component name="c"><num_hosts>1</num_hosts><software name="nope"/></component>'),
     "3:47", "component 'c' uses unknown software 'nope'; known: 'sw'"),
    ("unknown-component",
     _spec(SW + "\n" + COMP + "\n" + _exp(_cb(_pb(), comp="ghost"))),
     "5:32", "runs unknown component 'ghost'; known: 'c'"),
    ("predecessor-cycle",
     _spec(SW + "\n" + COMP + "\n" + _exp(_cb(
         _pb("a", extra=' predecessor="b"') + "\n"
         + _pb("b", proc='<process name="y"><path>t</path></process>', extra=' predecessor="a"')))),
     "6:7", "predecessor cycle: a -> b -> a"),
    ("unknown-predecessor",
     _spec(SW + "\n" + COMP + "\n" + _exp(_cb(_pb("a", extra=' predecessor="zz"')))),
     "6:7", "has unknown predecessor 'zz'"),
    ("duplicate-process",
     _spec(SW + "\n" + COMP + "\n" + _exp(_cb(_pb("a") + "\n" + _pb("b")))),
     "7:31", "duplicate process name 'x' (first defined on line 6)"),
    ("duplicate-software",
     _spec(SW + "\n" + SW),
     "3:3", "duplicate software name 'sw' (first defined on line 2)"),
    ("process-without-path",
     _spec(SW + "\n" + COMP + "\n" + _exp(_cb(_pb(proc='<process name="x"><cwd>/</cwd></process>')))),
     "6:32", "<process> needs a <path> (the program to run)"),
    ("bad-restart-policy",
     _spec(SW + "\n" + COMP + "\n" + _exp(_cb(_pb(
         proc='\n        <process name="x"><path>t</path><restart policy="sometimes"/></process>')))),
     "7:41", "<restart policy=...>: The value 'sometimes' is not an element of the set"),
    ("restart-never-with-max",
     _spec(SW + "\n" + COMP + "\n" + _exp(_cb(_pb(
         proc='\n        <process name="x"><path>t</path><restart policy="never" max="3"/></process>')))),
     "7:41", 'restart policy="never" takes no max'),
    ("negative-backoff",
     _spec(SW + "\n" + COMP + "\n" + _exp(_cb(_pb(
         proc='\n        <process name="x"><path>t</path>'
              '<restart policy="always" backoff="-1"/></process>')))),
     "7:41", "<restart backoff=...>"),
    ("barrier-max-zero",
     _spec(SW + "\n" + COMP + "\n" + _exp(_cb('      <barrier name="go" max="0"/>'))),
     "6:7", "barrier 'go': max must be at least 1, got 0"),
    ("barrier-conflict",
     _spec(SW + "\n" + COMP + "\n" + _exp(_cb(
         '      <barrier_block name="b1"><barrier name="go" max="2"/></barrier_block>\n'
         '      <barrier_block name="b2"><barrier name="go" max="3"/></barrier_block>'))),
     "7:32", "barrier 'go' is defined differently on line 6"),
    ("bad-exit-code",
     _spec(SW + "\n" + COMP + "\n" + _exp(_cb(_pb(
         proc='\n        <process name="x"><path>t</path><exit_codes>0 x</exit_codes></process>')))),
     "7:41", "<exit_codes>"),
    ("entity-expansion",
     '<?xml version="1.0"?>\n<!DOCTYPE p [<!ENTITY a "aaaa"><!ENTITY b "&a;&a;&a;">]>\n'
     '<project name="&b;"/>\n',
     "2:1", "<!DOCTYPE> is not allowed"),
    ("external-entity",
     '<!DOCTYPE p [<!ENTITY x SYSTEM "file:///etc/passwd">]><project name="&x;"/>',
     "1:1", "<!DOCTYPE> is not allowed"),
]


@pytest.mark.parametrize("text,where,fragment", [c[1:] for c in BROKEN],
                         ids=[c[0] for c in BROKEN])
def test_broken_spec(text: str, where: str, fragment: str) -> None:
    with pytest.raises(SpecError) as info:
        spec.parse(text, "bad.xml")
    first = info.value.problems[0]
    assert f"{first.file}:{first.line}:{first.column}" == f"bad.xml:{where}", str(info.value)
    assert fragment in first.message, str(info.value)
    assert str(first).startswith(f"bad.xml:{where}: ")


def test_spec_error_types_and_all_problems_reported() -> None:
    text = _spec(SW + "\n" + '  <component name="c"><num_hosts>0</num_hosts>'
                 '<software name="a"/><software name="b"/></component>')
    with pytest.raises(SpecError) as info:
        spec.parse(text, "x.xml")
    assert isinstance(info.value, BusError) and isinstance(info.value, ValueError)
    assert len(info.value.problems) == 3
    assert str(info.value).count("\n") == 2


def test_semantic_error_column_ignores_comments_and_cdata() -> None:
    text = ('<project name="t"><!-- <fake> <also/> --><?pi <no>?>'
            '<software name="sw"><package name="p" type="file"><path><![CDATA[<x>]]></path>'
            '</package></software><component name="c"><num_hosts>0</num_hosts></component>\n'
            "</project>")
    with pytest.raises(SpecError) as info:
        spec.parse(text, "c.xml")
    (p,) = info.value.problems
    assert (p.line, p.column) == (1, text.index("<num_hosts>") + 1)


@pytest.mark.parametrize("name", ["billion_laughs.xml", "xxe.xml"])
def test_entity_files_rejected_without_expansion(name: str) -> None:
    path = SPECS / name
    with pytest.raises(SpecError) as info:
        spec.load(path)
    (p,) = info.value.problems
    assert (p.file, p.line, p.column) == (str(path), 2, 1)
    assert "root:" not in str(info.value) and "lol" not in str(info.value)


@pytest.mark.parametrize("name", ["billion_laughs.xml", "xxe.xml"])
def test_safe_parser_does_not_expand_entities(name: str) -> None:
    # Defence in depth: even without the DOCTYPE check the parser expands nothing.
    # libxml2 refuses the billion laughs outright; the external entity stays a
    # reference node, never the file's content.
    try:
        root = etree.fromstring((SPECS / name).read_bytes(), spec._safe_parser())
    except etree.XMLSyntaxError as e:
        assert "amplification" in str(e)
        return
    text = etree.tostring(root).decode()
    assert "root:" not in text and "&xxe;" in text
    assert len(text) < 2000


def test_simple_example() -> None:
    app = spec.load(ROOT / "examples" / "simple.xml")
    cat = Process("cat", "cat", ("simple/hello.txt",))
    assert app == Application(
        "simple",
        (Software("SimpleSoftware", (Package("Package", "file", "examples/packages/simple.tar",
                                             "tar", "simple.tar"),)),),
        (Component("Cluster1", 2, ("SimpleSoftware",), (Selector("local", "local_plush"),)),),
        (ComponentBlock("cb1", "Cluster1", (ProcessBlock("p1", (cat,)),)),),
        (),
        str(ROOT / "examples" / "simple.xml"),
    )


def test_multi_example() -> None:
    app = spec.load(ROOT / "examples" / "multi.xml")
    assert [c.name for c in app.components] == ["servers", "clients"]
    assert app.component_named("clients").resources == (
        Selector("local", "workers", (("arch", "x86_64"),)),)
    assert app.software_named("tools").install == "sh setup.sh"
    assert app.software_named("tools").install_timeout == 30.0
    assert app.software_named("tools").packages[0].archive == "tar.gz"
    assert app.barriers == (Barrier("ready", 4, 30.0),)
    serve, query, report = app.blocks
    assert serve.blocks[1] == BarrierBlock("servers_ready", "ready", ("start_servers",))
    assert query.blocks[0] == BarrierBlock("ready", "ready")
    assert query.blocks[1].predecessors == ("ready",)
    assert report.predecessors == ("serve", "query")
    server = next(p for p in app.processes() if p.name == "server")
    assert server == Process(
        "server", "python3", ("-m", "http.server", "0"), (("PYTHONUNBUFFERED", "1"),),
        "tools", RestartPolicy("on-failure", 3, 0.5, 10.0), 60.0, 2.0, frozenset({0, 143}), "start")
    assert [p.name for p in app.processes()] == ["server", "client", "summary"]


def test_plain_plush_description() -> None:
    app = spec.load(SPECS / "plush_minimal.xml")
    assert app.software[0].packages[0] == Package(
        "pkg", "web", "https://example.org/dl/app.zip", "zip")
    assert app.blocks[0].component == "Cluster1"  # the block's name names it
    assert app.processes().__next__().restart == RestartPolicy()


def test_dataclasses_are_frozen() -> None:
    app = spec.load(ROOT / "examples" / "simple.xml")
    with pytest.raises(AttributeError):
        app.name = "x"  # type: ignore[misc]


_MULTI = (ROOT / "examples" / "multi.xml").read_bytes()


@settings(max_examples=150, deadline=None, derandomize=True, database=None)
@given(st.integers(0, len(_MULTI)), st.integers(0, 40), st.binary(max_size=8))
def test_mangled_spec_gives_application_or_spec_error(at: int, cut: int, junk: bytes) -> None:
    # Whatever damage is done, the only failure mode is a SpecError with positions.
    data = _MULTI[:at] + junk + _MULTI[at + cut:]
    try:
        spec.parse(data, "m.xml")
    except SpecError as e:
        assert e.problems and all(p.line >= 1 and p.column >= 1 for p in e.problems)
