"""Tree drawings: the text tree and the PNG."""

from __future__ import annotations

import pytest
from PIL import Image

from fake_manager import make_members
from tools.treeviz import build_tree, png_layout, render_png, render_text


def _status(members, **root):
    return {"root": {"id": 1, "name": "manager", "control": "tcp://127.0.0.1:7070",
                     "max_children": 2, "policy": "balanced", **root},
            "members": members, "events": [], "counters": {}}


def test_render_text_like_tree1():
    text = render_text(_status(make_members(6, 2, dead={"node-3"})))
    assert text.splitlines() == [
        "manager [1] tcp://127.0.0.1:7070  (6 members, 1 dead, depth 2, policy balanced, max_children 2)",
        "├── node-0 [2]",
        "│   ├── node-2 [4]",
        "│   └── node-3 [5]  DEAD",
        "└── node-1 [3]",
        "    ├── node-4 [6]",
        "    └── node-5 [7]",
    ]


def test_children_in_natural_order_and_unattached_listed():
    members = make_members(12, 12)
    members.append({"id": 99, "name": "orphan-1", "parent": 42, "depth": 3, "state": "alive"})
    text = render_text(_status(members))
    names = [line.split()[-2] for line in text.splitlines()[1:13]]
    assert names == [f"node-{i}" for i in range(12)]
    assert text.splitlines()[-2:] == ["unattached (parent unknown, waiting to rejoin):", "└── orphan-1 [99]"]


def test_parent_cycle_is_reported_not_looped():
    members = [
        {"id": 2, "name": "a", "parent": 3, "depth": 1, "state": "alive"},
        {"id": 3, "name": "b", "parent": 2, "depth": 1, "state": "alive"},
    ]
    tree = build_tree(_status(members))
    assert [m["name"] for m in tree.unattached] == ["a", "b"]
    assert "unattached" in render_text(_status(members))


def test_deep_chain_does_not_recurse():
    members = make_members(3000, 1)  # max_children=1: a chain deeper than the recursion limit
    lines = render_text(_status(members)).splitlines()
    assert len(lines) == 3001
    assert lines[-1].endswith("└── node-2999 [3001]")


@pytest.mark.parametrize(("n", "fanout"), [(0, 4), (50, 4), (1000, 4), (1000, 1000), (400, 1)])
def test_png_is_valid_and_of_the_laid_out_size(tmp_path, n, fanout):
    status = _status(make_members(n, fanout, dead={"node-3"}))
    path = tmp_path / "tree.png"
    size = render_png(status, path)
    lay = png_layout(status)
    assert size == (lay.width, lay.height)
    with Image.open(path) as img:
        assert img.format == "PNG"
        assert img.size == size
        img.verify()
    # Bounded at any scale, labelled when small.
    assert lay.width <= 6500 and lay.height <= 6500
    if 0 < n <= 50:
        assert lay.labels == "all"
    if n == 400 and fanout == 1:
        assert lay.labels == "none"


def test_png_colours_dead_nodes(tmp_path):
    status = _status(make_members(3, 4, dead={"node-1"}))
    path = tmp_path / "t.png"
    render_png(status, path)
    lay = png_layout(status)
    with Image.open(path) as img:
        rgb = img.convert("RGB")
        colours = {m["name"]: rgb.getpixel((int(x), int(y))) for m, x, y, _ in lay.nodes}
    assert colours["node-1"] == (208, 52, 44)
    assert colours["node-0"] == (46, 158, 79)
    assert colours["manager"] == (52, 101, 164)
