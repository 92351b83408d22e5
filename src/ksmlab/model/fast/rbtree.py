"""The red-black tree of :mod:`ksmlab.model.rbtree` on index arrays (numba).

Same rotations, same recolouring, same successor choice on erase as the
object version (lib/rbtree.c), so the two trees have identical shapes after
the same operations.  A tree is four arrays indexed by node number
(``left``, ``right``, ``parent``: int32, -1 = NULL; ``red``: uint8) and a root
kept in ``g[root]`` (an int64 cell of the engine's global array).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from .jit import jit

I32 = npt.NDArray[np.int32]
U8 = npt.NDArray[np.uint8]
I64 = npt.NDArray[np.int64]


@jit(inline=True)
def _change_child(g: I64, root: int, left: I32, right: I32, old: int, new: int,
                  parent: int) -> None:
    if parent < 0:
        g[root] = new
    elif left[parent] == old:
        left[parent] = new
    else:
        right[parent] = new


@jit()
def rotate_left(g: I64, root: int, left: I32, right: I32, par: I32, x: int) -> None:
    y = right[x]
    right[x] = left[y]
    if left[y] >= 0:
        par[left[y]] = x
    p = par[x]
    par[y] = p
    _change_child(g, root, left, right, x, y, p)
    left[y] = x
    par[x] = y


@jit()
def rotate_right(g: I64, root: int, left: I32, right: I32, par: I32, x: int) -> None:
    y = left[x]
    left[x] = right[y]
    if right[y] >= 0:
        par[right[y]] = x
    p = par[x]
    par[y] = p
    _change_child(g, root, left, right, x, y, p)
    right[y] = x
    par[x] = y


@jit()
def link_node(g: I64, root: int, left: I32, right: I32, par: I32, red: U8, node: int,
              parent: int, is_left: bool) -> None:
    par[node] = parent
    left[node] = -1
    right[node] = -1
    red[node] = 1
    if parent < 0:
        g[root] = node
    elif is_left:
        left[parent] = node
    else:
        right[parent] = node


@jit()
def insert_color(g: I64, root: int, left: I32, right: I32, par: I32, red: U8,
                 node: int) -> None:
    while True:
        parent = par[node]
        if parent < 0:
            red[node] = 0
            return
        if not red[parent]:
            return
        gparent = par[parent]
        if parent == left[gparent]:
            uncle = right[gparent]
            if uncle >= 0 and red[uncle]:
                red[uncle] = 0
                red[parent] = 0
                red[gparent] = 1
                node = gparent
                continue
            if node == right[parent]:
                rotate_left(g, root, left, right, par, parent)
                node, parent = parent, node
            rotate_right(g, root, left, right, par, gparent)
        else:
            uncle = left[gparent]
            if uncle >= 0 and red[uncle]:
                red[uncle] = 0
                red[parent] = 0
                red[gparent] = 1
                node = gparent
                continue
            if node == left[parent]:
                rotate_right(g, root, left, right, par, parent)
                node, parent = parent, node
            rotate_left(g, root, left, right, par, gparent)
        red[parent] = 0
        red[gparent] = 1
        return


@jit(inline=True)
def _transplant(g: I64, root: int, left: I32, right: I32, par: I32, u: int, v: int) -> None:
    _change_child(g, root, left, right, u, v, par[u])
    if v >= 0:
        par[v] = par[u]


@jit(inline=True)
def _red(red: U8, n: int) -> bool:
    return n >= 0 and red[n] != 0


@jit()
def erase(g: I64, root: int, left: I32, right: I32, par: I32, red: U8, z: int) -> None:
    y_red = red[z] != 0
    if left[z] < 0:
        x = right[z]
        xp = par[z]
        _transplant(g, root, left, right, par, z, right[z])
    elif right[z] < 0:
        x = left[z]
        xp = par[z]
        _transplant(g, root, left, right, par, z, left[z])
    else:
        y = right[z]
        while left[y] >= 0:
            y = left[y]
        y_red = red[y] != 0
        x = right[y]
        if par[y] == z:
            xp = y
        else:
            xp = par[y]
            _transplant(g, root, left, right, par, y, right[y])
            right[y] = right[z]
            par[right[y]] = y
        _transplant(g, root, left, right, par, z, y)
        left[y] = left[z]
        par[left[y]] = y
        red[y] = red[z]
    par[z] = -1
    left[z] = -1
    right[z] = -1
    if not y_red:
        _erase_color(g, root, left, right, par, red, x, xp)


@jit()
def _erase_color(g: I64, root: int, left: I32, right: I32, par: I32, red: U8, x: int,
                 xp: int) -> None:
    while x != g[root] and not _red(red, x):
        if x == left[xp]:
            w = right[xp]
            if red[w]:
                red[w] = 0
                red[xp] = 1
                rotate_left(g, root, left, right, par, xp)
                w = right[xp]
            if not _red(red, left[w]) and not _red(red, right[w]):
                red[w] = 1
                x = xp
                xp = par[xp]
                continue
            if not _red(red, right[w]):
                red[left[w]] = 0
                red[w] = 1
                rotate_right(g, root, left, right, par, w)
                w = right[xp]
            red[w] = red[xp]
            red[xp] = 0
            red[right[w]] = 0
            rotate_left(g, root, left, right, par, xp)
            x = g[root]
            break
        w = left[xp]
        if red[w]:
            red[w] = 0
            red[xp] = 1
            rotate_right(g, root, left, right, par, xp)
            w = left[xp]
        if not _red(red, left[w]) and not _red(red, right[w]):
            red[w] = 1
            x = xp
            xp = par[xp]
            continue
        if not _red(red, left[w]):
            red[right[w]] = 0
            red[w] = 1
            rotate_left(g, root, left, right, par, w)
            w = left[xp]
        red[w] = red[xp]
        red[xp] = 0
        red[left[w]] = 0
        rotate_right(g, root, left, right, par, xp)
        x = g[root]
        break
    if x >= 0:
        red[x] = 0


@jit()
def replace_node(g: I64, root: int, left: I32, right: I32, par: I32, red: U8, victim: int,
                 new: int) -> None:
    par[new] = par[victim]
    left[new] = left[victim]
    right[new] = right[victim]
    red[new] = red[victim]
    if left[victim] >= 0:
        par[left[victim]] = new
    if right[victim] >= 0:
        par[right[victim]] = new
    _change_child(g, root, left, right, victim, new, par[victim])
    par[victim] = -1
    left[victim] = -1
    right[victim] = -1
