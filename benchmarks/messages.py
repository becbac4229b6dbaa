"""A shard's message with large arrays (a standby's `Mirror`), sent and received over a local socket.

    python benchmarks/messages.py [--mb 50] [--repeats 7]

`jaxps.transports.wire.send` / `recv` through a `multiprocessing.Pipe` (a Unix
socket pair, as between a primary and its standby), a writer thread and the
reader in this process: a `Mirror` of one step whose mean gradients are two
arrays of `--mb` MB in all, float32 and bfloat16. Reports the median time of a
send + receive (the first, warm-up, left out).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402
from multiprocessing import Pipe  # noqa: E402

from jaxps.service import Mirror  # noqa: E402
from jaxps.transports import wire  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=50.0)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    for dtype in (np.dtype(np.float32), np.dtype(ml_dtypes.bfloat16)):
        n = int(args.mb * 1e6 / dtype.itemsize / 2)
        message = Mirror(steps=(([np.ones(n, dtype), np.ones(n, dtype)], 1),), clock=1, answered=())
        ours, theirs = Pipe()
        times = []
        for _ in range(args.repeats + 1):
            start = time.perf_counter()
            writer = threading.Thread(target=wire.send, args=(ours, message))
            writer.start()
            got = wire.recv(theirs)
            writer.join()
            times.append(time.perf_counter() - start)
            assert all(np.array_equal(a, b) for a, b in zip(got.steps[0][0], message.steps[0][0]))
        ours.close(), theirs.close()
        print(f"[messages] Mirror of {args.mb:g} MB {dtype.name:>8}: send + receive {statistics.median(times[1:]) * 1e3:7.1f} ms "
              f"(median of {args.repeats})", flush=True)


if __name__ == "__main__":
    main()
