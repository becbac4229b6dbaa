"""Partitioning a parameter tree into shards by tree path.

A `Plan` is pure data: which shard owns each leaf. Leaves are addressed by
their `jax.tree_util` key paths; a shard's *view* of the tree keeps the full
tree structure with `None` in place of the leaves it does not own, so every
leaf a shard (and its optimizer) sees sits under its original path.
"""

from __future__ import annotations

import dataclasses
import functools
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

    `owner[i]` is the shard of leaf `i` in `jax.tree_util` flattening order;
    `shard_leaves[s]` lists the leaves of shard `s` in that order.
    """

    treedef: Any
    leaves: tuple[LeafSpec, ...]
    owner: tuple[int, ...]
    num_shards: int

    @functools.cached_property  # on every push and pull: computed once
    def shard_leaves(self) -> tuple[tuple[int, ...], ...]:
        groups: list[list[int]] = [[] for _ in range(self.num_shards)]
        for i, s in enumerate(self.owner):
            groups[s].append(i)
        return tuple(tuple(g) for g in groups)

    def shard_specs(self, shard: int) -> tuple[LeafSpec, ...]:
        """The `LeafSpec`s of shard `shard`'s leaves, in order."""
        return tuple(self.leaves[i] for i in self.shard_leaves[shard])

    def layout(self, shard: int) -> tuple[tuple[tuple[int, ...], np.dtype], ...]:
        """`(shape, dtype)` of shard `shard`'s leaves, in order: how they are laid out in a buffer."""
        return tuple((s.shape, s.dtype) for s in self.shard_specs(shard))

    @property
    def paths(self) -> dict[str, int]:
        """Tree path -> shard index."""
        return {leaf.path: s for leaf, s in zip(self.leaves, self.owner)}

    @property
    def bytes_per_shard(self) -> tuple[int, ...]:
        sizes = [0] * self.num_shards
        for leaf, s in zip(self.leaves, self.owner):
            sizes[s] += leaf.nbytes
        return tuple(sizes)

    def split(self, leaves: Sequence[Any]) -> list[list[Any]]:
        """Flat leaves -> one list of leaves per shard."""
        return [[leaves[i] for i in ids] for ids in self.shard_leaves]

    def merge(self, per_shard: Sequence[Sequence[Any]]) -> Any:
        """One list of leaves per shard -> the full tree."""
        flat: list[Any] = [None] * len(self.leaves)
        for ids, values in zip(self.shard_leaves, per_shard):
            for i, value in zip(ids, values):
                flat[i] = value
        return jax.tree_util.tree_unflatten(self.treedef, flat)

    def view(self, shard: int, values: Sequence[Any]) -> Any:
        """Shard `shard`'s leaves placed in the full tree, `None` elsewhere."""
        flat: list[Any] = [None] * len(self.leaves)
        for i, value in zip(self.shard_leaves[shard], values):
            flat[i] = value
        return jax.tree_util.tree_unflatten(self.treedef, flat)

    def __repr__(self) -> str:
        sizes = ", ".join(f"{b:,}" for b in self.bytes_per_shard)
        return f"Plan({len(self.leaves)} leaves -> {self.num_shards} shards; bytes per shard: {sizes})"


def leaf_specs(tree: Any) -> tuple[tuple[LeafSpec, ...], Any]:
    """The `LeafSpec` of every leaf of `tree`, and its treedef."""
    with_paths, treedef = jax.tree_util.tree_flatten_with_path(tree)
    specs = tuple(
        LeafSpec(jax.tree_util.keystr(path), tuple(np.shape(x)), np.dtype(jax.numpy.result_type(x)))
        for path, x in with_paths
    )
    return specs, treedef


def balance_bytes(specs: Sequence[LeafSpec], num_shards: int) -> list[int]:
    """Greedy largest-first assignment to the lightest shard.

    Deterministic across processes and runs: ties break on the path string and
    then on the lowest shard index, never on `hash()`.
    """
    load = [0] * num_shards
    count = [0] * num_shards
    owner = [0] * len(specs)
    order = sorted(range(len(specs)), key=lambda i: (-specs[i].nbytes, specs[i].path))
    for i in order:
        shard = min(range(num_shards), key=lambda s: (load[s], count[s], s))
        owner[i] = shard
        load[shard] += specs[i].nbytes
        count[shard] += 1
    return owner


def make_plan(tree: Any, num_shards: int, assign: Assign | None = None) -> Plan:
    """Partitions the leaves of `tree` into `num_shards` shards."""
    specs, treedef = leaf_specs(tree)
    if not isinstance(num_shards, int) or num_shards < 1:
        raise ValueError(f"shards must be a positive int, got {num_shards!r}")
    if not specs:
        raise ValueError("the parameter tree has no leaves")
    if num_shards > len(specs):
        raise ValueError(
            f"asked for {num_shards} shards but the parameter tree has only "
            f"{len(specs)} leaves: {[s.path for s in specs]}; every shard needs at least one leaf"
        )
    if assign is None:
        owner = balance_bytes(specs, num_shards)
    else:
        flat = jax.tree_util.tree_leaves(tree)
        owner = [assign(spec.path, leaf) for spec, leaf in zip(specs, flat)]
        bad = [(s.path, o) for s, o in zip(specs, owner) if not (isinstance(o, (int, np.integer)) and 0 <= o < num_shards)]
        if bad:
            raise ValueError(f"assign must return a shard index in [0, {num_shards}); got {bad}")
        owner = [int(o) for o in owner]
        empty = sorted(set(range(num_shards)) - set(owner))
        if empty:
            raise ValueError(f"assign left shards {empty} without leaves; every shard needs at least one leaf")
    return Plan(treedef=treedef, leaves=specs, owner=tuple(owner), num_shards=num_shards)
