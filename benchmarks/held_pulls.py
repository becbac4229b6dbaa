"""What a worker that holds its pull while it pushes costs, in-process: steps/s against one that drops it.

    python benchmarks/held_pulls.py [--params 25e6] [--steps 20] [--repeats 5]

`jaxps.TrainState` and `jaxps.nnx.Optimizer` hold the params they pulled while
they push the next gradients (the state or the model keeps them). The shard
must then keep those params alive: its step cannot update them in place. An
in-process server, 1 shard, `optax.adam`, one float32 leaf of `--params`
elements, async mode, gradients as jax arrays (checked for NaN/Inf on the
device, unless `--nonfinite allow`), two loops taking turns `--repeats` times:

  dropped: `ps.pull()` dropped at once, then `ps.push(grads)`;
  held:    `held = ps.pull()`, then `ps.push(grads)` while `held` is alive.

Each block runs `--steps` steps after warm-up and ends with
`jax.block_until_ready`; the report gives each loop's median steps/s and
their ratio.
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
from benchmarks.common import log, median  # noqa: E402


def block(ps, grads, steps: int, hold: bool) -> float:
    """Steps/s of `steps` pull-then-push steps, holding each pull through its push if `hold`."""
    start = time.perf_counter()
    for _ in range(steps):
        held = ps.pull()
        if not hold:
            del held
        ps.push(grads)
    jax.block_until_ready(ps.pull())
    return steps / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--params", type=float, default=25e6)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--nonfinite", default="raise", help='the server\'s `nonfinite`: "raise" (checked on the device), "allow"')
    args = p.parse_args()
    n = int(args.params)
    grads = {"w": jnp.full((n,), 1e-3, jnp.float32)}
    rates: dict[str, list[float]] = {"dropped": [], "held": []}
    with jaxps.ParameterServer({"w": np.zeros(n, np.float32)}, optax.adam(1e-3), mode="async", nonfinite=args.nonfinite) as ps:
        for hold in (False, True):  # warm-up: compiles each step
            block(ps, grads, 3, hold)
        for rep in range(args.repeats):
            for name in rates:
                rates[name].append(block(ps, grads, args.steps, name == "held"))
            log(f"[held pulls] repeat {rep + 1}/{args.repeats}: " + ", ".join(f"{k} {v[-1]:.1f} steps/s" for k, v in rates.items()))
    dropped, held = median(rates["dropped"]), median(rates["held"])
    log(f"[held pulls] {n:,} params, adam, in-process, nonfinite={args.nonfinite!r}: dropped {dropped:.1f} steps/s, held {held:.1f} steps/s: held/dropped {held / dropped:.2f}x")


if __name__ == "__main__":
    main()
