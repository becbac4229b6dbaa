"""Partitioning a parameter tree into shards by tree path.

A `Plan` is pure data: which shard owns each leaf. Leaves are addressed by
their `jax.tree_util` key paths; a shard's *view* of the tree keeps the full
tree structure with `None` in place of the leaves it does not own, so every
leaf a shard (and its optimizer) sees sits under its original path.

A *row leaf* (an embedding table) is split by rows (axis 0) into contiguous,
near-equal ranges, one per shard: each shard's view holds its range of rows
under the leaf's path.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
from typing import Any, Callable, Sequence

import jax
import numpy as np

Assign = Callable[[str, Any], int]


@dataclasses.dataclass(frozen=True)
class LeafSpec:
    """Path, shape and dtype of one parameter leaf."""

    path: str
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    def describe(self) -> str:
        return f"{self.dtype.name}{list(self.shape)}"


@dataclasses.dataclass(frozen=True)
class Plan:
    """Which shard owns each leaf of a parameter tree.

    `owner[i]` is the shard of leaf `i` in `jax.tree_util` flattening order
    (-1 for a row leaf); `bounds[i]` are a row leaf's row boundaries, shard
    `s` holding rows `bounds[i][s]:bounds[i][s + 1]` (None for other leaves);
    `shard_leaves[s]` lists the leaves shard `s` holds (whole or some rows) in
    that order.
    """

    treedef: Any
    leaves: tuple[LeafSpec, ...]
    owner: tuple[int, ...]
    num_shards: int
    bounds: tuple[tuple[int, ...] | None, ...] = ()

    @functools.cached_property  # on every push and pull: computed once
    def shard_leaves(self) -> tuple[tuple[int, ...], ...]:
        groups: list[list[int]] = [[] for _ in range(self.num_shards)]
        for i, s in enumerate(self.owner):
            if s >= 0:
                groups[s].append(i)
            else:
                for shard in range(self.num_shards):
                    if self.row_range(i, shard)[1] > self.row_range(i, shard)[0]:
                        groups[shard].append(i)
        return tuple(tuple(sorted(g)) for g in groups)

    def is_rows(self, i: int) -> bool:
        """Whether leaf `i` is a row leaf."""
        return bool(self.bounds) and self.bounds[i] is not None

    @property
    def row_leaves(self) -> dict[str, int]:
        """Path -> leaf index of every row leaf."""
        return {self.leaves[i].path: i for i in range(len(self.leaves)) if self.is_rows(i)}

    def row_range(self, i: int, shard: int) -> tuple[int, int]:
        """The rows `[start, stop)` of row leaf `i` that shard `shard` holds."""
        return self.bounds[i][shard], self.bounds[i][shard + 1]

    def part(self, i: int, shard: int) -> LeafSpec:
        """Shard `shard`'s part of leaf `i`: the whole leaf, or its rows."""
        spec = self.leaves[i]
        if not self.is_rows(i):
            return spec
        start, stop = self.row_range(i, shard)
        return dataclasses.replace(spec, shape=(stop - start, *spec.shape[1:]))

    @functools.cached_property
    def _shard_specs(self) -> tuple[tuple[LeafSpec, ...], ...]:
        return tuple(tuple(self.part(i, s) for i in ids) for s, ids in enumerate(self.shard_leaves))

    def shard_specs(self, shard: int) -> tuple[LeafSpec, ...]:
        """The `LeafSpec`s of shard `shard`'s leaves (its rows of a row leaf), in order."""
        return self._shard_specs[shard]

    def layout(self, shard: int) -> tuple[tuple[tuple[int, ...], np.dtype], ...]:
        """`(shape, dtype)` of shard `shard`'s leaves, in order: how they are laid out in a buffer."""
        return tuple((s.shape, s.dtype) for s in self.shard_specs(shard))

    @property
    def paths(self) -> dict[str, int]:
        """Tree path -> shard index (whole leaves; row leaves are in `rows`)."""
        return {leaf.path: s for leaf, s in zip(self.leaves, self.owner) if s >= 0}

    @property
    def rows(self) -> dict[str, list[tuple[int, int, int]]]:
        """Row leaf path -> `(shard, start, stop)` of each shard's rows."""
        return {
            self.leaves[i].path: [(s, *self.row_range(i, s)) for s in range(self.num_shards) if i in self.shard_leaves[s]]
            for i in range(len(self.leaves))
            if self.is_rows(i)
        }

    @property
    def bytes_per_shard(self) -> tuple[int, ...]:
        return tuple(sum(spec.nbytes for spec in self.shard_specs(s)) for s in range(self.num_shards))

    def split(self, leaves: Sequence[Any]) -> list[list[Any]]:
        """Flat leaves -> one list of leaves per shard (a row leaf's rows cut out for each)."""
        return [[self.split_leaf(leaves[i], i, s) for i in ids] for s, ids in enumerate(self.shard_leaves)]

    def split_leaf(self, x: Any, i: int, shard: int) -> Any:
        """Shard `shard`'s part of leaf `i`'s value `x`: all of it, or its rows."""
        if not self.is_rows(i):
            return x
        start, stop = self.row_range(i, shard)
        return x[start:stop]

    def merge(self, per_shard: Sequence[Sequence[Any]]) -> Any:
        """One list of leaves per shard -> the full tree (a row leaf's parts joined in shard order)."""
        flat: list[Any] = [None] * len(self.leaves)
        parts: dict[int, list] = {}
        for ids, values in zip(self.shard_leaves, per_shard):
            for i, value in zip(ids, values):
                if self.is_rows(i):
                    parts.setdefault(i, []).append(value)
                else:
                    flat[i] = value
        for i, pieces in parts.items():
            flat[i] = _join(pieces)
        return jax.tree_util.tree_unflatten(self.treedef, flat)

    def view(self, shard: int, values: Sequence[Any]) -> Any:
        """Shard `shard`'s leaves placed in the full tree, `None` elsewhere."""
        flat: list[Any] = [None] * len(self.leaves)
        for i, value in zip(self.shard_leaves[shard], values):
            flat[i] = value
        return jax.tree_util.tree_unflatten(self.treedef, flat)

    def __repr__(self) -> str:
        sizes = ", ".join(f"{b:,}" for b in self.bytes_per_shard)
        rows = "".join(
            f"; {path} rows " + ", ".join(f"{a}:{b} on {s}" for s, a, b in ranges) for path, ranges in self.rows.items()
        )
        return f"Plan({len(self.leaves)} leaves -> {self.num_shards} shards; bytes per shard: {sizes}{rows})"


