"""Shared pieces of the benchmarks: timing, a cross-process start barrier, sizes, machine facts.

Timing rules used everywhere: `time.perf_counter` (CLOCK_MONOTONIC on Linux,
so stamps taken in different processes of this machine are comparable),
warm-up rounds excluded, `jax.block_until_ready` on anything JAX may still be
computing, medians over repeats.
"""

from __future__ import annotations

import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from contextlib import contextmanager
from typing import Any, Callable

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# "ray-tcp": the Ray transport with `data_path="tcp"`, every array over TCP (as from another node);
# "ray-objectstore": `data_path="object_store"`, every array through Ray's object store
TRANSPORTS = ("inprocess", "multiprocessing", "ray", "ray-tcp", "ray-objectstore")
DATA_PATHS = {"ray-tcp": "tcp", "ray-objectstore": "object_store"}  # the Ray transport's `data_path` of those names
RAY_INIT = {"address": "local", "num_cpus": 4, "include_dashboard": False}  # "local": a new session, never a running one


def log(msg: str) -> None:
    print(msg, flush=True)


def median(xs) -> float:
    return float(statistics.median(xs))


def fmt_bytes(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            v = n / scale
            return f"{v:.0f} {unit}" if v == int(v) else f"{v:.3g} {unit}"
    return f"{int(n)} B"


def time_calls(fn: Callable[[], Any], warmup: int, reps: int) -> list[float]:
    """Seconds per call of `fn` (which must itself block until its work is done)."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def adaptive_reps(first: float, budget_s: float, lo: int = 3, hi: int = 30) -> int:
    """How many repeats fit in `budget_s` given one call took `first` seconds (at least `lo`)."""
    return int(max(lo, min(hi, budget_s / max(first, 1e-6))))


def memcpy_timer(nbytes: int) -> Callable[[int], list[float]]:
    """`timer(reps)`: seconds of each of `reps` warm single-core `np.copyto`s of `nbytes` (buffers touched once, reused)."""
    n = max(1, nbytes // 4)
    src = np.ones(n, np.float32)
    dst = np.zeros(n, np.float32)
    np.copyto(dst, src)  # warm: pages faulted in, caches as they will be
    inner = max(1, int(2e6 // max(nbytes, 1)))  # small copies: time a batch of them

    def timer(reps: int) -> list[float]:
        ts = []
        for _ in range(reps):
            t = time.perf_counter()
            for _ in range(inner):
                np.copyto(dst, src)
            ts.append((time.perf_counter() - t) / inner)
        return ts

    return timer


# -- a start barrier that works across threads, spawned processes and Ray tasks ---------
@contextmanager
def barrier_dir():
    d = tempfile.mkdtemp(prefix="jaxps_bench_barrier_")
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def barrier(dirpath: str, index: int, n: int, timeout: float = 600.0) -> None:
    """Marks worker `index` ready and waits until all `n` are (files in `dirpath`: same machine only)."""
    open(os.path.join(dirpath, f"ready.{index}"), "w").close()
    deadline = time.monotonic() + timeout
    while True:
        if all(os.path.exists(os.path.join(dirpath, f"ready.{i}")) for i in range(n)):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"start barrier: not all {n} workers ready after {timeout} s")
        time.sleep(0.0005)


def span(stamps: list[tuple[float, float, int]]) -> tuple[float, float]:
    """(first start, last end) of per-worker `(start, end, updates)` stamps."""
    return min(s for s, _, _ in stamps), max(e for _, e, _ in stamps)


def span_rate(stamps: list[tuple[float, float, int]]) -> tuple[float, float, int]:
    """(updates/s, seconds, updates) from per-worker `(start, end, updates)` stamps."""
    start, end = span(stamps)
    count = sum(c for _, _, c in stamps)
    return count / (end - start), end - start, count


@contextmanager
def cpu_busy(period: float = 0.05):
    """Samples the machine's CPU time counters (Linux `/proc/stat`) every `period` s in a thread.

    Yields `busy(start, end)`: the share of all CPUs' time that was not idle between
    two `time.perf_counter` stamps (None where `/proc/stat` is missing). It tells a
    run that is CPU-bound (near 100%) from one that waits.
    """

    def read() -> tuple[float, int, int] | None:
        try:
            with open("/proc/stat") as f:
                ticks = [int(x) for x in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        return time.perf_counter(), sum(ticks), ticks[3] + ticks[4]  # idle + iowait

    samples = [read()]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(period):
            samples.append(read())

    def busy(start: float, end: float) -> float | None:
        inside = [x for x in samples if x is not None and start <= x[0] <= end]  # nothing from outside the window
        if len(inside) < 2:  # shorter than about two periods
            return None
        (_, total0, idle0), (_, total1, idle1) = inside[0], inside[-1]
        return 1.0 - (idle1 - idle0) / max(1, total1 - total0)

    thread = threading.Thread(target=sample, daemon=True)
    if samples[0] is not None:
        thread.start()
    try:
        yield busy
    finally:
        stop.set()
        if thread.is_alive():
            thread.join()


# -- sessions and failures ----------------------------------------------------------
def server_args(name: str) -> dict:
    """`ParameterServer` keyword arguments for a benchmark transport name.

    Ray: the run's own session is reused by the transport (and not shut down by it).
    """
    if name in DATA_PATHS:
        return {"transport": "ray", "transport_options": {"data_path": DATA_PATHS[name]}}
    return {"transport": name}


def set_worker_path() -> None:
    """Puts the repo root on PYTHONPATH so Ray workers and spawned processes import `benchmarks`."""
    parts = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if REPO not in parts:
        os.environ["PYTHONPATH"] = os.pathsep.join([REPO, *parts])
    if REPO not in sys.path:
        sys.path.insert(0, REPO)


@contextmanager
def session(script: str, transports: str):
    """A benchmark's run: prints its command line with the time, sets the workers' import path, starts Ray if
    one of `transports` (comma-separated) is "ray" (shut down at the end); yields the transports' names."""
    import datetime

    set_worker_path()
    now = datetime.datetime.now(datetime.timezone.utc)
    print(f"{now:%Y-%m-%d %H:%M} UTC: python benchmarks/{script} {' '.join(sys.argv[1:])}".rstrip(), flush=True)
    names = [t.strip() for t in transports.split(",") if t.strip()]
    ray = None
    if "ray" in names:
        import ray

        ray.init(**RAY_INIT, logging_level="warning")
    try:
        yield names
    finally:
        if ray is not None:
            ray.shutdown()


def error_text(e: BaseException) -> str:
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {first}"[:300]


def report_error(what: str, e: BaseException) -> str:
    text = error_text(e)
    log(f"  FAILED {what}: {text}")
    traceback.print_exc(limit=6, file=sys.stdout)
    return text


def shm_segments(prefix: str = "jaxps_") -> set[str]:
    try:
        return {n for n in os.listdir("/dev/shm") if n.startswith(prefix)}
    except OSError:
        return set()


# -- the machine ----------------------------------------------------------------------
def machine_info() -> dict:
    info: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform()}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("Model name", "CPU(s)", "Thread(s) per core", "Hypervisor vendor"):
                info[key.strip()] = value.strip()
    except Exception:
        pass
    info["cores (os.cpu_count)"] = os.cpu_count()
    try:
        with open("/proc/meminfo") as f:
            kb = int(next(l for l in f if l.startswith("MemTotal")).split()[1])
        info["RAM"] = f"{kb / 2**20:.1f} GiB"
    except Exception:
        pass
    try:
        info["/dev/shm"] = f"{shutil.disk_usage('/dev/shm').total / 2**30:.1f} GiB"
    except Exception:
        pass
    versions = {}
    for mod in ("jax", "jaxlib", "flax", "optax", "numpy", "ray", "jaxps"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:
            versions[mod] = "not installed"
    info["versions"] = versions
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "jaxps", "transports"], cwd=REPO, capture_output=True, text=True, timeout=10)
        info["git"] = commit.stdout.strip() + (" + uncommitted changes in jaxps/ or transports/" if dirty.stdout.strip() else "")
    except Exception:
        pass
    try:
        info["load average at start"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        pass
    return info
