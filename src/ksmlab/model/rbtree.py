"""A red-black tree with the rotations of lib/rbtree.c (equivalently CLRS).

Nodes are embedded in the objects they index, as ``struct rb_node`` is in
``struct ksm_rmap_item`` and ``struct ksm_stable_node``: subclasses of
:class:`RbNode` carry ``rb_parent``/``rb_left``/``rb_right``/``rb_red``.
Callers descend the tree themselves (KSM compares page contents at every
level and may stop half way) and then link the new node with
:func:`rb_link_node` + :func:`rb_insert_color`, exactly like the kernel.
"""

from __future__ import annotations

from collections.abc import Iterator


class RbNode:
    __slots__ = ("rb_left", "rb_parent", "rb_red", "rb_right")

    def __init__(self) -> None:
        self.rb_parent: RbNode | None = None
        self.rb_left: RbNode | None = None
        self.rb_right: RbNode | None = None
        self.rb_red = False


class RbRoot:
    __slots__ = ("node",)

    def __init__(self) -> None:
        self.node: RbNode | None = None

    def reset(self) -> None:
        """``root = RB_ROOT``: forget every node without touching them."""
        self.node = None

    def __iter__(self) -> Iterator[RbNode]:
        """In-order walk (rb_first/rb_next)."""
        stack: list[RbNode] = []
        n = self.node
        while stack or n is not None:
            while n is not None:
                stack.append(n)
                n = n.rb_left
            n = stack.pop()
            yield n
            n = n.rb_right

    def __len__(self) -> int:
        return sum(1 for _ in self)


def _change_child(root: RbRoot, old: RbNode, new: RbNode | None, parent: RbNode | None) -> None:
    # __rb_change_child()
    if parent is None:
        root.node = new
    elif parent.rb_left is old:
        parent.rb_left = new
    else:
        parent.rb_right = new


def _rotate_left(root: RbRoot, x: RbNode) -> None:
    y = x.rb_right
    assert y is not None
    x.rb_right = y.rb_left
    if y.rb_left is not None:
        y.rb_left.rb_parent = x
    p = x.rb_parent
    y.rb_parent = p
    _change_child(root, x, y, p)
    y.rb_left = x
    x.rb_parent = y


def _rotate_right(root: RbRoot, x: RbNode) -> None:
    y = x.rb_left
    assert y is not None
    x.rb_left = y.rb_right
    if y.rb_right is not None:
        y.rb_right.rb_parent = x
    p = x.rb_parent
    y.rb_parent = p
    _change_child(root, x, y, p)
    y.rb_right = x
    x.rb_parent = y


def rb_link_node(root: RbRoot, node: RbNode, parent: RbNode | None, left: bool) -> None:
    """rb_link_node(): hang ``node`` (red, no children) below ``parent``."""
    node.rb_parent = parent
    node.rb_left = node.rb_right = None
    node.rb_red = True
    if parent is None:
        root.node = node
    elif left:
        parent.rb_left = node
    else:
        parent.rb_right = node


def rb_insert_color(root: RbRoot, node: RbNode) -> None:
    """__rb_insert(): recolour and rotate after a leaf insert."""
    while True:
        parent = node.rb_parent
        if parent is None:
            node.rb_red = False
            return
        if not parent.rb_red:
            return
        gparent = parent.rb_parent
        assert gparent is not None  # a red node is never the root
        if parent is gparent.rb_left:
            uncle = gparent.rb_right
            if uncle is not None and uncle.rb_red:
                uncle.rb_red = parent.rb_red = False
                gparent.rb_red = True
                node = gparent
                continue
            if node is parent.rb_right:
                _rotate_left(root, parent)
                node, parent = parent, node
            _rotate_right(root, gparent)
        else:
            uncle = gparent.rb_left
            if uncle is not None and uncle.rb_red:
                uncle.rb_red = parent.rb_red = False
                gparent.rb_red = True
                node = gparent
                continue
            if node is parent.rb_left:
                _rotate_right(root, parent)
                node, parent = parent, node
            _rotate_left(root, gparent)
        parent.rb_red = False
        gparent.rb_red = True
        return


def _transplant(root: RbRoot, u: RbNode, v: RbNode | None) -> None:
    _change_child(root, u, v, u.rb_parent)
    if v is not None:
        v.rb_parent = u.rb_parent


