from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from ksmlab.model.rbtree import (
    RbNode,
    RbRoot,
    check,
    rb_erase,
    rb_insert_color,
    rb_link_node,
    rb_replace_node,
)


class N(RbNode):
    __slots__ = ("key",)

    def __init__(self, key: int) -> None:
        super().__init__()
        self.key = key


def insert(root: RbRoot, node: N) -> None:
    parent = None
    left = False
    n = root.node
    while n is not None:
        assert isinstance(n, N)
        parent = n
        left = node.key < n.key
        n = n.rb_left if left else n.rb_right
    rb_link_node(root, node, parent, left)
    rb_insert_color(root, node)


def keys(root: RbRoot) -> list[int]:
    return [n.key for n in root if isinstance(n, N)]


def test_clrs_shape_ascending_inserts() -> None:
    # inserting 1..7 in order gives the textbook shape: 4 at the root, 2/6 below
    root = RbRoot()
    nodes = [N(k) for k in range(1, 8)]
    for n in nodes:
        insert(root, n)
    r = root.node
    assert isinstance(r, N)
    assert r.key == 2  # after 1,2,3: root 2; 4,5 recolour; 6 rotates at 4; 7 recolours
    assert check(root) >= 2
    assert keys(root) == list(range(1, 8))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 1000), unique=True, min_size=1, max_size=60), st.data())
def test_insert_erase_keep_invariants(ks: list[int], data: st.DataObject) -> None:
    root = RbRoot()
    nodes = {k: N(k) for k in ks}
    for k in ks:
        insert(root, nodes[k])
        check(root)
    assert keys(root) == sorted(ks)
    order = data.draw(st.permutations(ks))
    left = set(ks)
    for k in order:
        rb_erase(root, nodes[k])
        left.discard(k)
        check(root)
        assert keys(root) == sorted(left)
    assert root.node is None


def test_replace_node_keeps_position() -> None:
    root = RbRoot()
    nodes = [N(k) for k in (5, 3, 8, 1, 4)]
    for n in nodes:
        insert(root, n)
    new = N(3)
    rb_replace_node(root, nodes[1], new)
    check(root)
    assert [n for n in root][1] is new
