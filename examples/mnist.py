"""Sync and async parameter-server training of a small ConvNet on MNIST / Fashion-MNIST.

The jaxps version of the Ray docs' parameter-server example: a Flax ConvNet whose
parameters live in a `jaxps.ParameterServer`; N data-parallel workers, each on its
own slice of the training set, pull the parameters, compute `jax.grad` and push the
gradients; the driver evaluates the server's parameters on the test set as training
goes on.

    python examples/mnist.py                                  # sync, 2 workers, Fashion-MNIST
    python examples/mnist.py --mode async --plot async.png
    python examples/mnist.py --compare --plot compare.png     # sync, then async, one plot
    python examples/mnist.py --transport multiprocessing      # or ray: the same code
    python examples/mnist.py --checkpoint-dir ckpt             # saves as it trains; run again to resume
    python examples/mnist.py --transport multiprocessing --kill-shard-at 300   # loses a shard, goes on
    python examples/mnist.py --transport multiprocessing --replicas 1 --kill-shard-at 300   # its standby takes over

`--steps` is the number of gradients each worker computes, so sync and async see
the same data: sync applies one update per round of N gradients (their mean),
async applies every gradient as it comes.

With `--checkpoint-dir DIR` the server saves into DIR every `--checkpoint-every`
updates (in the background) and at the end; run again with the same DIR, it
resumes from the latest checkpoint and trains the remaining updates.

With `--kill-shard-at STEP` (multiprocessing) the driver kills shard 0's process
with SIGKILL once the server has applied STEP updates. The server runs with
`on_shard_failure="restart"`: it restarts the shard, rolls every shard back to
the latest checkpoint, and training goes on; the run trains until the server
has applied all its updates, the lost ones again. With `--replicas 1` every
shard has a hot standby: the killed shard's standby takes over, no update is
lost, and no checkpoint is needed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the example is sized for CPUs; drop this line for a GPU

import flax.linen as nn
import jax
import numpy as np
import optax

import jaxps

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import datasets  # noqa: E402  (examples/datasets.py: real MNIST / Fashion-MNIST files)
from monitor import Monitor  # noqa: E402  (examples/monitor.py: progress and tests as training goes)


# -- the model and the loss --------------------------------------------------------
class ConvNet(nn.Module):
    """A small ConvNet: two strided convolutions and two dense layers (~420k parameters)."""

    @nn.compact
    def __call__(self, x):  # x: [batch, 28, 28, 1], values in [0, 1]
        x = nn.relu(nn.Conv(32, (5, 5), strides=2)(x))  # -> 14 x 14 x 32
        x = nn.relu(nn.Conv(64, (3, 3), strides=2)(x))  # -> 7 x 7 x 64
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(nn.Dense(128)(x))
        return nn.Dense(10)(x)


def loss_fn(params, images, labels):
    logits = ConvNet().apply({"params": params}, images)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


grad_fn = jax.jit(jax.value_and_grad(loss_fn))  # compiled once per process, on first use


def to_inputs(images):
    """uint8 [n, 28, 28] -> float32 [n, 28, 28, 1] in [0, 1]."""
    return images.astype(np.float32)[..., None] / 255.0


def batches(images, labels, batch_size, seed):
    """Endless shuffled minibatches, a new permutation every epoch."""
    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(len(labels))
        for start in range(0, len(order) - batch_size + 1, batch_size):
            idx = order[start : start + batch_size]
            yield to_inputs(images[idx]), labels[idx]


# -- a worker ------------------------------------------------------------------------
def train_worker(client, work):
    """Runs on a thread, a spawned process or a Ray task (by transport): pull, grad, push.

    `work` holds this worker's slice of the training set (uint8 numpy arrays) and
    its share of the schedule; returns the training loss of every step.
    """
    data = batches(work["images"], work["labels"], work["batch_size"], work["seed"])
    losses = []
    for _ in range(work["steps"]):
        images, labels = next(data)
        loss, grads = grad_fn(client.pull(), images, labels)
        client.push(grads)
        losses.append(float(loss))
    return losses


# -- evaluation on the driver ----------------------------------------------------------
@jax.jit
def _eval_batch(params, images, labels):
    logits = ConvNet().apply({"params": params}, images)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).sum()
    return loss, (logits.argmax(-1) == labels).sum()


def evaluate(params, images, labels, batch_size=2000):
    """(mean loss, accuracy) of `params` on uint8 `images`."""
    loss = correct = 0.0
    for start in range(0, len(labels), batch_size):
        l, c = _eval_batch(params, to_inputs(images[start : start + batch_size]), labels[start : start + batch_size])
        loss, correct = loss + float(l), correct + int(c)
    return loss / len(labels), correct / len(labels)


# -- one training run ------------------------------------------------------------------
def kill_shard_at(ps, step, mode):
    """Kills shard 0's process (found from the server's stats) once the server has applied `step` updates."""
    try:
        while ps.step < step:
            time.sleep(0.05)
        pid = ps.stats()["shards"][0]["where"]["pid"]
    except jaxps.ServerClosedError:  # the run ended first
        print(f"[{mode}] --kill-shard-at {step}: the run ended at a lower step; nothing was killed", flush=True)
        return
    print(f"[{mode}] step {ps.step}: killing shard 0 (pid {pid}) with SIGKILL", flush=True)
    os.kill(pid, signal.SIGKILL)


def train(args, data, mode, log):
    """Trains a fresh ConvNet in `mode`; returns a summary dict (and writes log records)."""
    params = ConvNet().init(jax.random.key(args.seed), np.zeros((1, 28, 28, 1), np.float32))["params"]
    # Sync applies one update per round of gradients, async one per gradient.
    updates = args.steps if mode == "sync" else args.steps * args.workers
    # Adam, its learning rate decaying to 0 along a cosine over the run's updates.
    tx = optax.adam(optax.cosine_decay_schedule(args.lr, updates))

    # Each worker gets its own contiguous slice of the training set.
    slices = np.array_split(np.arange(len(data.train_labels)), args.workers)
    work = [
        {
            "images": data.train_images[s],
            "labels": data.train_labels[s],
            "steps": args.steps,
            "batch_size": args.batch_size,
            "seed": args.seed + 1 + i,
        }
        for i, s in enumerate(slices)
    ]
    info = {
        "mode": mode, "transport": args.transport, "workers": args.workers, "shards": args.shards, "dataset": data.name,
        "push_filter": args.push_filter,
    }
    history = []

    def record(**fields):
        entry = {"event": "eval", **fields, **info}
        history.append(entry)
        log(entry)
        return entry

    print(f"[{mode}] {args.workers} workers x {args.steps} steps of batch {args.batch_size}, "
          f"{args.shards} shard(s), transport {args.transport}")
    started = time.perf_counter()
    options = dict(
        shards=args.shards,
        transport=args.transport,
        mode=mode,
        workers=args.workers,
        max_staleness=args.max_staleness if mode == "ssp" else None,
    )
    resume = args.checkpoint_dir and jaxps.checkpoint.steps(args.checkpoint_dir)
    if args.checkpoint_dir:
        options["checkpoint"] = jaxps.Checkpointing(args.checkpoint_dir, every=args.checkpoint_every, keep=3)
    if args.kill_shard_at is not None and not args.replicas:
        options["on_shard_failure"] = "restart"
    if args.replicas:
        options["replicas"] = args.replicas
    if args.push_filter is not None:
        options["push_filter"] = jaxps.filters.from_spec(args.push_filter)
    if resume:
        ps = jaxps.ParameterServer.restore(args.checkpoint_dir, params, tx, **options)
        print(f"[{mode}] resuming from the checkpoint of step {ps.step} in {args.checkpoint_dir}")
    else:
        ps = jaxps.ParameterServer(params, tx, **options)
    first_step = ps.step  # a resumed run starts at its checkpoint's step
    with ps:
        startup = time.perf_counter() - started
        # what is left of the run: sync rounds, or async gradients shared by the workers
        left = max(0, updates - ps.step)
        for w in work:
            w["steps"] = left if mode == "sync" else -(-left // args.workers)
            w["seed"] += ps.step  # other batches than the first run's
        if args.kill_shard_at is not None:
            threading.Thread(target=kill_shard_at, args=(ps, args.kill_shard_at, mode), daemon=True).start()
        test = lambda params: dict(zip(("loss", "accuracy"), evaluate(params, data.test_images, data.test_labels)))
        show = lambda m: f"test loss {m['loss']:.4f}  test accuracy {m['accuracy']:.2%}"
        with Monitor(ps, test, show, args.eval_every, updates, record, mode) as monitor:
            losses = ps.run_workers(train_worker, work)
            while ps.step < updates:  # a shard died: the updates rolled back are trained again
                left = updates - ps.step
                print(f"[{mode}] {left} updates rolled back: training them again")
                for w in work:
                    w["steps"] = left if mode == "sync" else -(-left // args.workers)
                    w["seed"] += 1000
                losses = [a + b for a, b in zip(losses, ps.run_workers(train_worker, work))]
            if args.checkpoint_dir:
                print(f"[{mode}] saved step {ps.save(args.checkpoint_dir, keep=3)} in {args.checkpoint_dir}")
        final, wall, stats = monitor.last, monitor.wall, ps.stats()

    tail = [np.mean(l[-50:]) for l in losses if l]
    summary = {
        "event": "final",
        **info,
        "steps": stats["steps"],
        "gradients": sum(len(l) for l in losses),
        "wall_s": wall,
        "startup_s": startup,
        "updates_per_s": (stats["steps"] - first_step) / wall,  # this run's updates (a resumed run's start step excluded)
        "test_loss": final["loss"],
        "test_accuracy": final["accuracy"],
        "train_loss": float(np.mean(tail)) if tail else float("nan"),
        "staleness_mean": stats["staleness_mean"],
        "staleness_max": stats["staleness_max"],
        "bytes_pushed": stats["bytes_pushed"],
        "bytes_pulled": stats["bytes_pulled"],
        "history": history,
    }
    log({k: v for k, v in summary.items() if k != "history"})
    print(
        f"[{mode}] test accuracy {final['accuracy']:.2%} (loss {final['loss']:.4f}) after {stats['steps']} updates "
        + (f"({stats['steps'] - first_step} in this run) " if first_step else "")
        + f"in {wall:.1f}s = {summary['updates_per_s']:.1f} updates/s "
        f"(server start {startup:.1f}s, mean staleness {stats['staleness_mean']:.2f})"
    )
    gradients = max(1, summary["gradients"])
    print(
        f"[{mode}] bytes per push {stats['bytes_pushed'] / gradients:,.0f}"
        f"{' with push filter ' + args.push_filter if args.push_filter else ''}, pulled {stats['bytes_pulled']:,} in all"
        + (" (a replaced shard counts bytes from its start: fewer than crossed)" if stats.get("restarts") or stats.get("takeovers") else "")
    )
    return summary


def plot(results, path, title):
    """Test accuracy against wall time, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in results:
        t = [h["time"] for h in r["history"]]
        acc = [100 * h["accuracy"] for h in r["history"]]
        label = f"{r['mode']} ({r['steps']} updates, {r['wall_s']:.0f}s, {100 * r['test_accuracy']:.1f}%)"
        ax.plot(t, acc, marker=".", label=label)
    ax.set_xlabel("wall time (s)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(max(0, min(100 * h["accuracy"] for r in results for h in r["history"]) - 2), 100)
    ax.grid(alpha=0.3)
    ax.set_title(title)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"plot written to {path}")


