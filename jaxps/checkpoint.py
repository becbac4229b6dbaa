"""Checkpoints keyed by tree path: the format and its files.

A shard's state is a flat mapping from *state paths* to numpy arrays:
``"params" + keystr(path)`` for each of its parameter leaves
(``params['conv']['kernel']``) and ``"opt_state" + keystr(path)`` for each leaf
of its optax state (``opt_state[0].mu['conv']['kernel']``). The optax state of
a shard's view has the key paths of the unsharded state minus the other
shards' leaves, and leaf-wide scalars (Adam's ``count``) on every shard with
the same value. So the union of the shards' mappings is the unsharded
state's mapping, whatever the plan, and a checkpoint restores into any
number of shards: each new shard builds its state structure with
``tx.init`` on its view and fills every leaf by path.

A row leaf's part (`rows=`) and its rows of optax state are stored as
``<state path>@rows<start>:<stop>``: a restore into other row ranges (or a
plan without row leaves) reads its rows from the parts that overlap them.

On disk::

    root/
      jaxps_checkpoints.json     the model's marker: fingerprint and parameter specs (first save)
      <step>/                    one directory per step, named by the step number
        part_<k>/                an orbax checkpoint written by writer k (shard k), alone:
          arrays/                  its arrays under generated names a0, a1, ... (OCDBT)
          index/                   JSON: state path -> [name, shape, dtype]
        jaxps_checkpoint.json    the step's metadata, written last, by the driver

`root` is a local path or a ``gs://bucket/...`` URL (Google Cloud Storage,
through `etils.epath` and gcsfs for files, TensorStore for arrays).

Atomicity: orbax writes each part into a temporary directory and renames it
when complete (on gs://, it marks it complete with a file instead); the
driver writes ``jaxps_checkpoint.json`` (locally: temporary file, fsync,
rename, fsync of the directory; on gs:// one object write, which is atomic)
only once every part is in place. A
step is complete if and only if its metadata file exists: readers ignore
every other step directory, and the driver removes them (a step it is about
to write again, and those older than a step it commits). Retention removes a
step's metadata file first and then its directory, so a crash while removing
leaves an incomplete step, never a corrupt complete one.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import numbers
import os
import re
import shutil
import zlib
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import numpy as np
import optax

from jaxps.plan import Plan, leaf_specs

PARAMS = "params"
OPT_STATE = "opt_state"
ROWS = "@rows"  # a row leaf's part: "<state path>@rows<start>:<stop>"
METADATA = "jaxps_checkpoint.json"
MARKER = "jaxps_checkpoints.json"
FORMAT = "jaxps-checkpoint/1"

Spec = tuple[tuple[int, ...], str]  # (shape, dtype name)

# Parts are written and read in parallel, also in one process (in-process
# shards; a driver reading several parts). orbax's checkpointers share one
# process-wide operation id, which only asynchronous directory creation relies
# on (its "directory created" signals): `_checkpointer` creates directories
# synchronously, and each thread uses a checkpointer of its own.


class CheckpointError(ValueError):
    """A checkpoint that does not fit: another model, a template or optimizer that differs, parts that disagree."""


# -- pure: state <-> path-keyed mapping ----------------------------------------


def spec_of(x: Any) -> Spec:
    """(shape, dtype name) of an array or `jax.ShapeDtypeStruct`."""
    return tuple(int(d) for d in np.shape(x)), np.dtype(x.dtype).name


def describe(spec: Spec | None) -> str:
    return "no such path" if spec is None else f"{spec[0]} {spec[1]}"


def flatten(prefix: str, tree: Any) -> dict[str, Any]:
    """`{prefix + keystr(path): leaf}` for every leaf of `tree`."""
    with_paths, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {prefix + jax.tree_util.keystr(path): leaf for path, leaf in with_paths}


def _structure(plan: Plan, tx: optax.GradientTransformation, shard: int) -> tuple[Any, Any, dict[str, Spec], dict[str, tuple[int, int]]]:
    """Shard `shard`'s view and `tx.init` state as `ShapeDtypeStruct`s (nothing allocated), their specs by
    stored path, and the row ranges of its row parts (`row_ranges`)."""
    view = plan.view(shard, [jax.ShapeDtypeStruct(spec.shape, spec.dtype) for spec in plan.shard_specs(shard)])
    opt_state = jax.eval_shape(tx.init, view)
    ranges = row_ranges(plan, tx, shard, view, opt_state)
    state = {**flatten(PARAMS, view), **flatten(OPT_STATE, opt_state)}
    return view, opt_state, {stored(k, ranges): spec_of(v) for k, v in state.items()}, ranges


def row_ranges(plan: Plan, tx: Any, shard: int, view: Any, opt_state: Any) -> dict[str, tuple[int, int]]:
    """`{state path: (start, stop)}` of shard `shard`'s row parts: its rows of row leaves and of their optax state."""
    ids = plan.shard_leaves[shard]
    ranges = {k: plan.row_range(i, shard) for k, i in enumerate(ids) if plan.is_rows(i)}
    if not ranges:
        return {}
    if tx is None:
        raise ValueError("a shard with row leaves needs its optimizer to name its state's row parts")
    leaves, treedef = jax.tree.flatten(view)
    where = jax.tree.unflatten(treedef, list(range(len(leaves))))
    marks = optax.tree_map_params(tx, lambda _, k: k, opt_state, where, transform_non_params=lambda v: jax.tree.map(lambda _: -1, v))
    out = {p: ranges[k] for p, k in flatten(PARAMS, where).items() if k in ranges}
    out.update({p: ranges[k] for p, k in flatten(OPT_STATE, marks).items() if k in ranges})
    return out


