"""Benchmark 3: what training through jaxps costs over a plain jit-compiled optax loop.

The model, loss and input scaling come from `examples/mnist.py` (`ConvNet`,
`loss_fn`, `to_inputs`) and the data from `examples/datasets.py`
(Fashion-MNIST from real files) when they import; otherwise an equivalent
Flax ConvNet defined here on Fashion-MNIST read from
/usr/share/datasets/fashion-mnist. The result says which.

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

import gzip
import importlib.util
import os
import struct
import sys
import time

import jax
import numpy as np
import optax

from benchmarks.common import REPO, log, median

BATCH = 64
LR = 1e-3
DATA_DIR = "/usr/share/datasets/fashion-mnist"


# -- the fallback: an equivalent ConvNet and a minimal IDX reader -------------------------
def _fallback_model():
    import flax.linen as nn

    class ConvNet(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.relu(nn.Conv(32, (5, 5), strides=2)(x))
            x = nn.relu(nn.Conv(64, (3, 3), strides=2)(x))
            x = x.reshape((x.shape[0], -1))
            x = nn.relu(nn.Dense(64)(x))
            return nn.Dense(10)(x)

    def loss_fn(params, images, labels):
        logits = ConvNet().apply({"params": params}, images)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    def to_inputs(images):
        return images.astype(np.float32)[..., None] / 255.0

    return ConvNet, loss_fn, to_inputs


def _read_idx(path):
    with gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _fallback_data(n):
    images = _read_idx(os.path.join(DATA_DIR, "train-images-idx3-ubyte.gz"))[:n]
    labels = _read_idx(os.path.join(DATA_DIR, "train-labels-idx1-ubyte.gz"))[:n].astype(np.int32)
    return images, labels, f"Fashion-MNIST, idx files in {DATA_DIR}"


def load_setup(n_examples: int):
    """(ConvNet class, loss_fn, to_inputs, images, labels, description)."""
    try:
        path = os.path.join(REPO, "examples", "mnist.py")
        spec = importlib.util.spec_from_file_location("jaxps_examples_mnist", path)
        mnist = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mnist)
        ConvNet, loss_fn, to_inputs = mnist.ConvNet, mnist.loss_fn, mnist.to_inputs
        model_from = "examples/mnist.py (ConvNet, loss_fn, to_inputs)"
    except Exception as e:
        log(f"[overhead] examples/mnist.py not usable ({type(e).__name__}: {e}); using the equivalent ConvNet in benchmarks/overhead.py")
        ConvNet, loss_fn, to_inputs = _fallback_model()
        model_from = "benchmarks/overhead.py (a copy of the examples' ConvNet)"
    try:
        sys.path.insert(0, os.path.join(REPO, "examples"))
        import datasets  # examples/datasets.py

        ds = datasets.load("fashion_mnist", train_limit=n_examples)
        images, labels, data_from = ds.train_images, ds.train_labels, f"Fashion-MNIST via examples/datasets.py ({ds.source})"
    except Exception as e:
        log(f"[overhead] examples/datasets.py not usable ({type(e).__name__}: {e}); reading {DATA_DIR} directly")
        images, labels, data_from = _fallback_data(n_examples)
    return ConvNet, loss_fn, to_inputs, images, labels, f"model from {model_from}; data: {data_from}"


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