def _join(pieces: list) -> Any:
    """A row leaf's parts, one after another (a jax array if any part is one)."""
    if len(pieces) == 1:
        return pieces[0]
    if any(isinstance(x, jax.Array) for x in pieces):
        return jax.numpy.concatenate(pieces)
    return np.concatenate(pieces)


def leaf_specs(tree: Any) -> tuple[tuple[LeafSpec, ...], Any]:
    """The `LeafSpec` of every leaf of `tree`, and its treedef."""
    with_paths, treedef = jax.tree_util.tree_flatten_with_path(tree)
    return tuple(_leaf_spec(jax.tree_util.keystr(path), x) for path, x in with_paths), treedef


def _leaf_spec(path: str, x: Any) -> LeafSpec:
    try:
        return LeafSpec(path, tuple(np.shape(x)), np.dtype(jax.numpy.result_type(x)))
    except (TypeError, ValueError) as e:
        raise TypeError(f"leaf {path} is not an array or a number: {type(x).__name__} {x!r:.80} ({e})") from None


def balance_bytes(specs: Sequence[LeafSpec], num_shards: int, load: Sequence[int] | None = None) -> list[int]:
    """Greedy largest-first assignment to the lightest shard (starting from `load` bytes on each).

    Deterministic across processes and runs: ties break on the path string and
    then on the lowest shard index, never on `hash()`.
    """
    load = list(load or [0] * num_shards)
    count = [0] * num_shards
    owner = [0] * len(specs)
    order = sorted(range(len(specs)), key=lambda i: (-specs[i].nbytes, specs[i].path))
    for i in order:
        shard = min(range(num_shards), key=lambda s: (load[s], count[s], s))
        owner[i] = shard
        load[shard] += specs[i].nbytes
        count[shard] += 1
    return owner


