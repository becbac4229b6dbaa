"""Checkpoint write and read time of `jaxps.checkpoint` against raw disk throughput.

    python benchmarks/checkpoint_io.py [--params 100e6] [--leaves 10] [--shards 1] [--repeats 2] [--dir /tmp]

The state is an Adam state of `--params` float32 parameters in `--leaves`
equal leaves: parameters + mu + nu (12 bytes a parameter, 1.2 GB at 100M).

- layer write: `checkpoint.save` (prepare, one orbax part per shard, commit), until it returns (durable);
- layer read:  `checkpoint.restore` into the same plan: reads, checks, builds each shard's (leaves, opt_state);
- raw write:   the same arrays, one after another, into one file with `ndarray.tofile`, then fsync;
- raw read:    `np.fromfile` of that file.

Reads are cold: after writing, the files' pages are dropped from the page cache
(`posix_fadvise(DONTNEED)`, file by file, no root needed), so both sides read
from the disk. Raw and layer runs alternate (the machine is shared and its load
drifts); ratios are raw time / layer time (1.0 = as fast as raw disk). The files
are removed afterwards.
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=float, default=100e6)
    parser.add_argument("--leaves", type=int, default=10)
    parser.add_argument("--shards", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dir", default="/tmp")
    args = parser.parse_args()

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


if __name__ == "__main__":
    main()
