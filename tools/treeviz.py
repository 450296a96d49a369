"""Drawings of the overlay tree from a ``status``/``tree`` result: text and PNG.

Pure functions over the status dict (``{"root": {...}, "members": [...], ...}``).
Pillow is imported only inside :func:`render_png`, so ``bus-ctl`` stays quick.

The PNG is laid out left to right: depth grows along x, every leaf gets its own
row and an inner node sits at the middle of its children's rows (a tidy tree, as
``tree(1)`` prints it, rotated).  Rows shrink as the tree grows; below a row
height where text would collide, leaf labels are dropped, then all labels, so a
1000-node tree still fits in a few thousand pixels.
"""

from __future__ import annotations

from typing import NamedTuple

from tools.render import natural_key, state_counts

__all__ = [
    "Tree",
    "build_tree",
    "render_text",
    "png_layout",
    "render_png",
    "STATE_COLOURS",
]

#: Fill colour per member state (anything else is drawn grey).
STATE_COLOURS = {
    "root": (52, 101, 164),
    "alive": (46, 158, 79),
    "dead": (208, 52, 44),
    "unreachable": (237, 161, 0),
    "left": (200, 200, 200),
}
_UNKNOWN = (140, 140, 140)


class Tree(NamedTuple):
    """``root`` dict, ``children`` (id -> ordered member dicts), members whose parent is unknown."""

    root: dict
    children: dict
    unattached: list


def build_tree(status: dict) -> Tree:
    """Index the members of ``status`` by parent; children ordered by name."""
    root = dict(status.get("root") or {})
    root.setdefault("id", 1)
    root.setdefault("name", "manager")
    root_id = root["id"]
    members = [m for m in status.get("members") or [] if m.get("id") != root_id]
    ids = {m.get("id") for m in members} | {root_id}
    children: dict = {}
    unattached = []
    for m in members:
        parent = m.get("parent")
        if parent is None:
            parent = root_id
        if parent in ids and parent != m.get("id"):
            children.setdefault(parent, []).append(m)
        else:
            unattached.append(m)
    for kids in children.values():
        kids.sort(key=lambda m: natural_key(str(m.get("name", ""))))
    # Members on a parent cycle are unreachable from the root: report them too.
    reachable = _walk_ids(root_id, children)
    unattached += [
        m for m in members if m.get("id") not in reachable and m not in unattached
    ]
    unattached.sort(key=lambda m: natural_key(str(m.get("name", ""))))
    return Tree(root, children, unattached)


def _walk_ids(start, children) -> set:
    seen, stack = set(), [start]
    while stack:
        nid = stack.pop()
        if nid in seen:
            continue
        seen.add(nid)
        stack.extend(m.get("id") for m in children.get(nid, ()))
    return seen


def _label(m: dict) -> str:
    text = f"{m.get('name', '?')} [{m.get('id', '?')}]"
    state = m.get("state")
    if state and state != "alive":
        text += f"  {str(state).upper()}"
    return text


def _text_lines(tree: Tree, top_id, lines: list[str], seen: set) -> None:
    # Explicit stack: a max_children=1 tree is a chain deeper than Python's recursion limit.
    def push(stack, kids, prefix):
        stack.extend((k, prefix, i == len(kids) - 1) for i, k in reversed(list(enumerate(kids))))

    stack: list = []
    push(stack, tree.children.get(top_id, []), "")
    while stack:
        m, prefix, last = stack.pop()
        if m.get("id") in seen:
            continue
        seen.add(m.get("id"))
        lines.append(f"{prefix}{'└── ' if last else '├── '}{_label(m)}")
        push(stack, tree.children.get(m.get("id"), []), prefix + ("    " if last else "│   "))


def render_text(status: dict) -> str:
    """An indented tree, ``tree(1)`` style, rooted at the manager."""
    tree = build_tree(status)
    root = tree.root
    members = status.get("members") or []
    depth = max((m.get("depth", 0) for m in members), default=0)
    head = f"{root['name']} [{root['id']}]"
    if root.get("control"):
        head += f" {root['control']}"
    head += f"  ({len(members)} members{state_counts(members)}, depth {depth}"
    if root.get("policy"):
        head += f", policy {root['policy']}"
    if root.get("max_children") is not None:
        head += f", max_children {root['max_children']}"
    lines = [head + ")"]
    seen = {root["id"]}
    _text_lines(tree, root["id"], lines, seen)
    if tree.unattached:
        lines.append("unattached (parent unknown, waiting to rejoin):")
        for i, m in enumerate(tree.unattached):
            lines.append(f"{'└── ' if i == len(tree.unattached) - 1 else '├── '}{_label(m)}")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- PNG

_MARGIN = 16
_HEADER = 28
_LEVEL_W = 150
_LABEL_W = 110  # room right of the deepest column for leaf labels
_MAX_ROWS_PX = 6000
_MAX_COLS_PX = 6000


class _Layout(NamedTuple):
    width: int
    height: int
    row_h: float
    radius: int
    labels: str  # "all" | "inner" (leaf labels dropped) | "none"
    pos: dict  # id -> (x, y)
    nodes: list  # (member dict, x, y, is_inner), the root first
    edges: list  # (x0, y0, x1, y1)


