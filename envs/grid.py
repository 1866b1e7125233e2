"""Shared grid geometry for the dark grid worlds.

A cell index is ``row * size + col``. Actions (same order as ad-eps / toy-meta-gym):
0 no-op, 1 up (row - 1), 2 right (col + 1), 3 down (row + 1), 4 left (col - 1). Moves clip at the walls.
"""

from __future__ import annotations

import numpy as np

NUM_ACTIONS = 5
# (d_row, d_col) per action
MOVES = np.array([[0, 0], [-1, 0], [0, 1], [1, 0], [0, -1]], dtype=np.int64)


def move(cells: np.ndarray, actions: np.ndarray, size: int) -> np.ndarray:
    """cells, actions: (b,) ints -> (b,) cells after one clipped move."""
    row, col = np.divmod(np.asarray(cells, dtype=np.int64), size)
    d = MOVES[np.asarray(actions, dtype=np.int64)]
    row = np.clip(row + d[..., 0], 0, size - 1)
    col = np.clip(col + d[..., 1], 0, size - 1)
    return row * size + col


def manhattan(a: np.ndarray | int, b: np.ndarray | int, size: int) -> np.ndarray:
    """Manhattan distance between cell indices (broadcasting)."""
    ra, ca = np.divmod(np.asarray(a, dtype=np.int64), size)
    rb, cb = np.divmod(np.asarray(b, dtype=np.int64), size)
    return np.abs(ra - rb) + np.abs(ca - cb)


def to_cell(pos: int | tuple[int, int] | np.integer, size: int) -> int:
    """Accept a cell index or a (row, col) pair; validate it."""
    if isinstance(pos, (tuple, list, np.ndarray)):
        row, col = (int(v) for v in pos)
        if not (0 <= row < size and 0 <= col < size):
            raise ValueError(f"position {tuple(pos)} is outside the {size}x{size} grid")
        return row * size + col
    cell = int(pos)
    if not 0 <= cell < size * size:
        raise ValueError(f"cell {cell} is outside the {size}x{size} grid")
    return cell


def toward(cells: np.ndarray, targets: np.ndarray, size: int) -> np.ndarray:
    """cells, targets: (b,) -> (b,) first action of a shortest path (vertical first), no-op when on the target."""
    (r0, c0), (r1, c1) = np.divmod(np.asarray(cells), size), np.divmod(np.asarray(targets), size)
    vertical = np.where(r1 > r0, 3, 1)
    horizontal = np.where(c1 > c0, 2, 4)
    return np.where(r0 != r1, vertical, np.where(c0 != c1, horizontal, 0))


def render_ansi(size: int, agent: int, marks: dict[int, str]) -> str:
    """A text picture of the grid: 'A' the agent, marks {cell: char} (goal, key, door), '.' elsewhere."""
    rows = []
    for r in range(size):
        row = [marks.get(r * size + c, ".") for c in range(size)]
        if agent // size == r:
            row[agent % size] = "A"
        rows.append(" ".join(row))
    return "\n".join(rows) + "\n"