# -- the command line ------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--transport", default="inprocess", choices=["inprocess", "multiprocessing", "ray"])
    p.add_argument("--mode", default="sync", choices=["sync", "async", "ssp"])
    p.add_argument("--compare", action="store_true", help="run sync, then async, and plot both")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--max-staleness", type=int, default=2, help="ssp only")
    p.add_argument("--steps", type=int, default=1500, help="gradients computed by each worker")
    p.add_argument("--batch-size", type=int, default=64, help="per worker")
    p.add_argument("--lr", type=float, default=2e-3, help="peak Adam learning rate (cosine decay to 0)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dataset", default="fashion_mnist", choices=datasets.DATASETS)
    p.add_argument("--data-dir", default=None, help="a folder with the four IDX files (if not given: look in the usual places)")
    p.add_argument("--train-limit", type=int, default=None, help="use only the first N training examples")
    p.add_argument("--test-limit", type=int, default=None, help="use only the first N test examples")
    p.add_argument("--eval-every", type=int, default=100, help="test every K server updates (0: only at the end)")
    p.add_argument("--log", default=None, metavar="FILE.jsonl", help="append a JSON line per evaluation and per run")
    p.add_argument("--plot", default=None, metavar="FILE.png", help="plot test accuracy against wall time")
    p.add_argument("--checkpoint-dir", default=None, metavar="DIR", help="save into DIR as training goes; resume from it if it holds a checkpoint")
    p.add_argument("--checkpoint-every", type=int, default=200, metavar="N", help="save every N server updates (one save at a time: while one is written, later ones wait for it)")
    p.add_argument(
        "--kill-shard-at", type=int, default=None, metavar="STEP",
        help="multiprocessing: SIGKILL shard 0 at update STEP; it is restarted from the latest checkpoint (in a temporary "
        "--checkpoint-dir if none is given), or taken over by its standby (--replicas 1), and training goes on",
    )
    p.add_argument("--replicas", type=int, default=0, choices=[0, 1], help="1: a hot standby of every shard (multiprocessing, ray)")
    p.add_argument(
        "--push-filter", default=None, metavar="SPEC",
        help="what of each gradient crosses to the shards: bf16, fp16, topk:FRACTION, sig:THRESHOLD, or several "
        "joined by '+' (e.g. topk:0.01+bf16); top-k and sig keep what they do not send (error feedback)",
    )
    args = p.parse_args(argv)
    if args.push_filter is not None:
        try:
            jaxps.filters.from_spec(args.push_filter)
        except ValueError as e:
            p.error(f"--push-filter {args.push_filter}: {e}")
    if args.workers < 1 or args.steps < 1 or args.batch_size < 1 or args.shards < 1:
        p.error("--workers, --shards, --steps and --batch-size must be positive")
    if args.checkpoint_every < 1:
        p.error("--checkpoint-every must be positive")
    for flag in ("train_limit", "test_limit", "kill_shard_at"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}")
    if args.eval_every < 0 or args.max_staleness < 0:
        p.error("--eval-every and --max-staleness cannot be negative")
    if not 0 < args.lr < float("inf"):
        p.error(f"--lr must be a positive number, got {args.lr}")
    if args.replicas and args.transport == "inprocess":
        p.error("--replicas 1 keeps standbys in processes of their own: use it with --transport multiprocessing or ray")
    if args.checkpoint_dir and args.compare:
        p.error("--checkpoint-dir saves one run: use it with --mode, not --compare")
    if args.kill_shard_at is not None:
        if args.transport != "multiprocessing":
            p.error("--kill-shard-at kills a shard process: use it with --transport multiprocessing")
        if args.compare:
            p.error("--kill-shard-at: use it with --mode, not --compare")
        if not args.checkpoint_dir and not args.replicas:
            args.checkpoint_dir = args.temporary_checkpoints = tempfile.mkdtemp(prefix="jaxps_mnist_")
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        data = datasets.load(args.dataset, args.data_dir, args.train_limit, args.test_limit)
    except datasets.DataNotFoundError as e:
        sys.exit(f"error: {e}")
    if len(data.train_labels) < args.workers * args.batch_size:
        sys.exit(f"error: {len(data.train_labels)} training examples are too few for {args.workers} workers x batch {args.batch_size}")
    print(f"data: {data.name} from {data.source}: {len(data.train_labels)} train, {len(data.test_labels)} test examples")
    for f in data.files:
        print(f"  {f}")

    log_file = open(args.log, "a") if args.log else None

    def log(entry):
        if log_file:
            log_file.write(json.dumps(entry) + "\n")
            log_file.flush()

    try:
        modes = ["sync", "async"] if args.compare else [args.mode]
        results = [train(args, data, mode, log) for mode in modes]
    finally:
        if log_file:
            log_file.close()
        if getattr(args, "temporary_checkpoints", None):
            shutil.rmtree(args.temporary_checkpoints, ignore_errors=True)

    plot_path = args.plot or ("mnist_compare.png" if args.compare else None)
    if plot_path:
        title = f"{data.name}: {args.workers} workers, {args.shards} shards, {args.transport}"
        plot(results, plot_path, title)
    return results


if __name__ == "__main__":
    main()
