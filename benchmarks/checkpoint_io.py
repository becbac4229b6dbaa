"""Checkpoint save and restore time against the disk's own throughput, and training with checkpoints on.

    python benchmarks/checkpoint_io.py [--params 100e6] [--leaves 10] [--shards 2]
        [--transports inprocess,multiprocessing,ray] [--repeats 2] [--train-seconds 60] [--dir /tmp]
    python benchmarks/checkpoint_io.py --layer ...   # the file layer alone (jaxps.checkpoint), no server

A server holds `--params` float32 parameters in `--leaves` equal leaves under
`optax.adam` (parameters + mu + nu: 12 bytes a parameter, 1.2 GB at 100M).
Per transport, in one run:

- raw write: the same bytes, one array after another, into one file with `ndarray.tofile`, then fsync;
- save:      `ps.save(directory)` of the running server, until it returns (durable: every part fsynced,
             metadata written), each shard writing its own part from its own process;
- raw read:  `np.fromfile` of that file, cold;
- restore:   `ParameterServer.restore(...)`, cold: its wall time, and the shards' reading (each shard
             reads its own part, in parallel: in-process on threads of this process, otherwise in its own
             process; each says how long it took, `stats()["shards"][k]["restored_in_s"]`: their max);
- training:  steps/s of a driver pushing gradients for `--train-seconds`, without checkpoints, then with
             `jaxps.Checkpointing(every=N)`, N chosen from the first rate for a checkpoint every ~30 s.

Reads are cold: the files' pages are dropped from the page cache first
(`posix_fadvise(DONTNEED)`, file by file, no root needed). Raw and layer runs
alternate (the machine is shared and its load drifts); shares are raw time /
jaxps time (100% = as fast as the disk takes the bytes). Files are removed afterwards.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's jaxps

import numpy as np  # noqa: E402
import optax  # noqa: E402

from jaxps import checkpoint as ck  # noqa: E402
from jaxps.plan import make_plan  # noqa: E402


def drop_cache(path: Path) -> None:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def build(num_params: int, num_leaves: int, shards: int):
    rng = np.random.default_rng(0)
    size = num_params // num_leaves
    params = {f"layer_{i:03d}": rng.standard_normal(size, dtype=np.float32) for i in range(num_leaves)}
    plan = make_plan(params, shards)
    states = [{"opt_state[0].count": np.int32(7)} for _ in range(shards)]
    for path, s in plan.paths.items():
        x = params[path[2:-2]]
        states[s].update({f"params{path}": x, f"opt_state[0].mu{path}": x * 0.1, f"opt_state[0].nu{path}": x * x})
    return params, plan, states


def raw_write(path: Path, states) -> None:
    with open(path, "wb") as f:
        for state in states:
            for x in state.values():
                np.asarray(x).tofile(f)
        f.flush()
        os.fsync(f.fileno())


def layer_main(args) -> None:
    params, plan, states = build(int(args.params), args.leaves, args.shards)
    nbytes = sum(np.asarray(x).nbytes for s in states for x in s.values())
    tx = optax.adam(1e-3)
    work = Path(tempfile.mkdtemp(prefix="jaxps-ckpt-bench-", dir=args.dir))
    print(f"command: python {' '.join(sys.argv)}")
    print(f"state: {int(args.params):,} params x 3 (params, mu, nu) in {args.leaves} leaves, {args.shards} shard(s): {nbytes / 1e9:.2f} GB; files in {work}")
    rows = []
    try:
        ck.save(work / "warmup", 0, make_plan({"w": np.zeros(4, np.float32)}, 1), [{"params['w']": np.zeros(4, np.float32)}])
        for r in range(args.repeats):
            raw, layer = work / "raw.bin", work / f"ckpt{r}"
            t = time.perf_counter(); raw_write(raw, states); raw_w = time.perf_counter() - t
            t = time.perf_counter(); ck.save(layer, 1, plan, states, mode="async"); layer_w = time.perf_counter() - t
            drop_cache(raw); drop_cache(layer)
            t = time.perf_counter(); back = np.fromfile(raw, np.float32); raw_r = time.perf_counter() - t
            assert back.nbytes >= nbytes - 4 * args.shards
            del back
            t = time.perf_counter(); _, restored = ck.restore(layer, params, tx, plan); layer_r = time.perf_counter() - t
            assert np.array_equal(restored[0][0][0], states[0][f"params{plan.leaves[plan.shard_leaves[0][0]].path}"])
            del restored
            raw.unlink()
            shutil.rmtree(layer)
            rows.append((raw_w, layer_w, raw_r, layer_r))
            gb = nbytes / 1e9
            print(
                f"run {r}: write raw {raw_w:.2f} s ({gb / raw_w:.2f} GB/s), layer {layer_w:.2f} s ({gb / layer_w:.2f} GB/s), "
                f"ratio {raw_w / layer_w:.2f} | read raw {raw_r:.2f} s ({gb / raw_r:.2f} GB/s), "
                f"layer {layer_r:.2f} s ({gb / layer_r:.2f} GB/s), ratio {raw_r / layer_r:.2f}"
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    med = lambda i: float(np.median([row[i] for row in rows]))
    print(
        f"median: write {med(1):.2f} s vs raw {med(0):.2f} s (layer at {med(0) / med(1):.0%} of raw); "
        f"read {med(3):.2f} s vs raw {med(2):.2f} s (layer at {med(2) / med(3):.0%} of raw)"
    )



def server_main(args) -> None:
    import jax
    import jaxps

    params, plan, _ = build(int(args.params), args.leaves, args.shards)
    tx = optax.adam(1e-3)
    grads = jax.tree.map(lambda x: np.full_like(x, 1e-3), params)
    nbytes = 3 * sum(x.nbytes for x in params.values()) + 4 * args.shards
    gb = nbytes / 1e9
    work = Path(tempfile.mkdtemp(prefix="jaxps-ckpt-bench-", dir=args.dir))
    print(f"command: python {' '.join(sys.argv)}")
    print(f"date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} CPUs")
    print(f"state: {int(args.params):,} Adam params (params, mu, nu) in {args.leaves} leaves, {args.shards} shards: {gb:.2f} GB; files in {work}")
    raw = work / "raw.bin"
    try:
        for transport in args.transports.split(","):
            if transport == "ray":
                import ray

                ray.init(num_cpus=max(2, os.cpu_count() or 2), include_dashboard=False, logging_level="error")
            kw = dict(shards=args.shards, transport=transport)
            rows = []
            ps = jaxps.ParameterServer(params, tx, **kw)
            try:
                ps.push(grads).result()
                for r in range(args.repeats):
                    directory = work / f"{transport}{r}"
                    t = time.perf_counter(); raw_write(raw, [params, params, params]); raw_w = time.perf_counter() - t
                    t = time.perf_counter(); step = ps.save(directory); save = time.perf_counter() - t
                    drop_cache(raw); drop_cache(directory)
                    t = time.perf_counter(); back = np.fromfile(raw, np.float32); raw_r = time.perf_counter() - t
                    del back
                    t = time.perf_counter()
                    restored = jaxps.ParameterServer.restore(directory, params, tx, **kw)
                    restore = time.perf_counter() - t
                    assert restored.step == step
                    reads = [s["restored_in_s"] for s in restored.stats()["shards"]]
                    reading = max(reads)
                    restored.close()
                    shutil.rmtree(directory)
                    raw.unlink()
                    rows.append((raw_w, save, raw_r, restore, reading))
                    print(
                        f"{transport} run {r}: save {save:.2f} s vs raw write {raw_w:.2f} s ({raw_w / save:.0%}) | "
                        f"restore {restore:.2f} s, of which the shards reading {reading:.2f} s, vs raw read "
                        f"{raw_r:.2f} s ({raw_r / reading:.0%})"
                    )
                rate = train_rate(ps, grads, args.train_seconds)
            finally:
                ps.close()
            every = max(1, round(30 * rate))
            ps = jaxps.ParameterServer(params, tx, **kw, checkpoint=jaxps.Checkpointing(work / f"{transport}-train", every=every, keep=1))
            try:
                ps.push(grads).result()
                rate_ck = train_rate(ps, grads, args.train_seconds)
            finally:
                ps.close()
            saved = jaxps.checkpoint.steps(work / f"{transport}-train")
            shutil.rmtree(work / f"{transport}-train", ignore_errors=True)
            med = lambda i: float(np.median([row[i] for row in rows]))
            print(
                f"{transport} median: save {med(1):.2f} s = {gb / med(1):.2f} GB/s, {med(0) / med(1):.0%} of raw write "
                f"({gb / med(0):.2f} GB/s); restore {med(3):.2f} s, reading {med(4):.2f} s = {gb / med(4):.2f} GB/s, "
                f"{med(2) / med(4):.0%} of raw read ({gb / med(2):.2f} GB/s)"
            )
            print(
                f"{transport} training: {rate:.2f} steps/s without checkpoints, {rate_ck:.2f} steps/s with "
                f"Checkpointing(every={every}) (~{every / max(rate, 1e-9):.0f} s apart; kept after close: step {saved}): "
                f"{1 - rate_ck / rate:+.1%} slower"
            )
            if transport == "ray":
                ray.shutdown()
    finally:
        shutil.rmtree(work, ignore_errors=True)


def train_rate(ps, grads, seconds: float) -> float:
    """Steps/s of one driver pushing `grads` (and waiting for each) for `seconds`."""
    first, t0 = ps.step, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        ps.push(grads).result()
    return (ps.step - first) / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=float, default=100e6)
    parser.add_argument("--leaves", type=int, default=10)
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dir", default="/tmp")
    parser.add_argument("--transports", default="inprocess,multiprocessing,ray")
    parser.add_argument("--train-seconds", type=float, default=60.0)
    parser.add_argument("--layer", action="store_true", help="the file layer alone (jaxps.checkpoint), no server")
    args = parser.parse_args()
    layer_main(args) if args.layer else server_main(args)


if __name__ == "__main__":
    main()
