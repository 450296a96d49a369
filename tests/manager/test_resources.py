"""Resource directory parsing and the pure matching policy."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.errors import BusError
from manager import spec
from manager.resources import (
    DirectoryError, NotEnoughResources, Resource, load_directory, match, parse_directory,
)
from manager.spec import Component, Selector, SpecError

ROOT = Path(__file__).resolve().parents[2]


def _dir(*lines: str) -> str:
    return "<resources>\n" + "\n".join(lines) + "\n</resources>\n"


def test_example_directory() -> None:
    res = load_directory(ROOT / "examples" / "directory.xml")
    assert [r.name for r in res] == ["local1", "local2", "local3", "local4"]
    assert res[2] == Resource("local3", "127.0.0.1", "local", None, None, "workers",
                              (("arch", "x86_64"), ("disk", "ssd")))
    assert {r.group for r in res} == {"local_plush", "workers"}


def test_ssh_defaults_and_fields() -> None:
    res = parse_directory(_dir(
        '  <resource name="a" address="h1" type="ssh" user="me"/>',
        '  <resource name="b" address="h2" type="ssh" port="2222"/>',
        '  <resource name="c" type="local"/>'))
    assert res[0] == Resource("a", "h1", "ssh", 22, "me")
    assert res[1].port == 2222
    assert res[2] == Resource("c", "127.0.0.1", "local")


BROKEN = [
    ("malformed", "<resources>\n  <resource name='a' type='local'>\n</resources>",
     "3:13", "malformed XML"),
    ("bad-type", _dir('  <resource name="a" type="telnet"/>'),
     "2:3", "<resource type=...>: The value 'telnet' is not an element of the set"),
    ("missing-name", _dir('  <resource type="local"/>'),
     "2:3", '<resource> needs a name="..." attribute'),
    ("bad-port", _dir('  <resource name="a" address="h" type="ssh" port="70000"/>'),
     "2:3", "<resource port=...>"),
    ("ssh-needs-address", _dir('  <resource name="a" type="local"/>', '  <resource name="b" type="ssh"/>'),
     "3:3", '<resource name=\'b\' type="ssh"> needs an address'),
    ("duplicate", _dir('  <resource name="a" type="local"/>', '    <resource name="a" type="local"/>'),
     "3:5", "duplicate resource name 'a' (first defined on line 2)"),
    ("unknown-child", _dir('  <resource name="a" type="local"><cpu/></resource>'),
     "2:35", "<cpu> is not allowed inside <resource>"),
    ("doctype", '<!DOCTYPE r [<!ENTITY x SYSTEM "file:///etc/passwd">]>\n<resources/>',
     "1:1", "<!DOCTYPE> is not allowed"),
]


@pytest.mark.parametrize("text,where,fragment", [c[1:] for c in BROKEN],
                         ids=[c[0] for c in BROKEN])
def test_broken_directory(text: str, where: str, fragment: str) -> None:
    with pytest.raises(DirectoryError) as info:
        parse_directory(text, "dir.xml")
    assert isinstance(info.value, SpecError) and isinstance(info.value, BusError)
    first = info.value.problems[0]
    assert f"{first.line}:{first.column}" == where, str(info.value)
    assert fragment in first.message, str(info.value)
    assert str(info.value).startswith(f"dir.xml:{where}: ")


RES = (
    Resource("n1", "127.0.0.1", "local", group="g1", attrs=(("arch", "arm"),)),
    Resource("n2", "127.0.0.1", "local", group="g1", attrs=(("arch", "x86"),)),
    Resource("n3", "127.0.0.1", "local", group="g2", attrs=(("arch", "x86"),)),
    Resource("n4", "10.0.0.4", "ssh", 22, group="g2", attrs=(("arch", "x86"),)),
)
ALL = {"n1", "n2", "n3", "n4"}


def _comp(n: int, *sels: Selector) -> Component:
    return Component("c", n, (), sels)


def names(rs: list[Resource]) -> list[str]:
    return [r.name for r in rs]


def test_enough_in_directory_order() -> None:
    assert names(match(_comp(2), RES, ALL, ())) == ["n1", "n2"]


def test_only_live_nodes() -> None:
    assert names(match(_comp(2), RES, {"n2", "n4"}, ())) == ["n2", "n4"]


def test_group_selector() -> None:
    assert names(match(_comp(2, Selector(group="g2")), RES, ALL)) == ["n3", "n4"]


def test_type_selector() -> None:
    assert names(match(_comp(1, Selector(type="ssh")), RES, ALL)) == ["n4"]


def test_attr_selector() -> None:
    sel = Selector(group="g1", attrs=(("arch", "x86"),))
    assert names(match(_comp(1, sel), RES, ALL)) == ["n2"]


def test_selectors_are_alternatives() -> None:
    comp = _comp(2, Selector(group="g1", attrs=(("arch", "arm"),)), Selector(type="ssh"))
    assert names(match(comp, RES, ALL)) == ["n1", "n4"]


def test_prefers_untaken_then_reuses_taken() -> None:
    assert names(match(_comp(2), RES, ALL, {"n1", "n2"})) == ["n3", "n4"]
    assert names(match(_comp(3), RES, ALL, {"n1", "n2"})) == ["n3", "n4", "n1"]


def test_not_enough_live() -> None:
    with pytest.raises(NotEnoughResources) as info:
        match(_comp(2, Selector(group="g1")), RES, {"n1", "n3"})
    e = info.value
    assert (e.component, e.wanted, e.matched) == ("c", 2, 1)
    assert str(e) == (
        "component 'c' wants 2 host(s) but only 1 live node(s) match: <resource group='g1'>: "
        "2 resource(s) in the directory (n1, n2), 1 of them live")


def test_not_enough_names_failing_constraint() -> None:
    sel = Selector(type="local", group="g2", attrs=(("arch", "arm"),))
    with pytest.raises(NotEnoughResources) as info:
        match(_comp(1, sel), RES, ALL)
    assert info.value.matched == 0
    assert "no resource in the directory has attr arch='arm'" in str(info.value)
    with pytest.raises(NotEnoughResources, match="no resource in the directory has group='g9'"):
        match(_comp(1, Selector(group="g9")), RES, ALL)


def test_not_enough_without_selector() -> None:
    with pytest.raises(NotEnoughResources, match="wants 5 host.* only 4 live"):
        match(_comp(5), RES, ALL)


def test_examples_match_their_directory() -> None:
    app = spec.load(ROOT / "examples" / "multi.xml")
    res = load_directory(ROOT / "examples" / "directory.xml")
    live = {r.name for r in res}
    servers = match(app.component_named("servers"), res, live)
    clients = match(app.component_named("clients"), res, live, {r.name for r in servers})
    assert names(servers) == ["local1", "local2"]
    assert names(clients) == ["local3", "local4"]
    simple = spec.load(ROOT / "examples" / "simple.xml")
    assert names(match(simple.components[0], res, live)) == ["local1", "local2"]