def stored(path: str, ranges: Mapping[str, tuple[int, int]]) -> str:
    """The path a state leaf is stored under: a row part's carries its rows."""
    rows = ranges.get(path)
    return path if rows is None else f"{path}{ROWS}{rows[0]}:{rows[1]}"


def _split_rows(path: str) -> tuple[str, tuple[int, int] | None]:
    base, sep, rows = path.partition(ROWS)
    if not sep:
        return path, None
    start, stop = rows.split(":")
    return base, (int(start), int(stop))


def whole(specs: Mapping[str, Spec]) -> dict[str, Spec]:
    """Specs by state path with row parts joined into their whole leaf (parts that do not tile [0, n) say so)."""
    out: dict[str, Spec] = {}
    parts: dict[str, list] = {}
    for path, spec in specs.items():
        base, rows = _split_rows(path)
        if rows is None:
            out[path] = spec
        else:
            parts.setdefault(base, []).append((rows, spec))
    for base, pieces in parts.items():
        pieces.sort()
        stops = [0] + [stop for (_, stop), _ in pieces]
        rest = {(tuple(s[0][1:]), s[1]) for _, s in pieces}
        tiles = all(start == stops[j] and s[0][0] == stop - start for j, ((start, stop), s) in enumerate(pieces)) and len(rest) == 1
        (trailing, dtype) = next(iter(rest))
        out[base] = ((stops[-1], *trailing), dtype) if tiles else ((-1,), "rows " + ", ".join(f"{a}:{b}" for (a, b), _ in pieces))
    return out


def shard_state(
    plan: Plan, shard: int, params_view: Any, opt_state: Any, reuse: Mapping[str, np.ndarray] | None = None, tx: Any = None
) -> dict[str, np.ndarray]:
    """Shard `shard`'s parameters and optax state as `{state path: numpy copy}`.

    Copies, so the shard's next (donating) step cannot change what is saved:
    into the arrays of `reuse` (an earlier snapshot, written and done with)
    where path, shape and dtype match, else into new ones. Row parts are
    stored under their rows (`tx` names their optax state).
    """
    state = {**flatten(PARAMS, params_view), **flatten(OPT_STATE, opt_state)}
    owned = {PARAMS + plan.leaves[i].path for i in plan.shard_leaves[shard]}
    got = {k for k in state if k.startswith(PARAMS)}
    if got != owned:
        raise CheckpointError(
            f"shard {shard}'s parameter view does not match the plan: missing {sorted(owned - got)}, "
            f"unexpected {sorted(got - owned)}"
        )
    ranges = row_ranges(plan, tx, shard, params_view, opt_state)
    reuse = reuse or {}
    return {stored(k, ranges): _copy(v, reuse.get(stored(k, ranges))) for k, v in state.items()}


