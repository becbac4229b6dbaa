"""Progress for the examples' training runs: a bar of server updates, and tests of the parameters as they go."""

from __future__ import annotations

import threading
import time
from typing import Callable


class Monitor:
    """A driver thread that shows progress and tests `ps.params()` every `every` server updates.

    `test(params) -> {metric: value}` scores the parameters; `show(metrics) -> str` says them in a line.
    With `start`, it also tests them on entering the `with` block (where the curve starts). On leaving
    it stops, notes the wall time and tests the final parameters. `record(step=, time=, **metrics)`
    keeps each test and returns the entry.
    """

    def __init__(self, ps, test: Callable, show: Callable, every, total, record, label, start: bool = False):
        from tqdm import tqdm

        self.ps, self.test, self.show, self.every, self.record, self.start = ps, test, show, every, record, start
        self.bar = tqdm(total=total, unit="update", desc=label, dynamic_ncols=True, disable=None)
        self.last = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="jaxps-example-monitor", daemon=True)

    def __enter__(self):
        self.t0 = time.perf_counter()
        if self.start and self.every:
            self.evaluate()
        self._thread.start()
        return self

    def __exit__(self, exc_type, *exc):
        self.wall = time.perf_counter() - self.t0
        self._stop.set()
        self._thread.join()
        if exc_type is None:
            self.bar.update(self.ps.step - self.bar.n)
            if self.last is None or self.last["step"] != self.ps.step:
                self.evaluate()  # the final parameters
        self.bar.close()

    def evaluate(self):
        t, step, params = time.perf_counter() - self.t0, self.ps.step, self.ps.params()
        metrics = self.test(params)
        self.last = self.record(step=step, time=t, **metrics)
        self.bar.set_postfix_str(self.show(metrics))
        self.bar.write(f"  step {step:5d}  {t:7.1f}s  {self.show(metrics)}")

    def _run(self):
        next_eval = (self.ps.step // self.every + 1) * self.every if self.every else 0
        while not self._stop.wait(0.25):
            step = self.ps.step
            self.bar.update(step - self.bar.n)
            if self.every and step >= next_eval:
                self.evaluate()
                next_eval = (step // self.every + 1) * self.every
