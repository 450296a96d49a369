"""The selector picks the compiled twin unless told not to, and the twins agree on their API."""

from __future__ import annotations

import ast
import inspect
import os

import pytest

from core import _fastpath_py, fastpath

CLASSES = ("Header", "FrameCodec", "RoutingTable", "Forwarder", "Aggregator", "LoadTable", "Credits")
CONSTANTS = ("HEADER_SIZE", "BROADCAST_ID", "LINK_UP", "LINK_LOCAL", "LINK_DROP", "LINK_BROADCAST")


def test_compiled_twin_is_live_unless_disabled():
    # A silent fallback to the pure twin is a bug.
    if os.environ.get("BUS_NO_EXTENSIONS"):
        assert fastpath.IMPLEMENTATION == "python"
        assert fastpath.FrameCodec is _fastpath_py.FrameCodec
        assert set(fastpath.twins()) == {"python"}
    else:
        assert fastpath.IMPLEMENTATION == "cython"
        assert set(fastpath.twins()) == {"python", "cython"}
        assert fastpath.FrameCodec is fastpath.twins()["cython"].FrameCodec


def test_compiled_twin_is_really_compiled(both):
    _, compiled = both
    assert compiled.__file__.endswith(".so")
    assert isinstance(compiled.Forwarder.__init__, type(object.__init__))  # an extension type
    assert fastpath.ForwarderC is compiled.Forwarder
    assert fastpath.ForwarderPy is _fastpath_py.Forwarder


def test_same_public_names(both):
    pure, compiled = both
    assert compiled.__all__ == pure.__all__
    for name in pure.__all__:
        assert hasattr(compiled, name), name


def test_constants_match(fp):
    for name in CONSTANTS:
        assert getattr(fp, name) == getattr(_fastpath_py, name) == getattr(fastpath, name)
    assert fp.HEADER_SIZE == 36
    # The LINK_* outcomes are distinct negative ints: links >= 0 are child links.
    links = [fp.LINK_UP, fp.LINK_LOCAL, fp.LINK_DROP, fp.LINK_BROADCAST]
    assert len(set(links)) == 4 and all(v < 0 for v in links)


def _public_methods(cls):
    return sorted(n for n, v in vars(cls).items() if callable(v) and not n.startswith("_"))


def _params(fn):
    sig = inspect.signature(fn)
    return [(p.name, p.kind, p.default) for p in sig.parameters.values()]


def _init_params(cls):
    """[(name, default)] of a class's constructor.

    Extension types expose ``__init__`` as a slot wrapper, so for the compiled
    twin read the signature Cython embeds in the class docstring
    (``Forwarder(node_id, FrameCodec codec, ..., window=4096)``).
    """
    if isinstance(cls.__init__, type(object.__init__)):
        first = cls.__doc__.splitlines()[0]
        inner = first[first.index("(") + 1 : first.rindex(")")]
        out = []
        for part in filter(None, (p.strip() for p in inner.split(","))):
            name, _, default = part.partition("=")
            out.append((name.split()[-1], ast.literal_eval(default) if default else inspect.Parameter.empty))
        return out
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]
    return [(p.name, p.default) for p in params]


@pytest.mark.parametrize("name", CLASSES)
def test_same_methods_and_signatures(both, name):
    pure, compiled = both
    pc, cc = getattr(pure, name), getattr(compiled, name)
    assert _public_methods(cc) == _public_methods(pc)
    for meth in _public_methods(pc):
        assert _params(getattr(cc, meth)) == _params(getattr(pc, meth)), meth
    assert _init_params(cc) == _init_params(pc)


@pytest.mark.parametrize("name", ["drain", "relay"])
def test_same_function_signatures(both, name):
    pure, compiled = both
    assert _params(getattr(compiled, name)) == _params(getattr(pure, name))


def test_header_constructor_signature(both):
    pure, compiled = both
    args = dict(version=1, type=2, flags=3, msg_id=4, ref=5, src=6, dst=7, ttl=8, hops=9, extra=10, body_len=11)
    assert compiled.Header(**args).as_tuple() == pure.Header(**args).as_tuple() == tuple(args.values())