def _copy(x: Any, into: np.ndarray | None) -> np.ndarray:
    x = np.asarray(x)
    if into is None or into.shape != x.shape or into.dtype != x.dtype:
        return np.array(x, copy=True)
    np.copyto(into, x)  # pages already mapped: no page faults, unlike a fresh copy
    return into


def expected_state(plan: Plan, tx: optax.GradientTransformation, shard: int) -> dict[str, Spec]:
    """The (stored) state paths shard `shard` of `plan` holds under `tx`, with their specs (no arrays allocated)."""
    return _structure(plan, tx, shard)[2]


def mismatches(saved: Mapping[str, Spec], expected: Mapping[str, Spec], other: str) -> list[str]:
    """One line per path whose spec differs: `path: checkpoint <spec>, <other> <spec>`."""
    lines = []
    for path in sorted(set(saved) | set(expected)):
        a, b = saved.get(path), expected.get(path)
        if a is None or b is None or tuple(a[0]) != tuple(b[0]) or a[1] != b[1]:
            lines.append(f"{path}: checkpoint {describe(a)}, {other} {describe(b)}")
    return lines


def _raise(header: str, lines: list[str], limit: int = 20) -> None:
    if lines:
        more = f"\n  ... and {len(lines) - limit} more" if len(lines) > limit else ""
        raise CheckpointError(header + "\n  " + "\n  ".join(lines[:limit]) + more)


def param_specs(tree_or_plan: Any) -> dict[str, Spec]:
    """`{keystr path: (shape, dtype)}` of a parameter tree or a plan's leaves."""
    specs = tree_or_plan.leaves if isinstance(tree_or_plan, Plan) else leaf_specs(tree_or_plan)[0]
    return {s.path: (tuple(s.shape), np.dtype(s.dtype).name) for s in specs}


