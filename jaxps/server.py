"""`ParameterServer`: the user-facing handle that ties plan, shards, transport and clients."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import os
import threading
import time
from typing import Any, Callable, Sequence

import jax
import optax

from jaxps import checkpoint as ckpt
from jaxps import coding
from jaxps import rows as rows_lib
from jaxps.client import Client, gather, remaining
from jaxps.consistency import make_policy
from jaxps.errors import ServerClosedError, ShardDiedError
from jaxps.failover import FAILURE_MODES, Supervisor
from jaxps.filters import PushFilter
from jaxps.plan import Assign, Plan, make_plan
from jaxps.registry import make_transport
from jaxps.resharding import move
from jaxps.saving import Checkpointing, Saver, id_of, release
from jaxps.service import Hold, Join, Lead, Moved, Pull, Stats
from jaxps.shard import ShardConfig
from jaxps.update import check_shardable
from jaxps.validate import NONFINITE

RECOVERY_TIMEOUT = 300.0  # seconds a client waits for a dead shard to be restarted
from jaxps.value_leaves import ValueTransform, with_values


class ParameterServer:
    """Keeps a parameter tree in shards, serves it to workers and applies their gradients.

    Args:
      params: the initial parameter tree (any pytree of arrays: flax variables,
        an nnx `State`, nested dicts/lists/tuples/NamedTuples).
      tx: the optax transformation each shard applies to its leaves.
      shards: how many shards to split the leaves into.
      transport: "inprocess" ("inproc"), "multiprocessing" ("mp"), "ray",
        "module:Class", or a transport object.
      mode: "async", "sync" or "ssp".
      workers: the number of workers (needed by "sync" and "ssp").
      backup_workers: sync only: apply a step once `workers - backup_workers`
        gradients are in; later ones for that step are dropped. Every shard
        takes the same workers' gradients for a step (shard 0 decides).
      max_staleness: ssp only: how many pushes a worker may run ahead of the
        slowest before its pull waits.
      assign: `assign(path_str, leaf) -> shard index`; default: balance bytes.
      nonfinite: "raise" (default) rejects pushes with NaN/Inf; "skip" drops them;
        "allow" applies them unchecked, as a plain optax loop would (no device
        sync per push: faster when the host would otherwise wait for the gradients).
      transport_options: keyword arguments for a transport given by name
        (e.g. Ray's `address`, `num_cpus`, `num_gpus`, `resources`).
      checkpoint: `jaxps.Checkpointing(directory, every=N, keep=K)`: save every
        N steps in the background, keeping the K latest.
      on_shard_failure: "raise" (default): a dead shard ends the run with
        `ShardDiedError`; "restart" (needs `checkpoint`): it is restarted and
        every shard rolls back to the latest checkpoint (`jaxps.failover`).
      replicas: 1 keeps a hot standby of every shard (multiprocessing, Ray),
        fed the primary's every step: a shard that dies is taken over by its
        standby with no step lost, and a new standby starts behind it
        (`jaxps.replication`). 0 (default): none.
      rows: leaves to split by rows (axis 0) over all shards, as tree paths
        (or path prefixes; a bare name is a top-level key) or `fn(path, leaf)
        -> bool`: embedding tables. `client.pull(rows=...)` and
        `client.push(grads, rows=...)` then move only the rows a batch
        touches, and a row push updates only those rows (`jaxps.rows`).
      push_filter: what of each pushed gradient crosses to the shards
        (`jaxps.filters`: `precision`, `top_k`, `significant`, `chain`, or
        your own `PushFilter`); each client keeps its own filter state.
        Value leaves cross unfiltered.
      values: leaves that workers push values for, not gradients (BatchNorm
        statistics): tree paths or path prefixes (`"batch_stats"`,
        `"['bn']['mean']"`) or `fn(path, leaf) -> bool`. A step sets them to
        the mean of its pushes' values in sync mode, to a running mean over
        `workers` pushes otherwise (see `jaxps.values`).
    """

    def __init__(
        self,
        params: Any,
        tx: optax.GradientTransformation,
        *,
        shards: int = 1,
        transport: Any = "inprocess",
        mode: str = "async",
        workers: int | None = None,
        backup_workers: int = 0,
        max_staleness: int | None = None,
        assign: Assign | None = None,
        nonfinite: str = "raise",
        transport_options: dict | None = None,
        checkpoint: Checkpointing | None = None,
        values: Any = None,
        on_shard_failure: str = "raise",
        push_filter: PushFilter | None = None,
        rows: Any = None,
        replicas: int = 0,
        _restore: tuple[str, dict] | None = None,  # (directory, metadata): from `ParameterServer.restore`
    ):
        make_policy(mode, workers, backup_workers, max_staleness)  # checks the arguments
        if on_shard_failure not in FAILURE_MODES:
            raise ValueError(f"unknown on_shard_failure={on_shard_failure!r}; valid: {', '.join(FAILURE_MODES)}")
        if on_shard_failure == "restart" and checkpoint is None:
            raise ValueError("on_shard_failure='restart' restarts shards from checkpoints: give checkpoint=jaxps.Checkpointing(...)")
        if nonfinite not in NONFINITE:
            raise ValueError(f"unknown nonfinite={nonfinite!r}; valid: {', '.join(NONFINITE)}")
        if replicas not in (0, 1):
            raise ValueError(f"replicas={replicas!r}: 0 (no standby) or 1 (a hot standby of every shard)")
        if not (callable(getattr(tx, "init", None)) and callable(getattr(tx, "update", None))):
            raise TypeError(f"tx must be an optax.GradientTransformation (e.g. optax.adam(1e-3)), got {type(tx).__name__}: {tx!r:.80}")
        tx = with_values(tx, values, params, mode, workers)
        self._plan = make_plan(params, shards, assign, rows)
        leaves = jax.tree_util.tree_leaves(params)
        if self._plan.row_leaves:  # (first: what they name is more precise than the step check's finding)
            if push_filter is not None:
                raise ValueError("push_filter= together with row leaves (rows=) is not supported yet")
            for s, ids in enumerate(self._plan.shard_leaves):
                view = self._plan.view(s, [jax.ShapeDtypeStruct(spec.shape, spec.dtype) for spec in self._plan.shard_specs(s)])
                rows_lib.check_lazy(tx, view, [k for k, i in enumerate(ids) if self._plan.is_rows(i)])
        check_shardable(tx, self._plan, leaves)
        filtered = None
        if push_filter is not None:
            is_value = tx.is_value if isinstance(tx, ValueTransform) else (lambda path, leaf: False)
            filtered = tuple(not is_value(spec.path, leaf) for spec, leaf in zip(self._plan.leaves, leaves))
            coding.check(push_filter, self._plan, filtered)
        self._filter = None if push_filter is None else (push_filter, filtered)
        self._replicas = replicas
        self._mode = mode
        # backup workers on several shards: shard 0 decides each step's workers, the others follow
        self._backup_workers = backup_workers
        if replicas:
            refusal = self._replicas_refusal(transport)
            if refusal is not None:
                raise ValueError(refusal)
        restore = None if _restore is None else _check_restore(*_restore, self._plan, tx)
        if checkpoint is not None:
            ckpt.check_directory(checkpoint.directory, self._plan)  # another model's directory: refused now
        self._transport = make_transport(transport, transport_options)
        self._transport_spec = (transport, transport_options)  # a reshard starts another of the same kind
        self._retired: list[tuple[Any, list]] = []  # (transport, channels) of the plans resharded away from
        self._generation = 0  # plans resharded to
        self._switch = threading.Lock()  # `_plan` and `_channels` change together (a reshard)
        if on_shard_failure == "restart" or replicas:
            if not hasattr(self._transport, "expect_restarts"):
                asked = "replicas=1" if replicas else "on_shard_failure='restart'"
                raise ValueError(f"{asked}: the {type(self._transport).__name__} cannot restart shards")
            if replicas and not hasattr(self._transport, "start_standby"):
                raise ValueError(f"replicas=1: the {type(self._transport).__name__} cannot start standbys (multiprocessing and ray can)")
            self._transport.expect_restarts(RECOVERY_TIMEOUT, **({"standby": True} if replicas else {}))
        self._workers = workers
        self._nonfinite = nonfinite
        self._clients: dict[int, Client] = {}
        self._finished: set[int] = set()  # workers an earlier `run_workers` let leave
        self._running: set[int] = set()  # workers a `run_workers` call is running now
        self._running_lock = threading.Lock()
        self._closed = False
        agree = self._leads(self._plan)
        parts = self._plan.split(leaves)

        def config(s: int, plan: Plan) -> ShardConfig:
            """Shard `s`'s config under `plan`, without its leaves."""
            follows = self._leads(plan) and s > 0
            return ShardConfig(s, plan, [], tx, mode, workers, backup_workers, max_staleness, restore, follows, push_filter, filtered)

        self._config = config
        configs = [dataclasses.replace(config(s, self._plan), leaves=parts[s]) for s in range(self._plan.num_shards)]
        try:
            self._channels = self._transport.start(configs)
            if agree:
                self._channels[0].call(Lead(tuple(self._channels[1:])))
        except BaseException:
            self._transport.close()
            raise
        self._saver = Saver(self._plan, self._channels, mode, 0 if restore is None else restore[1])
        if restore is not None:
            self._saver.started_from(*restore[:3], id_of(_restore[1]))  # (the metadata the restore read)
        self._supervisor: Supervisor | None = None
        if on_shard_failure == "restart" or replicas:
            self._start_supervisor(configs, checkpoint if on_shard_failure == "restart" else None, restore, agree)
        if checkpoint is not None:
            self._saver.every(checkpoint, lambda: self.step)

    @classmethod
    def restore(
        cls, directory: str | os.PathLike, params: Any, tx: optax.GradientTransformation, *, step: int | None = None, **kwargs
    ) -> "ParameterServer":
        """A server (the constructor's keyword arguments) from the latest checkpoint in `directory`, or `step`.

        `params` is the template: its paths, shapes and dtypes must be the
        checkpoint's, and `tx.init`'s state on each new shard must match the
        saved one (errors name the paths and both sides). Any number of shards,
        any transport; each shard reads its own part of the files. `ps.step`
        is the saved step.
        """
        metadata = ckpt.read_metadata(directory, step)
        ckpt.check_template(metadata, params, f"step {metadata['step']} in {directory}")
        return cls(params, tx, _restore=(str(ckpt.location(directory)), metadata), **kwargs)  # absolute: the shards read it

    # -- the public contract ----------------------------------------------------
    @property
    def plan(self) -> Plan:
        """Which shard holds each tree path (`plan.paths`), and `plan.bytes_per_shard`."""
        return self._plan

    def client(self, worker: int) -> Client:
        """Worker `worker`'s client (one per worker; picklable on multiprocessing and Ray).

        A worker that has left (`client.leave()`, or the end of `run_workers`)
        gets a new client, and takes part again from the current step.
        """
        self._check_open()
        if not isinstance(worker, int) or worker < 0 or (self._workers is not None and worker >= self._workers):
            bound = f"[0, {self._workers})" if self._workers is not None else ">= 0"
            raise ValueError(f"worker index must be an int in {bound}, got {worker!r}")
        if worker in self._running:
            raise ValueError(f"worker {worker} is running in run_workers, with the client run_workers gave it")
        if worker not in self._clients or self._has_left(worker):
            self._clients[worker] = self._new_clients([worker])[0]
        return self._clients[worker]

    def pull(self, timeout: float | None = None) -> Any:
        """Worker 0's pull."""
        return self.client(0).pull(timeout)

    def push(self, grads: Any):
        """Worker 0's push; returns a future."""
        return self.client(0).push(grads)

    def params(self, timeout: float | None = None) -> Any:
        """The parameters after every push whose future has completed (never waits on a clock)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            self._check_open()
            with self._switch:
                plan, channels = self._plan, self._channels
            replies = gather([ch.submit(Pull(None), timeout=remaining(deadline)) for ch in channels], remaining(deadline))
            if not any(isinstance(r, (Moved, str)) for r in replies):
                return plan.merge([leaves for _, leaves in replies])
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"the parameters were not read within {timeout} s (a reshard or a take-over was under way)")
            time.sleep(0.01)  # a reshard in progress (its new shards, once it has switched to them), or a standby taking over

    @property
    def step(self) -> int:
        """Optimizer updates applied (on every shard)."""
        return min(s["steps"] for s in self._shard_stats())

    def stats(self) -> dict:
        """Steps, pushes applied/dropped/skipped, gradient staleness and bytes moved, in total and per shard."""
        shards = self._shard_stats()
        for i, channel in (self._transport.standbys if self._replicas else {}).items():
            try:  # where it lives, for operators (and tests) to find it
                shards[i]["standby"] = channel.call(Stats(), timeout=60)["where"]
            except Exception:  # noqa: BLE001  (gone: the supervisor replaces it)
                shards[i]["standby"] = None
        count = sum(s["staleness_count"] for s in shards)
        recoveries = {} if self._supervisor is None else self._supervisor.recoveries.stats()
        return {
            **recoveries,
            "pushes_rolled_back": max(s["pushes_rolled_back"] for s in shards),
            "steps": min(s["steps"] for s in shards),
            # a push counts as applied once every shard has applied it
            "pushes_applied": min(s["pushes_applied"] for s in shards),
            "pushes_dropped": max(s["pushes_dropped"] for s in shards),
            "pushes_skipped": max(s["pushes_skipped"] for s in shards),
            # non-finite pushes refused after the shards took them (checked on the device: `Client.push`)
            "pushes_refused": max(s["pushes_refused"] for s in shards),
            "staleness_mean": sum(s["staleness_mean"] * s["staleness_count"] for s in shards) / count if count else 0.0,
            "staleness_max": max(s["staleness_max"] for s in shards),
            # array bytes that crossed between clients and shards (since each shard started)
            "bytes_pushed": sum(s["bytes_pushed"] for s in shards),
            "bytes_pulled": sum(s["bytes_pulled"] for s in shards),
            "shards": shards,
        }

    def save(self, directory: str | os.PathLike, *, wait: bool = True, keep: int | None = None):
        """Saves every shard's parameters and optimizer state into `directory`; returns the step once durable.

        A consistent cut: every push is in every shard's part or in none (sync:
        between two steps). Training goes on while the parts are written.
        `wait=False` returns a future whose `.result()` is the step. `keep`:
        how many of the latest checkpoints to keep (None: all). Saves run one
        at a time, in order.
        """
        self._check_open()
        future = self._saver.save(directory, keep)
        return future.result() if wait else future

    def reshard(
        self,
        shards: int,
        *,
        assign: Assign | None = None,
        directory: str | os.PathLike | None = None,
        transport_options: dict | None = None,
    ) -> Plan:
        """Moves every leaf and its optimizer state onto a new plan of `shards` shards, while the server runs.

        Workers go on by themselves: pushes and pulls pause while the state moves,
        and those the old shards did not take are sent again to the new ones.
        Nothing is lost or applied twice, and training goes on as if the server had
        had the new plan all along (`jaxps.resharding`). Returns the new plan.

        `assign` as for the constructor. The state crosses through a checkpoint
        in `directory` (default: a temporary directory on this machine, removed
        afterwards; on a Ray cluster give one every node reads, e.g. `gs://...`).
        `transport_options`: the new shards' (default: the server's), e.g. Ray
        `resources` that place them on nodes just added to the cluster.
        The old shards stay up, holding no arrays, to redirect clients that have
        not called since, until `close()`.
        """
        self._check_open()
        refusal = self._reshard_refusal()
        if refusal is not None:
            raise ValueError(refusal)
        if directory is not None:
            ckpt.check_directory(ckpt.location(directory), self._plan)  # another model's directory: refused now
        params = self.params()
        plan = make_plan(params, shards, assign)
        leaves = jax.tree_util.tree_leaves(params)
        check_shardable(self._config(0, plan).tx, plan, leaves)
        spec = (self._transport_spec[0], self._transport_spec[1] if transport_options is None else transport_options)
        transport = make_transport(*spec)
        try:  # while training goes on: the slow part (processes, compiling); their state comes at the cut
            if self._supervisor is not None:
                transport.expect_restarts(RECOVERY_TIMEOUT)
            parts = plan.split(leaves)
            del params, leaves
            channels = transport.start([dataclasses.replace(self._config(s, plan), leaves=parts[s], restore=None) for s in range(plan.num_shards)])
            del parts
            if self._leads(plan):
                channels[0].call(Lead(tuple(channels[1:])))

            def moved() -> list:
                with self._saver.holding:  # no worker joins meanwhile (nor saves: this is the saver's thread)
                    handing_over = move(self._saver, self._channels, plan, channels, self._generation + 1, None if directory is None else str(directory))
                    with self._switch:  # the old shards send clients here now, come what may
                        self._retired.append((self._transport, self._channels))
                        self._plan, self._channels, self._transport, self._transport_spec = plan, channels, transport, spec
                        self._generation += 1
                    if self._supervisor is not None:  # watches the new shards from now on
                        configs = [self._config(s, plan) for s in range(plan.num_shards)]
                        self._supervisor.moved_to(transport, channels, configs, self._leads(plan))
                return handing_over

            job = self._saver.submit(moved)
            try:
                handing_over = job.result()
            except BaseException:
                concurrent.futures.wait([job])  # (Ctrl-C) the new shards are closed only if it did not switch to them
                raise
        except BaseException:
            if self._transport is not transport:
                transport.close()
            raise
        failed = [f"shard {i}: {type(e).__name__}: {e}" for i, e in handing_over if e is not None]
        if failed:
            raise RuntimeError(f"resharded to {plan}, but old shards did not hand over (their clients fail): {'; '.join(failed)}")
        return plan

    def run_workers(self, fn: Callable[[Client, Any], Any], args: Sequence[Any]) -> list:
        """Runs `fn(client_i, args[i])` for each i on the transport's own execution
        units (threads, spawned processes, Ray tasks) and returns their results.

        Each worker leaves the server when its function returns (or its process
        dies), so sync steps and ssp pulls do not wait for a finished worker. Each
        call starts its workers afresh, so it can be called again (e.g. train,
        evaluate, train on), with the same semantics every time.
        """
        self._check_open()
        args = list(args)
        if self._workers is not None and len(args) > self._workers:
            raise ValueError(f"{len(args)} worker arguments for a server of workers={self._workers}")
        if self._mode in ("sync", "ssp") and len(args) != self._workers:
            raise ValueError(
                f"mode={self._mode!r} with workers={self._workers} needs one argument per worker, got {len(args)}: "
                f"steps would wait forever for workers {list(range(len(args), self._workers))}"
            )
        workers = list(range(len(args)))
        with self._running_lock:
            if self._running & set(workers):
                raise ValueError(f"workers {sorted(self._running & set(workers))} are running in another run_workers call")
            self._running.update(workers)
        try:
            clients = self._new_clients(workers)
            try:
                return self._transport.run_workers(fn, clients, args)
            except ShardDiedError as e:  # a worker process saw the shards stop as the server closed
                if self._closed:
                    raise ServerClosedError("the ParameterServer was closed while run_workers ran its workers") from e
                raise
            finally:
                self._finished.update(workers)
        finally:
            with self._running_lock:
                self._running.difference_update(workers)

    def close(self) -> None:
        """Stops the shards and frees their resources. Idempotent."""
        if not self._closed:
            self._closed = True
            if self._supervisor is not None:  # first: the shards' ends are no deaths
                self._supervisor.close()
            self._saver.close()  # a checkpoint in flight completes first
            retired = [transport for transport, _ in self._retired]
            for channel in [c for _, channels in self._retired for c in channels] + self._channels:
                channel.close()  # clients taken from this server now fail at once
            for transport in retired + [self._transport]:
                transport.close()

    def __enter__(self) -> "ParameterServer":
        self._check_open()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{type(self._transport).__name__}"
        return f"ParameterServer({self._plan!r}, {state})"

    # -- internals ---------------------------------------------------------------
    def _replicas_refusal(self, transport: Any) -> str | None:
        """Why this server cannot keep standbys (None: it can)."""
        if self._filter is not None or self._plan.row_leaves:
            return "replicas=1 with a push_filter or row leaves (rows=) is not supported yet"
        if self._leads(self._plan):
            return "replicas=1 with backup workers on several shards is not supported yet"
        if transport in ("inprocess", "inproc"):
            return "replicas=1: in-process shards live and die with this process; use transport='multiprocessing' or 'ray'"
        return None

    def _reshard_refusal(self) -> str | None:
        """Why `reshard` cannot move this server (None: it can)."""
        if self._replicas:
            return "reshard of a server with replicas=1 is not supported yet"
        if self._filter is not None or self._plan.row_leaves:
            return "reshard of a server with a push_filter or row leaves (rows=) is not supported yet"
        if not isinstance(self._transport_spec[0], str):
            return "reshard starts the new shards on a transport of the same kind: give the transport by name"
        return None

    def _keeps_pushes(self) -> bool:
        """Whether clients keep each push until answered, to send it again (after a reshard or a standby's take-over)."""
        return self._filter is None and not self._plan.row_leaves and (self._replicas > 0 or self._reshard_refusal() is None)

    def _leads(self, plan: Plan) -> bool:
        """Backup workers on several shards: shard 0 decides each step's workers, the others follow."""
        return self._mode == "sync" and self._backup_workers > 0 and plan.num_shards > 1

    def _start_supervisor(self, configs: list, checkpoint: Checkpointing | None, restore, leads: bool) -> None:
        """Fail-over: a first checkpoint of its own now if it was not restored from that directory, the standbys,
        then the watch (which goes back only to this server's own steps there: never to another line's)."""
        try:
            if checkpoint is not None and not self._saver.own_steps(checkpoint.directory):
                self.save(checkpoint.directory, keep=checkpoint.keep)
            directory = None if checkpoint is None else str(checkpoint.directory)
            self._supervisor = Supervisor(
                self._transport, self._channels, configs, directory, self._saver.run,
                version=0 if restore is None else restore[2], leads=leads, replicas=self._replicas,
                own_steps=None if directory is None else functools.partial(self._saver.own_steps, directory),
            )
            for s in range(len(configs)) if self._replicas else ():
                self._saver.run(functools.partial(self._supervisor.start_standby, s, quiet=True))
            self._saver.restart_from = lambda: self._supervisor.recoveries.last_rollback
        except BaseException:
            self.close()
            raise

    def _shard_stats(self) -> list[dict]:
        self._check_open()
        return gather([ch.submit(Stats()) for ch in self._channels])

    def _has_left(self, worker: int) -> bool:
        """Whether `worker` has left: after `run_workers`, through its client here, or (its client sent to
        another process) there, as the shards know."""
        client = self._clients.get(worker)
        if worker in self._finished or (client is not None and client.left):
            return True
        return client is not None and client.sent_away and worker in self._channels[0].call(Stats())["workers_left"]

    def _new_clients(self, workers: list[int]) -> list[Client]:
        """Fresh clients for `workers`, (re)joined on every shard first, so all start from the current step.

        Joining also restarts ssp's push counts for them together; in sync mode
        every shard counts them from the same step (`join_at_one_step`).
        """
        with self._saver.holding:  # not while a save or a reshard holds the shards for its cut (nor switches them)
            plan, channels, generation = self._plan, self._channels, self._generation
            if self._mode == "sync":
                firsts = join_at_one_step(channels, workers)
            else:
                firsts = gather([ch.submit(Join(tuple(workers))) for ch in channels])
        versions = [[per_shard[k] for per_shard in firsts] for k in range(len(workers))]
        self._finished.difference_update(workers)
        for w in workers:  # a cached client of theirs would not know about the join: it is done
            old = self._clients.pop(w, None)
            if old is not None:
                old.replaced = True
        return [
            Client(
                w, plan, channels, self._nonfinite, v, self._mode == "sync", self._encoder(), generation, self._keeps_pushes(),
                self._replicas > 0,
            )
            for w, v in zip(workers, versions)
        ]

    def _encoder(self) -> coding.Encoder | None:
        """A new client's side of the push filter, with a fresh state."""
        return None if self._filter is None else coding.Encoder(self._filter[0], self._plan, self._filter[1])

    def _check_open(self) -> None:
        if self._closed:
            raise ServerClosedError("the ParameterServer is closed")


def join_at_one_step(channels: Sequence[Any], workers: Sequence[int]) -> list[list[int]]:
    """Sync: `workers` join every shard at one step, so that each step waits for the same workers everywhere.

    Every shard is held (closes no further step) and answers the first step
    the workers could join at there (its version, or the step after one's last
    push); every shard then counts them from the latest of those (shards behind
    close the steps before it without them), and the hold ends. Answers, per
    shard, each worker's first step.
    """
    try:
        firsts = gather([ch.submit(Hold(tuple(workers))) for ch in channels])
        return gather([ch.submit(Join(tuple(workers), max(firsts))) for ch in channels])
    except BaseException:
        release(channels)
        raise


def _check_restore(directory: str, metadata: dict, plan: Plan, tx: optax.GradientTransformation) -> tuple[str, int, int, dict]:
    """Checks that `plan`'s shards find their state under `tx` in the checkpoint, before any array is read;
    returns the shards' `ShardConfig.restore`."""
    step = metadata["step"]
    where = f"step {step} in {directory}"
    index = ckpt.read_index(directory, metadata)
    ckpt.check_state({p: places[0][2] for p, places in index.items()}, plan, tx, where)
    ckpt.read(directory, step, [p for p, places in index.items() if len(places) > 1], index=index)  # replicated scalars agree
    return directory, step, metadata.get("extra", {}).get("version", step), index