def make_plan(tree: Any, num_shards: int, assign: Assign | None = None, rows: Any = None) -> Plan:
    """Partitions the leaves of `tree` into `num_shards` shards.

    `rows` (tree paths, or `fn(path, leaf) -> bool`) names the row leaves: each
    is split by rows into `num_shards` contiguous, near-equal ranges; the
    other leaves go whole to one shard each (`assign`, else by bytes).
    """
    specs, treedef = leaf_specs(tree)
    if isinstance(num_shards, bool) or not isinstance(num_shards, numbers.Integral) or num_shards < 1:
        raise ValueError(f"shards must be a positive int, got {num_shards!r}")
    num_shards = int(num_shards)  # (a numpy int too, written as a JSON number in checkpoints)
    if not specs:
        raise ValueError("the parameter tree has no leaves")
    flat = jax.tree_util.tree_leaves(tree)
    is_row = _row_leaves(rows, specs, flat)
    bounds = tuple(
        tuple(spec.shape[0] * s // num_shards for s in range(num_shards + 1)) if row else None for spec, row in zip(specs, is_row)
    )
    whole = [i for i, row in enumerate(is_row) if not row]
    load = [0] * num_shards  # bytes of row leaves on each shard
    for i, b in enumerate(bounds):
        if b is not None:
            for s in range(num_shards):
                load[s] += (b[s + 1] - b[s]) * specs[i].nbytes // max(specs[i].shape[0], 1)
    if assign is None:
        owner_of_whole = balance_bytes([specs[i] for i in whole], num_shards, load)
    else:
        owner_of_whole = [assign(specs[i].path, flat[i]) for i in whole]
        bad = [(specs[i].path, o) for i, o in zip(whole, owner_of_whole) if not (isinstance(o, (int, np.integer)) and 0 <= o < num_shards)]
        if bad:
            raise ValueError(f"assign must return a shard index in [0, {num_shards}); got {bad}")
        owner_of_whole = [int(o) for o in owner_of_whole]
    owner = [-1] * len(specs)
    for i, o in zip(whole, owner_of_whole):
        owner[i] = o
    plan = Plan(treedef=treedef, leaves=specs, owner=tuple(owner), num_shards=num_shards, bounds=bounds if any(is_row) else ())
    empty = [s for s, ids in enumerate(plan.shard_leaves) if not ids]
    if empty:
        if assign is not None:
            raise ValueError(f"assign left shards {empty} without leaves; every shard needs at least one leaf")
        if not any(is_row):
            raise ValueError(
                f"asked for {num_shards} shards but the parameter tree has only "
                f"{len(specs)} leaves: {[s.path for s in specs]}; every shard needs at least one leaf"
            )
        raise ValueError(
            f"asked for {num_shards} shards but the parameter tree has only {len(whole)} whole leaves "
            f"{[specs[i].path for i in whole]} and row leaves of {[specs[i].shape[0] for i in range(len(specs)) if is_row[i]]} "
            "rows; every shard needs at least one leaf or row"
        )
    return plan


def _row_leaves(rows: Any, specs: Sequence[LeafSpec], flat: Sequence[Any]) -> list[bool]:
    """Which leaves `rows` (paths, or `fn(path, leaf) -> bool`) names; checks that each can be split by rows."""
    if rows is None:
        return [False] * len(specs)
    if callable(rows):
        chosen = [bool(rows(spec.path, x)) for spec, x in zip(specs, flat)]
    else:
        names = [rows] if isinstance(rows, str) else list(rows)
        prefixes = [n if n.startswith(("[", ".")) else f"[{n!r}]" for n in names]  # a bare name: a top-level key

        def under(path: str, prefix: str) -> bool:
            return path == prefix or path.startswith((prefix + "[", prefix + "."))

        paths = [spec.path for spec in specs]
        unknown = [n for n, p in zip(names, prefixes) if not any(under(path, p) for path in paths)]
        if unknown:
            raise ValueError(f"rows= names {unknown}, which are not leaf paths of the parameters; the leaves are {paths[:20]}")
        chosen = [any(under(path, p) for p in prefixes) for path in paths]
    flat_ones = [f"{s.path} ({s.describe()})" for s, c in zip(specs, chosen) if c and (len(s.shape) < 1 or s.shape[0] < 1)]
    if flat_ones:
        raise ValueError(f"rows= names leaves without rows to split (a row leaf needs at least one axis and one row): {flat_ones}")
    return chosen