def fingerprint(specs: Mapping[str, Spec]) -> str:
    """A hash of the sorted parameter paths, shapes and dtypes: tells one model's directory from another's."""
    text = json.dumps(sorted([p, list(s[0]), s[1]] for p, s in specs.items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def check_template(metadata: Mapping, template: Any, where: str = "the checkpoint") -> None:
    """Raises `CheckpointError` naming every parameter path whose structure, shape or dtype differs."""
    saved = {p: (tuple(s["shape"]), s["dtype"]) for p, s in metadata["params"].items()}
    _raise(f"{where} does not match the template parameters:", mismatches(saved, param_specs(template), "template"))


def check_state(saved: Mapping[str, Spec], plan: Plan, tx: optax.GradientTransformation, where: str = "the checkpoint") -> None:
    """Raises `CheckpointError` unless `saved` holds exactly the paths and specs `plan`'s shards need under `tx`."""
    expected: dict[str, Spec] = {}
    for shard in range(plan.num_shards):
        expected.update(expected_state(plan, tx, shard))
    _raise(f"{where} does not match the parameters and tx.init of the optimizer:", mismatches(whole(saved), whole(expected), "expected"))


def restore_shard(plan: Plan, tx: optax.GradientTransformation, shard: int, state: Mapping[str, Any]) -> tuple[list[np.ndarray], Any]:
    """Shard `shard`'s `(leaves, opt_state)` from a path-keyed mapping (extra paths are ignored).

    The optax state has the structure of `tx.init` on the shard's view, every
    leaf taken from `state` by path. Arrays are returned as they come (numpy):
    the shard copies them onto its device.
    """
    _, structure, expected, ranges = _structure(plan, tx, shard)
    _raise(
        f"the checkpoint does not hold shard {shard}'s state:",
        mismatches({k: spec_of(state[k]) for k in expected if k in state}, expected, "expected"),
    )
    leaves = [state[stored(PARAMS + plan.leaves[i].path, ranges)] for i in plan.shard_leaves[shard]]
    opt_state = jax.tree_util.tree_map_with_path(lambda p, _: state[stored(OPT_STATE + jax.tree_util.keystr(p), ranges)], structure)
    return leaves, opt_state


def restore_shards(plan: Plan, tx: optax.GradientTransformation, state: Mapping[str, Any]) -> list[tuple[list[np.ndarray], Any]]:
    """Every shard's `(leaves, opt_state)` of `plan`, after checking that `state` holds exactly what they need."""
    check_state({k: spec_of(v) for k, v in state.items()}, plan, tx)
    return [restore_shard(plan, tx, s, state) for s in range(plan.num_shards)]


# -- files ---------------------------------------------------------------------


def _checkpointer():
    import orbax.checkpoint as ocp  # imported on first use: importing it takes a second or more

    th = ocp.type_handlers
    # a writer's arrays are its own snapshot, never changed while written: no defensive copy
    # (orbax's default deep-copies every numpy array before writing it)
    registry = th.create_type_handler_registry(
        *[(t, th.ScalarHandler()) for t in (int, float, bytes, np.number)],
        (np.ndarray, th.NumpyHandler(deepcopy_host_arrays=False)),
        (jax.Array, th.ArrayHandler()),  # never written here; without one orbax warns on every read
    )
    handler = ocp.CompositeCheckpointHandler(
        # float state hardly compresses: speed first
        arrays=ocp.PyTreeCheckpointHandler(use_compression=False, type_handler_registry=registry),
        index=ocp.JsonCheckpointHandler(),
        # synchronous: safe to run alongside another save in this process (see the note at the top)
        composite_options=ocp.CompositeOptions(async_options=ocp.options.AsyncOptions(create_directories_asynchronously=False)),
    )
    return ocp, ocp.Checkpointer(handler)


def side_by_side(fn: Callable[..., Any], *args: Sequence[Any]) -> list[Any]:
    """`[fn(*a) for a in zip(*args)]`, on up to 8 threads (on this one for a single call); the first error, in
    order, is raised."""
    calls = list(zip(*args))
    if len(calls) <= 1:
        return [fn(*a) for a in calls]
    with concurrent.futures.ThreadPoolExecutor(min(len(calls), 8), thread_name_prefix="jaxps-checkpoint-io") as pool:
        return list(pool.map(fn, *args))


def _per_part(read_part: Callable[[Any, Any, str], Any], parts: Sequence[str]) -> dict[str, Any]:
    """`{part: read_part(ocp, checkpointer, part)}`, the parts read side by side, each with a checkpointer of its own."""

    def one(part: str) -> Any:
        ocp, checkpointer = _checkpointer()
        try:
            return read_part(ocp, checkpointer, part)
        finally:
            checkpointer.close()

    return dict(zip(parts, side_by_side(one, parts)))


def _read_json(path: Any, what: str) -> Any:
    """The JSON in `path`; a `CheckpointError` naming `what` and the file if it is damaged."""
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:  # (JSONDecodeError is a ValueError)
        raise CheckpointError(f"{what}: {path} is damaged ({type(e).__name__}: {e})") from e


def _write_json(path: Any, obj: Any) -> None:
    """Atomically: a temporary file, fsync, rename, fsync of the directory (on gs://: one object write)."""
    if _remote(path):
        path.write_text(json.dumps(obj, indent=1))
        return
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(path: Any) -> None:
    if _remote(path):
        return  # an object store has no directories to make durable
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _step_dirs(root: Any) -> dict[int, Any]:
    return {int(p.name): p for p in root.iterdir() if p.name.isdigit() and p.is_dir()} if root.is_dir() else {}


URLS = ("gs://",)  # the URLs a checkpoint directory may be, besides a local path


def location(directory: Any) -> Any:
    """`directory` as a path object: an absolute `pathlib.Path`, or an `etils.epath.Path` for a gs:// URL.

    A relative local path is relative to this process's working directory: the
    driver resolves it here, at every entry point, and sends the shards (whose
    working directory may differ, and orbax needs absolute paths) the result.
    Other URLs are refused; gs:// needs gcsfs (`pip install "jaxps[gcs]"`).
    """
    text = os.fspath(directory) if isinstance(directory, os.PathLike) else str(directory)
    if "://" not in text:
        if re.match(r"[A-Za-z][A-Za-z0-9+.-]+:/", text):
            raise ValueError(f"checkpoint directory {text!r} looks like a URL that lost a '/' (a pathlib.Path of a URL?): give it as a string")
        return Path(text).absolute()
    if not text.startswith(URLS):
        raise ValueError(
            f"checkpoint directory {text!r}: of URLs only {', '.join(URLS)} is supported; or give a path that the "
            "driver and every shard's node see (a shared disk, a mounted bucket)"
        )
    try:
        import fsspec
        import gcsfs  # noqa: F401  (etils.epath reaches Google Cloud Storage through it)
    except ImportError:
        raise ImportError(f"checkpoint directory {text!r} needs gcsfs: pip install \"jaxps[gcs]\"") from None
    from etils import epath

    os.environ.setdefault("EPATH_USE_TF", "false")  # gs:// through gcsfs (as tested), not TensorFlow's gfile
    for protocol in ("gs", "gcs"):  # the shards write parts from their own processes: list afresh, never from a cache
        fsspec.config.conf.setdefault(protocol, {}).setdefault("use_listings_cache", False)

    return epath.Path(text)


def _remote(path: Any) -> bool:
    return "://" in os.fspath(path)


def _part_written(path: Any) -> bool:
    """Whether orbax has finished part `path`: renamed into place, or on gs:// (written in place) marked so."""
    return (path / "commit_success.txt").is_file() if _remote(path) else path.is_dir()


def _rmtree(path: Any) -> None:
    if _remote(path):
        path.rmtree(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def steps(directory: str | os.PathLike) -> list[int]:
    """The complete steps in `directory`, oldest first (none for a missing directory)."""
    return sorted(s for s, p in _step_dirs(location(directory)).items() if (p / METADATA).is_file())


def _remove_step(path: Any) -> None:
    (path / METADATA).unlink(missing_ok=True)  # first: the step is incomplete from here on
    _rmtree(path)


def check_directory(directory: str | os.PathLike, plan: Plan) -> bool:
    """Whether `directory` holds this model's checkpoints (False: absent or empty, so free to claim).

    Raises `CheckpointError` if it holds another model's (naming the paths that
    differ) or other files.
    """
    root = location(directory)
    marker = root / MARKER
    if marker.is_file():
        saved = _read_json(marker, f"{root} cannot be checked as this model's checkpoint directory")
        specs = param_specs(plan)
        if saved.get("fingerprint") != fingerprint(specs):
            lines = mismatches({p: (tuple(s["shape"]), s["dtype"]) for p, s in saved["params"].items()}, specs, "this model")
            _raise(f"{root} holds checkpoints of another model; refusing to save there:", lines or ["(fingerprints differ)"])
        return True
    if root.exists() and any(not p.name.startswith(MARKER + ".tmp-") for p in root.iterdir()):
        raise CheckpointError(f"{root} is not empty and holds no jaxps checkpoints ({MARKER} is missing); refusing to save there")
    return False


def prepare(directory: str | os.PathLike, step: int, plan: Plan, replace: bool = False) -> None:
    """Driver, before any part of `step` is written: claims or checks the directory, clears a stale `step`.

    Refuses a directory holding another model's checkpoints (or other files),
    and a `step` that is already complete there, unless `replace` (then it is
    removed, metadata first).
    """
    root = location(directory)
    specs = param_specs(plan)
    marker = root / MARKER
    if not check_directory(root, plan):
        root.mkdir(parents=True, exist_ok=True)
        _write_json(marker, {"format": FORMAT, "fingerprint": fingerprint(specs), "params": _specs_json(specs)})
    path = root / str(step)
    if (path / METADATA).is_file() and not replace:
        raise CheckpointError(f"step {step} already exists in {root} (complete steps: {steps(root)})")
    if path.exists():
        _remove_step(path)  # left by a save that did not finish (or replaced)
    path.mkdir(exist_ok=_remote(path))  # (on gs://, a directory is there once it holds an object)


def write_part(directory: str | os.PathLike, step: int, part: int, state: Mapping[str, np.ndarray]) -> None:
    """Writer `part` (shard `part`), alone: writes its path-keyed `state` as `<directory>/<step>/part_<part>`.

    Atomic by orbax (temporary directory, then rename; on gs://, a commit file written last). The step is
    not complete until `commit`.
    """
    ocp, checkpointer = _checkpointer()
    names = {path: f"a{i}" for i, path in enumerate(sorted(state))}
    arrays = {names[p]: np.asarray(x) for p, x in state.items()}
    index = {p: [names[p], list(np.shape(x)), np.dtype(x.dtype).name, checksum(arrays[names[p]])] for p, x in state.items()}
    target = location(directory) / str(step) / f"part_{part}"
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        checkpointer.save(target, ocp.args.Composite(arrays=ocp.args.PyTreeSave(arrays), index=ocp.args.JsonSave(index)))
    finally:
        checkpointer.close()


def checksum(x: np.ndarray) -> int:
    """CRC-32 of an array's bytes (~4 GB/s): written in its part's index, checked when it is read back, since
    the array store itself keeps none (a zeroed data file would read back as zeros)."""
    return zlib.crc32(np.ascontiguousarray(x).reshape(-1).view(np.uint8))


def _specs_json(specs: Mapping[str, Spec]) -> dict:
    return {p: {"shape": list(s[0]), "dtype": s[1]} for p, s in specs.items()}


def commit(
    directory: str | os.PathLike,
    step: int,
    plan: Plan,
    *,
    mode: str | None = None,
    keep: int | None = None,
    extra: Mapping | None = None,
) -> dict:
    """Driver, once every shard of `plan` has written its part: makes `step` complete, then applies retention.

    Writes the metadata last and atomically, then applies retention (`retain`). Returns the metadata.
    """
    from jaxps import __version__

    check_keep(keep)
    root = location(directory)
    path = root / str(step)
    missing = [f"part_{k}" for k in range(plan.num_shards) if not _part_written(path / f"part_{k}")]
    if missing:
        raise CheckpointError(f"cannot commit step {step} in {root}: parts {missing} have not been written")
    _fsync_dir(path)  # the parts' renames are durable before the metadata names them
    specs = param_specs(plan)
    metadata = {
        "format": FORMAT,
        "step": int(step),
        "mode": mode,
        "num_shards": plan.num_shards,
        "parts": [f"part_{k}" for k in range(plan.num_shards)],
        "plan": plan.paths,
        "rows": plan.rows,
        "params": _specs_json(specs),
        "fingerprint": fingerprint(specs),
        "jaxps_version": __version__,
        **({"extra": dict(extra)} if extra else {}),
    }
    _write_json(path / METADATA, metadata)
    retain(root, step, keep)
    return metadata


def check_keep(keep: Any, what: str = "keep") -> None:
    if keep is not None and (isinstance(keep, bool) or not isinstance(keep, numbers.Integral) or keep < 1):
        raise ValueError(f"{what} must be a positive int or None, got {keep!r}")


def retain(directory: str | os.PathLike, step: int, keep: int | None) -> None:
    """Retention after saving `step`: removes the incomplete steps before it, and the complete ones up to it beyond
    the `keep` newest (so never `step` itself). Complete steps after `step` (saved before an older step was
    restored) are left alone: they are not this line of training's to count, nor to remove."""
    root = location(directory)
    complete = steps(root)
    upto = [s for s in complete if s <= step]
    for s, p in _step_dirs(root).items():
        if (s < step and s not in complete) or (keep is not None and s in upto[:-keep]):
            _remove_step(p)


def read_metadata(directory: str | os.PathLike, step: int | None = None) -> dict:
    """The metadata of `step` (default: the latest complete step) in `directory`."""
    root = location(directory)
    if not root.is_dir():
        raise FileNotFoundError(f"checkpoint directory {root} " + ("is a file" if root.exists() else "does not exist"))
    complete = steps(root)
    if not complete:
        raise FileNotFoundError(f"{root} holds no complete checkpoint")
    if step is not None and (isinstance(step, bool) or not isinstance(step, numbers.Integral)):
        raise TypeError(f"step must be an int (a complete step of {root}: {complete}) or None for the latest, got {step!r}")
    step = complete[-1] if step is None else int(step)
    if step not in complete:
        raise FileNotFoundError(f"{root} has no complete checkpoint for step {step}; complete steps: {complete}")
    others = [s for s in complete if s != step]
    metadata = _read_json(root / str(step) / METADATA, f"step {step} in {root} cannot be read (other complete steps: {others})")
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"step {step} in {root} has format {metadata.get('format')!r}; this jaxps reads {FORMAT!r}")
    return metadata


def read_index(directory: str | os.PathLike, metadata: Mapping) -> dict[str, list[tuple[str, str, Spec, int | None]]]:
    """`{state path: [(part, array name, spec, checksum), ...]}` of a complete step: where each path is stored
    (checksum None: a checkpoint written before jaxps kept them)."""
    step_dir = location(directory) / str(metadata["step"])

    def read_part_index(ocp, checkpointer, part: str) -> dict:
        try:
            return checkpointer.restore(step_dir / part, ocp.args.Composite(index=ocp.args.JsonRestore()))["index"]
        except Exception as e:
            raise CheckpointError(f"step {metadata['step']} in {directory}: the index of {part} cannot be read ({type(e).__name__}: {e})") from e

    indexes = _per_part(read_part_index, metadata["parts"])
    where: dict[str, list[tuple[str, str, Spec, int | None]]] = {}
    for part in metadata["parts"]:
        for p, (name, shape, dtype, *crc) in indexes[part].items():
            where.setdefault(p, []).append((part, name, (tuple(shape), dtype), crc[0] if crc else None))
    lines = [
        f"{p}: " + ", ".join(f"{part} {describe(s)}" for part, _, s, _ in places)
        for p, places in where.items()
        if len({s for _, _, s, _ in places}) > 1
    ]
    _raise(f"step {metadata['step']} in {directory}: parts disagree on", lines)
    return where


def read(
    directory: str | os.PathLike,
    step: int | None = None,
    paths: Iterable[str] | None = None,
    *,
    check_replicated: bool = True,
    index: Mapping[str, list] | None = None,
) -> tuple[dict, dict[str, np.ndarray]]:
    """`(metadata, {state path: array})` of `step` (default: latest complete), for `paths` (default: all).

    Reads only the parts holding the requested paths. A path stored by
    several parts (a replicated scalar such as Adam's count) is read from each
    and must agree bit for bit; `check_replicated=False` reads it from the
    first part only (for a shard whose driver has checked them). `index`: the
    step's `read_index`, if the caller has it (a driver hands it to its N shards:
    N reads of every part's index instead of N x N, each an object read on gs://).
    """
    metadata = read_metadata(directory, step)
    where = dict(index) if index is not None else read_index(directory, metadata)
    wanted = sorted(where) if paths is None else list(paths)
    pieces = {p: [(p, None)] if p in where else _row_pieces(p, where) for p in wanted}
    absent = [p for p in wanted if pieces[p] is None]
    if absent:
        raise CheckpointError(f"step {metadata['step']} in {directory} does not hold {absent[:10]}")
    needed = list(dict.fromkeys(k for p in wanted for k, _ in pieces[p]))
    per_part: dict[str, list[str]] = {}
    for k in needed:
        where[k] = where[k] if check_replicated else where[k][:1]
        for part, name, *_ in where[k]:
            per_part.setdefault(part, []).append(name)
    step_dir = location(directory) / str(metadata["step"])

    def read_part(ocp, checkpointer, part: str) -> dict[str, np.ndarray]:
        names = per_part[part]
        item = {n: 0 for n in names}
        restore_args = {n: ocp.RestoreArgs(restore_type=np.ndarray) for n in names}
        return checkpointer.restore(
            step_dir / part, ocp.args.Composite(arrays=ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True))
        )["arrays"]

    arrays = _per_part(read_part, list(per_part))
    found = {}
    for k in needed:
        values = [(part, arrays[part][name]) for part, name, *_ in where[k]]
        for (part, value), (*_, crc) in zip(values, where[k]):
            if crc is not None and checksum(value) != crc:
                raise CheckpointError(
                    f"step {metadata['step']} in {directory}: {k} in {part} is damaged: its bytes do not match the "
                    f"checksum saved with them (other complete steps: {[s for s in steps(directory) if s != metadata['step']]})"
                )
        first = values[0][1]
        differ = [part for part, v in values[1:] if np.asarray(v).tobytes() != np.asarray(first).tobytes()]
        if differ:
            raise CheckpointError(
                f"{k}: saved by several shards with different values: "
                + ", ".join(f"{part} {np.asarray(v).ravel()[:4]}" for part, v in values)
            )
        found[k] = first
    state = {}
    for p in wanted:
        (k, rows), *more = pieces[p]
        if not more and rows is None:
            state[p] = found[k]
        else:  # rows gathered from the parts that hold them
            state[p] = np.concatenate([np.asarray(found[k])[rows] for k, rows in pieces[p]])
    return metadata, state


def _row_pieces(path: str, where: Mapping[str, list]) -> list[tuple[str, slice]] | None:
    """Where the rows of `path` (a row part, or a whole leaf stored in row parts) are: `(stored path, rows)`,
    in order; None if they are not all there."""
    base, rows = _split_rows(path)
    held = []  # (start, stop, stored path) of each part holding rows of `base`
    for k, places in where.items():
        b, r = _split_rows(k)
        if b == base:
            shape = places[0][2][0]
            if not shape:
                return None
            held.append((*(r or (0, shape[0])), k))
    if not held:
        return None
    held.sort()
    start, stop = rows or (0, max(b for _, b, _ in held))
    out, at = [], start
    for a, b, k in held:
        if b > at and a <= at < stop:
            out.append((k, slice(at - a, min(b, stop) - a)))
            at = min(b, stop)
    return out if at == stop else None


def save(
    directory: str | os.PathLike,
    step: int,
    plan: Plan,
    states: Sequence[Mapping[str, np.ndarray]],
    *,
    mode: str | None = None,
    keep: int | None = None,
    extra: Mapping | None = None,
) -> dict:
    """All of a checkpoint from one process: `prepare`, each shard's `write_part` (in parallel), `commit`."""
    if len(states) != plan.num_shards:
        raise ValueError(f"one state per shard: the plan has {plan.num_shards} shards, got {len(states)} states")
    prepare(directory, step, plan)
    side_by_side(lambda k, state: write_part(directory, step, k, state), range(len(states)), states)
    return commit(directory, step, plan, mode=mode, keep=keep, extra=extra)


def restore(
    directory: str | os.PathLike, params: Any, tx: optax.GradientTransformation, plan: Plan, step: int | None = None
) -> tuple[dict, list[tuple[list[np.ndarray], Any]]]:
    """`(metadata, [(leaves, opt_state) per shard of plan])` from `step` (default: latest complete), from one process.

    `params` is the template: structure, shapes and dtypes must match the checkpoint's.
    """
    metadata = read_metadata(directory, step)
    where = f"step {metadata['step']} in {directory}"
    check_template(metadata, params, where)
    index = read_index(directory, metadata)  # checked before any array is read
    check_state({p: places[0][2] for p, places in index.items()}, plan, tx, where)
    _, state = read(directory, metadata["step"])
    return metadata, [restore_shard(plan, tx, s, state) for s in range(plan.num_shards)]
