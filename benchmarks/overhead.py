"""Benchmark 3: what training through jaxps costs over a plain jit-compiled optax loop.

The model, loss and input scaling come from `examples/mnist.py` (`ConvNet`,
`loss_fn`, `to_inputs`) and the data from `examples/datasets.py`
(Fashion-MNIST from real files).

Both loops use the same batches (prepared up front as numpy arrays, fed to the
jit each step), the same optimizer (`optax.adam(1e-3)`) and batch size:

  plain: `params, opt_state, loss = train_step(params, opt_state, x, y)`, one jit
         with `jax.value_and_grad` and the optax update, params and state donated;
  jaxps: 1 worker, in-process server (1 shard): `grads = grad_fn(ps.pull(), x, y)`,
         `ps.push(grads).result()` (the shard's optax step is its own jit).

Each block runs `steps` steps and ends with `jax.block_until_ready`; blocks
alternate plain, jaxps, plain, jaxps, ...; steps/s is the median over blocks
and the overhead is the median over pairs of (plain steps/s / jaxps steps/s - 1).
"""

from __future__ import annotations

import importlib.util
import os
import time

import jax
import numpy as np
import optax

from benchmarks.common import REPO, log, median

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

    steps, repeats, n_batches = (5, 2, 4) if quick else (120, 7, 60)
    ConvNet, loss_fn, to_inputs, images, labels, source = load_setup(BATCH * n_batches)
    log(f"[overhead] {source}")
    batches = [(to_inputs(images[i * BATCH : (i + 1) * BATCH]), labels[i * BATCH : (i + 1) * BATCH]) for i in range(n_batches)]
    params0 = ConvNet().init(jax.random.key(0), np.zeros((1, 28, 28, 1), np.float32))["params"]
    n_params = sum(int(np.size(x)) for x in jax.tree_util.tree_leaves(params0))
    tx = optax.adam(LR)

    # -- plain optax ---------------------------------------------------------------
    def train_step(params, opt_state, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    train_step = jax.jit(train_step, donate_argnums=(0, 1))
    state = {"params": jax.tree.map(lambda x: x.copy(), params0), "opt": None, "i": 0}
    state["opt"] = tx.init(state["params"])

    def plain_block(n):
        params, opt_state, i = state["params"], state["opt"], state["i"]
        for _ in range(n):
            x, y = batches[i % n_batches]
            params, opt_state, loss = train_step(params, opt_state, x, y)
            i += 1
        jax.block_until_ready((params, opt_state, loss))
        state.update(params=params, opt=opt_state, i=i)
        return float(loss)

    # -- through jaxps (1 worker, in-process) --------------------------------------------
    grad_fn = jax.jit(jax.value_and_grad(loss_fn))
    ps = jaxps.ParameterServer(params0, tx, shards=1, transport="inprocess")
    counter = {"i": 0}

    def jaxps_block(n):
        i = counter["i"]
        for _ in range(n):
            x, y = batches[i % n_batches]
            loss, grads = grad_fn(ps.pull(), x, y)
            ps.push(grads).result()
            i += 1
        jax.block_until_ready((ps.pull(), loss))
        counter["i"] = i
        return float(loss)

    try:
        plain_block(3)  # compile
        jaxps_block(3)
        plain, through, pairs = [], [], []
        for rep in range(repeats):
            t = time.perf_counter()
            loss_p = plain_block(steps)
            a = steps / (time.perf_counter() - t)
            t = time.perf_counter()
            loss_j = jaxps_block(steps)
            b = steps / (time.perf_counter() - t)
            plain.append(a)
            through.append(b)
            pairs.append(a / b - 1)
            log(
                f"[overhead] repeat {rep + 1}/{repeats}: plain {a:7.2f} steps/s (loss {loss_p:.3f}), "
                f"jaxps {b:7.2f} steps/s (loss {loss_j:.3f}), overhead {a / b - 1:+.1%}"
            )
    finally:
        ps.close()
    out = {
        "source": source,
        "params": n_params,
        "batch": BATCH,
        "optimizer": f"optax.adam({LR})",
        "steps_per_block": steps,
        "repeats": repeats,
        "plain_steps_per_s": median(plain),
        "jaxps_steps_per_s": median(through),
        "plain_all": plain,
        "jaxps_all": through,
        "overhead": median(pairs),
        "overhead_all": pairs,
    }
    log(
        f"[overhead] median: plain {out['plain_steps_per_s']:.2f} steps/s, jaxps {out['jaxps_steps_per_s']:.2f} steps/s, "
        f"overhead {out['overhead']:+.1%}"
    )
    return out
