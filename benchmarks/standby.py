"""Hot standby (`replicas=1`): what it costs while nothing fails, and how fast a standby takes over.

    python benchmarks/standby.py [--params 1e6,10e6] [--seconds 6] [--repeats 2] [--transports multiprocessing,ray]
                                 [--dtype float32]

A server of `--params` parameters (`--dtype`: float32 or bfloat16) in 8 leaves under `optax.adam`, 2
shards, sync with 2 workers (threads of the driver pulling and pushing as fast
as they can). Side by side, in one run, alternating: updates/s with
`replicas=0` and with `replicas=1` (every step sent to the standby and
answered once it has it), `--seconds` each, `--repeats` times; the ratio of
the medians is the standby's cost. Then, with `replicas=1`, one shard's
primary is killed (SIGKILL) once per repeat: kill -> next step is the time
until the server applies its next step; steps lost are always 0.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's jaxps

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import jaxps  # noqa: E402
from benchmarks.common import session  # noqa: E402


class Training:
    """A server with 2 worker threads pulling and pushing until `stop()`."""

    def __init__(self, transport: str, num_params: int, replicas: int, dtype: str = "float32"):
        params = {f"w{i}": np.zeros(num_params // 8, jax.numpy.dtype(dtype)) for i in range(8)}
        self.grads = {k: np.full_like(v, 1e-3) for k, v in params.items()}
        self.ps = jaxps.ParameterServer(params, optax.adam(1e-3), shards=2, transport=transport, mode="sync", workers=2, replicas=replicas)
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._work, args=(w,), daemon=True) for w in range(2)]
        for t in self._threads:
            t.start()

    def _work(self, w: int) -> None:
        client = self.ps.client(w)
        try:
            while not self._stop.is_set():
                client.pull(timeout=600)
                client.push(self.grads).result(timeout=600)
        except jaxps.ServerClosedError:
            return  # the benchmark is over

    def rate(self, seconds: float) -> float:
        """Updates per second over `seconds`."""
        start_step, start = self.ps.step, time.perf_counter()
        time.sleep(seconds)
        return (self.ps.step - start_step) / (time.perf_counter() - start)

    def stop(self) -> None:
        self._stop.set()
        self.ps.close()


def cost(transport: str, num_params: int, seconds: float, repeats: int, dtype: str) -> tuple[float, float]:
    """Median updates/s without and with standbys, measured alternately."""
    rates: dict[int, list[float]] = {0: [], 1: []}
    for _ in range(repeats):
        for replicas in (0, 1):
            run = Training(transport, num_params, replicas, dtype)
            try:
                run.rate(1.0)  # warm up: compiled, buffers mapped
                rates[replicas].append(run.rate(seconds))
            finally:
                run.stop()
            print(f"  {transport} {num_params:>12,} params, replicas={replicas}: {rates[replicas][-1]:.1f} updates/s", flush=True)
    return statistics.median(rates[0]), statistics.median(rates[1])


def takeovers(transport: str, num_params: int, repeats: int, dtype: str) -> list[float]:
    """Seconds from a primary's SIGKILL to the next step applied, once per repeat (alternating shards)."""
    run = Training(transport, num_params, 1, dtype)
    times = []
    try:
        for r in range(repeats):
            while not all(s.get("standby") for s in run.ps.stats()["shards"]) or run.ps.step < 20:
                time.sleep(0.05)  # a standby behind every shard, and training under way
            shard = r % 2
            pid = run.ps.stats()["shards"][shard]["where"]["pid"]
            killed = time.perf_counter()
            os.kill(pid, signal.SIGKILL)
            while run.ps.stats()["takeovers"] < r + 1:
                time.sleep(0.005)
            back_at = run.ps.step
            while run.ps.step <= back_at:
                time.sleep(0.002)
            times.append(time.perf_counter() - killed)
            stats = run.ps.stats()
            assert stats["steps_lost"] == 0 and stats["restarts"] == 0, stats
            print(f"  {transport} {num_params:>12,} params: shard {shard} killed, next step {times[-1]:.2f} s after the kill", flush=True)
            time.sleep(21.0 if r + 1 < repeats else 0)  # under 3 deaths a minute (with the first's standby): no giving up
    finally:
        run.stop()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="1e6,10e6", help="comma-separated parameter counts")
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--transports", default="multiprocessing,ray")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()
    rows = []
    with session("standby.py", args.transports) as transports:
        for transport in transports:
            for n in [int(float(x)) for x in args.params.split(",")]:
                plain, replicated = cost(transport, n, args.seconds, args.repeats, args.dtype)
                rows.append((transport, n, plain, replicated, statistics.median(takeovers(transport, n, args.repeats, args.dtype))))
    print(f"\n2 shards, {args.dtype}, Adam, sync with 2 workers; medians of {args.repeats}")
    print("| transport | parameters | updates/s, replicas=0 | replicas=1 | ratio | kill -> next step | steps lost |")
    print("|---|---|---|---|---|---|---|")
    for transport, n, plain, replicated, next_step in rows:
        print(f"| {transport} | {n:,} | {plain:.1f} | {replicated:.1f} | {replicated / plain:.2f}x | {next_step:.2f} s | 0 |")


if __name__ == "__main__":
    main()