def rb_erase(root: RbRoot, z: RbNode) -> None:
    """rb_erase(): unlink ``z``; a node with two children is replaced by its
    in-order successor (the leftmost node of its right subtree)."""
    y_red = z.rb_red
    x: RbNode | None
    if z.rb_left is None:
        x, xp = z.rb_right, z.rb_parent
        _transplant(root, z, z.rb_right)
    elif z.rb_right is None:
        x, xp = z.rb_left, z.rb_parent
        _transplant(root, z, z.rb_left)
    else:
        y = z.rb_right
        while y.rb_left is not None:
            y = y.rb_left
        y_red = y.rb_red
        x = y.rb_right
        if y.rb_parent is z:
            xp = y
        else:
            xp = y.rb_parent
            _transplant(root, y, y.rb_right)
            y.rb_right = z.rb_right
            y.rb_right.rb_parent = y
        _transplant(root, z, y)
        y.rb_left = z.rb_left
        y.rb_left.rb_parent = y
        y.rb_red = z.rb_red
    z.rb_parent = z.rb_left = z.rb_right = None
    if not y_red:
        _erase_color(root, x, xp)


def _red(n: RbNode | None) -> bool:
    return n is not None and n.rb_red


def _erase_color(root: RbRoot, x: RbNode | None, xp: RbNode | None) -> None:
    # ____rb_erase_color(): restore black heights after removing a black node
    while x is not root.node and not _red(x):
        assert xp is not None
        if x is xp.rb_left:
            w = xp.rb_right
            assert w is not None
            if w.rb_red:
                w.rb_red = False
                xp.rb_red = True
                _rotate_left(root, xp)
                w = xp.rb_right
                assert w is not None
            if not _red(w.rb_left) and not _red(w.rb_right):
                w.rb_red = True
                x, xp = xp, xp.rb_parent
                continue
            if not _red(w.rb_right):
                assert w.rb_left is not None
                w.rb_left.rb_red = False
                w.rb_red = True
                _rotate_right(root, w)
                w = xp.rb_right
                assert w is not None
            w.rb_red = xp.rb_red
            xp.rb_red = False
            assert w.rb_right is not None
            w.rb_right.rb_red = False
            _rotate_left(root, xp)
            x = root.node
            break
        w = xp.rb_left
        assert w is not None
        if w.rb_red:
            w.rb_red = False
            xp.rb_red = True
            _rotate_right(root, xp)
            w = xp.rb_left
            assert w is not None
        if not _red(w.rb_left) and not _red(w.rb_right):
            w.rb_red = True
            x, xp = xp, xp.rb_parent
            continue
        if not _red(w.rb_left):
            assert w.rb_right is not None
            w.rb_right.rb_red = False
            w.rb_red = True
            _rotate_left(root, w)
            w = xp.rb_left
            assert w is not None
        w.rb_red = xp.rb_red
        xp.rb_red = False
        assert w.rb_left is not None
        w.rb_left.rb_red = False
        _rotate_right(root, xp)
        x = root.node
        break
    if x is not None:
        x.rb_red = False


def rb_replace_node(root: RbRoot, victim: RbNode, new: RbNode) -> None:
    """rb_replace_node(): ``new`` takes ``victim``'s place, colour and children."""
    new.rb_parent = victim.rb_parent
    new.rb_left = victim.rb_left
    new.rb_right = victim.rb_right
    new.rb_red = victim.rb_red
    if victim.rb_left is not None:
        victim.rb_left.rb_parent = new
    if victim.rb_right is not None:
        victim.rb_right.rb_parent = new
    _change_child(root, victim, new, victim.rb_parent)
    victim.rb_parent = victim.rb_left = victim.rb_right = None


def check(root: RbRoot) -> int:
    """Verify the red-black invariants; returns the black height (for tests)."""

    def walk(n: RbNode | None, parent: RbNode | None) -> int:
        if n is None:
            return 1
        if n.rb_parent is not parent:
            raise AssertionError("bad parent link")
        if n.rb_red and (_red(n.rb_left) or _red(n.rb_right)):
            raise AssertionError("red node with red child")
        hl, hr = walk(n.rb_left, n), walk(n.rb_right, n)
        if hl != hr:
            raise AssertionError("unequal black heights")
        return hl + (0 if n.rb_red else 1)

    if _red(root.node):
        raise AssertionError("red root")
    return walk(root.node, None)
