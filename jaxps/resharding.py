"""Live resharding: `ps.reshard(shards=k)` moves every leaf and its optimizer state onto a new plan while
the server runs.

The new plan's shards are started first, on a new transport of the same kind,
while training goes on (a process or actor start, compiling the step: the
slow part). Then, on the checkpoint thread, with workers' joins held off:

1. every old shard goes to one cut, as for a checkpoint, and stays there
   (`snapshots(..., freeze=True)`): pushes beyond it wait (sync: no step at or
   beyond it closes), and so do pulls (a worker computes no more gradients) and leaves;
2. the snapshots are written as a checkpoint (path-keyed: any plan reads it);
3. each new shard reads its part of it and takes the old shards' clock
   (`RollBack(..., clock=Clock.moved())`: the same workers, counts and epoch);
4. `Move(route)` to every old shard: what waits there, and every later push,
   pull or leave, is answered `Moved(route)`, and its client follows the route
   (`Client.follow`), sending its pushes that were answered so again, in order.

At the cut a push is applied by every old shard or answered `Moved` by every
one, so nothing is lost or applied twice. If a step before `Move` fails, the
old shards go on from where they stopped (and the caller closes the new ones).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

from jaxps import checkpoint
from jaxps.client import gather
from jaxps.plan import Plan
from jaxps.saving import Saver, release, snapshots
from jaxps.service import Move, RollBack, Route

MOVE_TIMEOUT = 60.0  # seconds the old shards take to hand over (they answer at once)
LOAD_TIMEOUT = 600.0  # seconds the new shards may take to read their parts


def move(
    saver: Saver, channels: Sequence[Any], plan: Plan, new_channels: Sequence[Any], generation: int, directory: str | None = None
) -> list[tuple[int, BaseException | None]]:
    """Moves the state of the shards behind `channels` into the started shards of `plan` behind `new_channels`
    (see the module's docstring; call with `saver.holding`). Raises, with nothing changed, if that fails;
    else every old shard has been told `Move(Route(generation, plan, new_channels))`: from then on the new
    shards are the server's, whatever happens. Returns each old shard's index and error (None: it answers
    `Moved` now).

    The state crosses through `directory` (default: a temporary directory, removed once read).
    """
    infos = snapshots(channels, freeze=True)
    step, version, clock = infos[0]["step"], infos[0]["version"], infos[0]["clock"]
    root = None
    try:
        root = Path(tempfile.mkdtemp(prefix="jaxps-reshard-")) if directory is None else checkpoint.location(directory)
        if directory is not None and saver.holds(root, step, version):  # (already there: rewriting it would first remove it)
            saver.drop(channels, step)
        else:
            saver.write(root, step, version, keep=None)
        index = checkpoint.read_index(root, checkpoint.read_metadata(root, step))  # once, for all new shards
        try:
            gather([ch.submit(RollBack(str(root), step, version, clock, index)) for ch in new_channels], LOAD_TIMEOUT)
        except Exception as e:
            where = "a temporary directory on the driver's machine" if directory is None else str(root)
            raise RuntimeError(
                f"the new shards could not read the state written to {where} ({type(e).__name__}: {e}); "
                "shards on other machines need reshard(directory=...) that every node reads"
            ) from e
    except BaseException:
        release(channels)
        raise
    finally:
        if directory is None and root is not None:
            shutil.rmtree(root, ignore_errors=True)
    saver.moved_to(plan, new_channels)
    route, handing_over = Route(generation, plan, tuple(new_channels)), []
    for i, ch in enumerate(channels):
        try:
            handing_over.append((i, ch.submit(Move(route))))
        except Exception as e:  # noqa: BLE001  (that shard is gone: its clients hear it from their channels)
            handing_over.append((i, e))
    deadline = time.monotonic() + MOVE_TIMEOUT
    return [(i, w if isinstance(w, BaseException) else _error_of(w, deadline)) for i, w in handing_over]


def _error_of(wait: Any, deadline: float) -> BaseException | None:
    try:
        wait.result(max(0.0, deadline - time.monotonic()))
    except Exception as e:  # noqa: BLE001
        return e
    return None