def png_layout(status: dict) -> _Layout:
    """Where :func:`render_png` puts every node, and the image size it will have."""
    tree = build_tree(status)
    root = dict(tree.root, state="root")
    # Unattached members hang under a virtual second root drawn at the bottom.
    leaves: list = []  # order of rows
    order: list = []  # (member, depth, parent_id) in DFS pre-order
    seen: set = set()
    stack = [(root, 0, None)]
    if tree.unattached:
        stack.insert(0, ({"id": ("unattached",), "name": "unattached", "state": "unknown"}, 0, None))
    children = dict(tree.children)
    if tree.unattached:
        children[("unattached",)] = tree.unattached
    while stack:
        m, depth, parent = stack.pop()
        if m.get("id") in seen:
            continue
        seen.add(m.get("id"))
        order.append((m, depth, parent))
        kids = [k for k in children.get(m.get("id"), []) if k.get("id") not in seen]
        if not kids:
            leaves.append(m.get("id"))
        stack.extend((k, depth + 1, m.get("id")) for k in reversed(kids))

    n_rows = max(1, len(leaves))
    max_depth = max(d for _, d, _ in order)
    row_h = max(2.0, min(22.0, _MAX_ROWS_PX / n_rows))
    # Deep trees (a chain under max_children=1) shrink the columns instead.
    level_w = max(6.0, min(float(_LEVEL_W), _MAX_COLS_PX / max(1, max_depth)))
    if level_w < 90:
        labels = "none"
    else:
        # Same-depth nodes are at least one row apart; a label is ~11 px tall and
    # sits beside (leaf) or just under (inner node) its node's row line.
        labels = "all" if row_h >= 20 else ("inner" if row_h >= 12 else "none")
    radius = max(1, min(7, int(min(row_h, level_w) / 3)))
    width = int(_MARGIN * 2 + max_depth * level_w + (_LABEL_W if labels == "all" else 0) + 2 * radius)
    width = max(width, 420)
    height = int(_HEADER + _MARGIN * 2 + n_rows * row_h)

    leaf_row = {nid: i for i, nid in enumerate(leaves)}
    pos: dict = {}
    # Children come after parents in pre-order: place in reverse so kids are known.
    depth_of = {m.get("id"): d for m, d, _ in order}
    for m, d, _ in reversed(order):
        nid = m.get("id")
        kids = [k.get("id") for k in children.get(nid, []) if k.get("id") in pos and depth_of.get(k.get("id")) == d + 1]
        if nid in leaf_row or not kids:
            y = _HEADER + _MARGIN + (leaf_row.get(nid, 0) + 0.5) * row_h
        else:
            y = (pos[kids[0]][1] + pos[kids[-1]][1]) / 2
        pos[nid] = (_MARGIN + radius + d * level_w, y)
    parents = {p for _, _, p in order if p is not None}
    nodes = [(m, *pos[m.get("id")], m.get("id") in parents) for m, _, _ in order]
    edges = [(*pos[p], *pos[m.get("id")]) for m, _, p in order if p is not None]
    return _Layout(width, height, row_h, radius, labels, pos, nodes, edges)


def render_png(status: dict, path) -> tuple[int, int]:
    """Draw the tree into a PNG file at ``path``; returns its ``(width, height)``."""
    from PIL import Image, ImageDraw, ImageFont

    lay = png_layout(status)
    img = Image.new("RGB", (lay.width, lay.height), "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    members = status.get("members") or []
    depth = max((m.get("depth", 0) for m in members), default=0)
    root = status.get("root") or {}
    title = f"snsbus tree: {len(members)} members{state_counts(members)}, depth {depth}"
    if root.get("policy"):
        title += f", policy {root['policy']}"
    draw.text((_MARGIN, _MARGIN // 2), title, fill="black", font=font)
    legend_x = _MARGIN + 8 + int(draw.textlength(title, font=font)) + 16
    for state in ("alive", "dead", "unreachable", "root"):
        if legend_x + 60 > lay.width:
            break
        draw.ellipse((legend_x, _MARGIN // 2 + 2, legend_x + 8, _MARGIN // 2 + 10), fill=STATE_COLOURS[state])
        draw.text((legend_x + 12, _MARGIN // 2), state, fill="black", font=font)
        legend_x += 12 + int(draw.textlength(state, font=font)) + 14

    edge_colour = (170, 170, 170)
    for x0, y0, x1, y1 in lay.edges:
        # Elbow connector: across to the middle, down to the child's row, across.
        mid = (x0 + x1) / 2
        draw.line([(x0, y0), (mid, y0), (mid, y1), (x1, y1)], fill=edge_colour, width=1)
    r = lay.radius
    for m, x, y, _ in lay.nodes:
        state = m.get("state", "unknown")
        draw.ellipse((x - r, y - r, x + r, y + r), fill=STATE_COLOURS.get(state, _UNKNOWN), outline="black" if r > 3 else None)
    if lay.labels != "none":
        for m, x, y, is_inner in lay.nodes:
            if lay.labels == "inner" and not is_inner:
                continue
            text = str(m.get("name", "?"))
            if is_inner:
                # Just under the edge that leaves the node to the right.
                draw.text((x + r + 3, y), text, fill="black", font=font)
            else:
                draw.text((x + r + 4, y - 7), text, fill="black", font=font)
    img.save(path, format="PNG")
    return lay.width, lay.height
