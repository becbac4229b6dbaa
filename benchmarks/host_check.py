"""What the host's NaN/Inf check of a push costs, next to the copy it rides on.

    python benchmarks/host_check.py [--mb 20] [--repeats 3]

A push through shared memory or TCP copies each leaf into the push buffer and
checks it on the way (`jaxps.validate.copy_checked`, chunk by chunk while the
chunk is in cache). Times, on float32 and float64 arrays of `--mb` MB, the
median of 60 calls, `--repeats` times:

- copy:               `np.copyto` alone;
- copy_checked:       the copy and the check, as a push runs them;
- host_finite:        the check alone (float32: BLAS's dot product of the array with itself);
- np.sum check:       `isfinite(x.sum())`, the check before (numpy's pairwise sum).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from benchmarks.common import log, median  # noqa: E402
from jaxps.validate import copy_checked, host_finite  # noqa: E402


def _ms(fn, calls: int = 60) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=20.0)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    log(f"command: python benchmarks/host_check.py --mb {args.mb:g} --repeats {args.repeats}")
    log(f"date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} CPUs, numpy {np.__version__}")
    for dtype in (np.float32, np.float64):
        src = np.random.default_rng(0).random(int(args.mb * 1e6) // np.dtype(dtype).itemsize).astype(dtype)
        dst = np.empty_like(src)
        parts = {
            "copy": lambda: np.copyto(dst, src),
            "copy_checked": lambda: copy_checked(dst, src),
            "host_finite": lambda: host_finite(src),
            "np.sum check": lambda: np.isfinite(src.sum()),
        }
        times: dict[str, list[float]] = {name: [] for name in parts}
        for _ in range(args.repeats):
            for name, fn in parts.items():
                times[name].append(_ms(fn))
        log(f"{np.dtype(dtype).name}, {args.mb:g} MB: " + ", ".join(f"{name} {median(t):.2f} ms" for name, t in times.items()))


if __name__ == "__main__":
    main()
