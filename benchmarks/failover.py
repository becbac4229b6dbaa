"""Recovery time of `on_shard_failure="restart"`: from a shard's SIGKILL to training going on.

    python benchmarks/failover.py [--params 1e6,10e6] [--shards 2] [--repeats 3] [--transports multiprocessing,ray]

A server of `--params` float32 parameters in 8 leaves under
`optax.adam`, sync with 2 workers (threads of the driver pulling and pushing
as fast as they can), `Checkpointing(every=20)`. Once a checkpoint exists and
training has gone on past it, the benchmark kills one shard's process
(alternating shards) and measures:

- detect + recover: `ps.stats()["last_recovery_s"]` plus the supervisor's poll (0.1 s): the
  rollback of the live shards and the new process (spawn, imports, compilation, reading its part);
- kill -> next step: from the SIGKILL until the server applies its next step (what a training
  loop sees);
- steps lost: the steps between the checkpoint and the kill, trained again.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's jaxps

import numpy as np  # noqa: E402
import optax  # noqa: E402

import jaxps  # noqa: E402
from benchmarks.common import session  # noqa: E402
from jaxps import checkpoint  # noqa: E402


def measure(transport: str, num_params: int, shards: int, repeats: int) -> list[dict]:
    params = {f"w{i}": np.zeros(num_params // 8, np.float32) for i in range(8)}
    grads = {k: np.full_like(v, 1e-3) for k, v in params.items()}
    runs = []
    with tempfile.TemporaryDirectory() as directory:
        ps = jaxps.ParameterServer(
            params, optax.adam(1e-3), shards=shards, transport=transport, mode="sync", workers=2,
            checkpoint=jaxps.Checkpointing(directory, every=20, keep=2), on_shard_failure="restart",
        )
        stop = threading.Event()

        def worker(w: int) -> None:
            client = ps.client(w)
            try:
                while not stop.is_set():
                    client.pull(timeout=600)
                    client.push(grads).result(timeout=600)
            except jaxps.ServerClosedError:
                return  # the benchmark is over

        threads = [threading.Thread(target=worker, args=(w,), daemon=True) for w in range(2)]
        for t in threads:
            t.start()
        try:
            for r in range(repeats):
                saved = max(checkpoint.steps(directory))
                while max(checkpoint.steps(directory)) <= saved or ps.step < max(checkpoint.steps(directory)) + 5:
                    time.sleep(0.05)  # a new checkpoint, and some steps past it
                shard = r % shards
                pid = ps.stats()["shards"][shard]["where"]["pid"]
                before = ps.step
                killed = time.perf_counter()
                os.kill(pid, signal.SIGKILL)
                while ps.stats()["restarts"] < r + 1:
                    time.sleep(0.01)
                back_at = ps.step
                while ps.step <= back_at:
                    time.sleep(0.005)
                next_step = time.perf_counter() - killed
                stats = ps.stats()
                runs.append({
                    "recover_s": stats["last_recovery_s"] + 0.1, "next_step_s": next_step,
                    "lost": before - stats["rolled_back_to"][-1],
                })
                print(f"  {transport} {num_params:>12,} params: shard {shard} killed at step {before}, back at step "
                      f"{stats['rolled_back_to'][-1]}; recovered in {runs[-1]['recover_s']:.2f} s, "
                      f"next step {next_step:.2f} s after the kill", flush=True)
                time.sleep(31.0 if r + 1 < repeats else 0)  # under 3 deaths a minute: no giving up
        finally:
            stop.set()
            ps.close()
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="1e6,10e6", help="comma-separated parameter counts")
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--transports", default="multiprocessing,ray")
    args = parser.parse_args()
    rows = []
    with session("failover.py", args.transports) as transports:
        for transport in transports:
            for n in [int(float(x)) for x in args.params.split(",")]:
                runs = measure(transport, n, args.shards, args.repeats)
                rows.append((transport, n, *(statistics.median(r[k] for r in runs) for k in ("recover_s", "next_step_s", "lost"))))
    print(f"\n{args.shards} shards, Adam, sync with 2 workers; medians of {args.repeats} kills")
    print("| transport | parameters | detect + recover | kill -> next step | steps lost |")
    print("|---|---|---|---|---|")
    for transport, n, recover, next_step, lost in rows:
        print(f"| {transport} | {n:,} | {recover:.2f} s | {next_step:.2f} s | {lost:.0f} |")


if __name__ == "__main__":
    main()
