"""Benchmark 3: what training through jaxps costs over a plain jit-compiled optax loop.

The model, loss and input scaling come from `examples/mnist.py` (`ConvNet`,
`loss_fn`, `to_inputs`) and the data from `examples/datasets.py`
(Fashion-MNIST from real files).

All loops use the same batches (prepared up front as numpy arrays, fed to the
jit each step), the same optimizer (`optax.adam(1e-3)`) and batch size:

  plain: `params, opt_state, loss = train_step(params, opt_state, x, y)`, one jit
         with `jax.value_and_grad` and the optax update, params and state donated;
  split: plain optax as two jits, `grad_fn` then the update (donated): what any
         parameter server must do, since the server, not the worker, updates;
  jaxps: 1 worker, in-process server (1 shard): `grads = grad_fn(ps.pull(), x, y)`,
         `ps.push(grads)` (the shard's optax step is its own jit; the future is
         not waited on, as in a training loop), twice: with the default
         `nonfinite="raise"` (the gradients are checked for NaN/Inf on the
         device, inside the shard's step: nothing waits for them) and with
         `nonfinite="allow"` (no check, like the plain loop).

Each block runs `steps` steps and ends with `jax.block_until_ready`; blocks
alternate plain, split, jaxps, jaxps unchecked, plain, ...; steps/s is the median over
blocks and an overhead is the median over repeats of (plain steps/s / jaxps steps/s - 1).
"""

from __future__ import annotations

import functools
import importlib.util
import os
import time

import jax
import numpy as np
import optax

from benchmarks.common import REPO, log, median
from jaxps.update import apply_gradients

BATCH = 64
LR = 1e-3


def load_setup(n_examples: int):
    """(ConvNet class, loss_fn, to_inputs, images, labels, description), from the example."""
    path = os.path.join(REPO, "examples", "mnist.py")
    spec = importlib.util.spec_from_file_location("jaxps_examples_mnist", path)
    mnist = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mnist)
    ds = mnist.datasets.load("fashion_mnist", train_limit=n_examples)
    source = f"model from examples/mnist.py (ConvNet, loss_fn, to_inputs); data: Fashion-MNIST via examples/datasets.py ({ds.source})"
    return mnist.ConvNet, mnist.loss_fn, mnist.to_inputs, ds.train_images, ds.train_labels, source


def run(quick: bool) -> dict:
    import jaxps

    steps, repeats, n_batches = (5, 2, 4) if quick else (100, 15, 60)
    ConvNet, loss_fn, to_inputs, images, labels, source = load_setup(BATCH * n_batches)
    log(f"[overhead] {source}")
    batches = [(to_inputs(images[i * BATCH : (i + 1) * BATCH]), labels[i * BATCH : (i + 1) * BATCH]) for i in range(n_batches)]
    params0 = ConvNet().init(jax.random.key(0), np.zeros((1, 28, 28, 1), np.float32))["params"]
    n_params = sum(int(np.size(x)) for x in jax.tree_util.tree_leaves(params0))
    tx = optax.adam(LR)

    # -- plain optax, one jit per step ------------------------------------------------------
    def train_step(params, opt_state, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    train_step = jax.jit(train_step, donate_argnums=(0, 1))
    grad_fn = jax.jit(jax.value_and_grad(loss_fn))
    update_step = jax.jit(functools.partial(apply_gradients, tx), donate_argnums=(0, 1))
    counter = {"i": 0}

    def plain_loop(split: bool):
        """Plain optax: fused (`train_step`), or `split` into grad_fn + update jits as a server must."""
        params = jax.tree.map(lambda x: x.copy(), params0)
        state = {"params": params, "opt": tx.init(params)}

        def block(n):
            params, opt_state, i = state["params"], state["opt"], counter["i"]
            for _ in range(n):
                x, y = batches[i % n_batches]
                if split:
                    loss, grads = grad_fn(params, x, y)
                    params, opt_state = update_step(params, opt_state, grads)
                else:
                    params, opt_state, loss = train_step(params, opt_state, x, y)
                i += 1
            jax.block_until_ready((params, opt_state, loss))
            state.update(params=params, opt=opt_state)
            counter["i"] = i
            return float(loss)

        return block

    # -- through jaxps (1 worker, in-process), checked and unchecked -------------------------
    servers = {nonfinite: jaxps.ParameterServer(params0, tx, shards=1, transport="inprocess", nonfinite=nonfinite) for nonfinite in ("raise", "allow")}

    def jaxps_loop(ps):
        def block(n):
            i = counter["i"]
            for _ in range(n):
                x, y = batches[i % n_batches]
                loss, grads = grad_fn(ps.pull(), x, y)
                future = ps.push(grads)  # a refused push would raise at the next push
                i += 1
            future.result()
            jax.block_until_ready((ps.pull(), loss))
            counter["i"] = i
            return float(loss)

        return block

    loops = {"plain": plain_loop(False), "split": plain_loop(True), "raise": jaxps_loop(servers["raise"]), "allow": jaxps_loop(servers["allow"])}
    try:
        for block in loops.values():
            block(3)  # compile
        rates: dict[str, list[float]] = {name: [] for name in loops}
        pairs: dict[str, list[float]] = {name: [] for name in loops if name != "plain"}
        for rep in range(repeats):
            line = []
            for name, block in loops.items():
                t = time.perf_counter()
                loss = block(steps)
                rates[name].append(steps / (time.perf_counter() - t))
                line.append(f"{name} {rates[name][-1]:7.2f} steps/s (loss {loss:.3f})")
            for name, values in pairs.items():
                values.append(rates["plain"][-1] / rates[name][-1] - 1)
            log(f"[overhead] repeat {rep + 1}/{repeats}: " + ", ".join(line) + "; overhead " + ", ".join(f"{n} {v[-1]:+.1%}" for n, v in pairs.items()))
    finally:
        for ps in servers.values():
            ps.close()
    out = {
        "source": source,
        "params": n_params,
        "batch": BATCH,
        "optimizer": f"optax.adam({LR})",
        "steps_per_block": steps,
        "repeats": repeats,
        "plain_steps_per_s": median(rates["plain"]),
        "split_steps_per_s": median(rates["split"]),
        "split_all": rates["split"],
        "overhead_split": median(pairs["split"]),
        "overhead_split_all": pairs["split"],
        "jaxps_steps_per_s": median(rates["raise"]),
        "jaxps_unchecked_steps_per_s": median(rates["allow"]),
        "plain_all": rates["plain"],
        "jaxps_all": rates["raise"],
        "jaxps_unchecked_all": rates["allow"],
        "overhead": median(pairs["raise"]),
        "overhead_all": pairs["raise"],
        "overhead_unchecked": median(pairs["allow"]),
        "overhead_unchecked_all": pairs["allow"],
    }
    log(
        f"[overhead] median: plain {out['plain_steps_per_s']:.2f} steps/s, split {out['split_steps_per_s']:.2f} ({out['overhead_split']:+.1%}), jaxps {out['jaxps_steps_per_s']:.2f} steps/s "
        f"({out['overhead']:+.1%}), jaxps nonfinite='allow' {out['jaxps_unchecked_steps_per_s']:.2f} steps/s ({out['overhead_unchecked']:+.1%})"
    )
    return out
