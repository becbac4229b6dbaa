"""Where a many-leaf round trip's time goes: its parts, timed alone, for N leaves against 1 leaf of the same bytes.

    python benchmarks/leaf_kernels.py [--bytes 4e6] [--leaves 100] [--repeats 7]

In-process, 1 shard, `optax.sgd`, float32. Each part is timed warm and to
completion (`jax.block_until_ready`), the N-leaf and 1-leaf trees taking turns
`--repeats` times; the report gives the median of each and the extra time
per leaf:

- round trip:      `ps.push(grads).result()` then `ps.pull()`, as `benchmarks/leaves.py` times it;
- finite check:    `jaxps.validate.finite_flags(leaves)`, the NaN/Inf flags a push computes on the device;
- guarded step:    the shard's compiled step that applies a push only if its flags are set;
- plain step:      the same optax step without the check (`jaxps.update.compile_step`);
- leaf checks:     `jaxps.validate.check_leaves`, the shapes and dtypes checked in Python;
- two other checks tried (one flag for the whole push): `all(isfinite(concatenate(leaves)))`, and
  `isfinite(sum of each leaf's sum of x * 0)`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import jaxps  # noqa: E402
from benchmarks.bandwidth import make_tree  # noqa: E402
from benchmarks.common import log, median  # noqa: E402
from jaxps.plan import make_plan  # noqa: E402
from jaxps.update import compile_guarded_step, compile_step  # noqa: E402
from jaxps.validate import check_leaves, finite_flags  # noqa: E402


def per_call(fn, calls: int) -> float:
    """Seconds per call of `fn` (its result blocked on), over `calls` warm calls."""
    jax.block_until_ready(fn())
    t = time.perf_counter()
    for _ in range(calls):
        jax.block_until_ready(fn())
    return (time.perf_counter() - t) / calls


def parts(nbytes: int, leaves: int):
    """`{part: zero-argument callable}` for a tree of `leaves` leaves and `nbytes` bytes; and its server."""
    params = make_tree(nbytes, leaves)
    plan = make_plan(params, 1)
    tx = optax.sgd(1e-3)
    xs = [jnp.asarray(x) for x in jax.tree.leaves(params)]
    grads = [jnp.ones_like(x) for x in xs]
    state = tx.init(xs)
    flags = jax.block_until_ready(finite_flags(grads))
    plain, guarded = compile_step(tx)[1], compile_guarded_step(tx)[1]  # the variants that keep the params alive
    ps = jaxps.ParameterServer(params, tx, shards=1, transport="inprocess")
    tree = jax.tree.unflatten(plan.treedef, grads)

    def round_trip():
        ps.push(tree).result()
        return ps.pull()

    concat_check = jax.jit(lambda xs: jnp.all(jnp.isfinite(jnp.concatenate([x.ravel() for x in xs]))))
    sum_check = jax.jit(lambda xs: jnp.isfinite(sum(jnp.sum(x * 0) for x in xs)))

    return ps, {
        "round trip": round_trip,
        "finite check": lambda: finite_flags(grads),
        "guarded step": lambda: guarded(xs, state, grads, flags),
        "plain step": lambda: plain(xs, state, grads),
        "leaf checks": lambda: check_leaves(plan.leaves, grads),
        "concat check": lambda: concat_check(grads),
        "sum check": lambda: sum_check(grads),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bytes", type=float, default=4e6)
    p.add_argument("--leaves", type=int, default=100)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--calls", type=int, default=50, help="calls per timing")
    args = p.parse_args()
    log(f"command: python {' '.join(sys.argv)}")
    log(f"date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} CPUs, jax {jax.__version__} on {jax.devices()[0].platform}")
    many_ps, many = parts(int(args.bytes), args.leaves)
    one_ps, one = parts(int(args.bytes), 1)
    times = {name: ([], []) for name in many}
    try:
        for _ in range(args.repeats):
            for name in many:
                times[name][0].append(per_call(many[name], args.calls))
                times[name][1].append(per_call(one[name], args.calls))
    finally:
        many_ps.close()
        one_ps.close()
    log(f"{args.bytes / 1e6:g} MB, {args.leaves} leaves against 1 leaf; medians of {args.repeats}, {args.calls} calls each:")
    for name, (n, o) in times.items():
        n, o = median(n), median(o)
        log(
            f"{name:>13}: {args.leaves} leaves {n * 1e3:7.3f} ms, 1 leaf {o * 1e3:7.3f} ms = {n / o:5.2f}x "
            f"({(n - o) / (args.leaves - 1) * 1e6:5.1f} us per extra leaf)"
        )


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
