"""Turns the results dict into markdown tables and PNG plots."""

from __future__ import annotations

import os
from typing import Any

from benchmarks.common import TRANSPORTS, fmt_bytes

GOALS = {
    "ray_vs_seed_10M": ("jaxps over Ray (defaults: shared memory on the shard's node) vs the seed, updates/s at D = 10M", 2.0, ">="),
    "mp_100MB_fraction": ("multiprocessing push+pull of 100 MB (1 leaf), fraction of memcpy bandwidth", 0.5, ">="),
    "inprocess_overhead": ("in-process training overhead over the plain optax loop (default: NaN/Inf check per push)", 0.10, "<="),
    "inprocess_overhead_unchecked": ("the same, with `nonfinite=\"allow\"` (no check, like the plain loop)", 0.10, "<="),
}


def goals(results: dict) -> dict:
    out: dict[str, Any] = {}
    seed = results.get("seed", {})
    for r in seed.get("rows", []):
        if r["system"] == "jaxps/ray" and r["dim"] == 10_000_000 and "ratio_to_seed" in r:
            out["ray_vs_seed_10M"] = r["ratio_to_seed"]
    for r in results.get("bandwidth", {}).get("rows", []):
        if r["transport"] == "multiprocessing" and r["bytes"] == 100_000_000 and r["leaves"] == 1 and "fraction_of_memcpy" in r:
            out["mp_100MB_fraction"] = r["fraction_of_memcpy"]
    for key, field in (("inprocess_overhead", "overhead"), ("inprocess_overhead_unchecked", "overhead_unchecked")):
        if field in results.get("overhead", {}):
            out[key] = results["overhead"][field]
    return {
        k: {"what": GOALS[k][0], "target": GOALS[k][1], "value": v, "met": v >= GOALS[k][1] if GOALS[k][2] == ">=" else v <= GOALS[k][1]}
        for k, v in out.items()
    }


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%" if x < 10 else f"{100 * x:,.0f}%"


def _fmt_goal(key: str, v: float) -> str:
    if key == "ray_vs_seed_10M":
        return f"{v:.2f}x"
    if key.startswith("inprocess_overhead"):
        return f"{100 * v:+.1f}%"
    return _pct(v)


def _transports_in(rows) -> list[str]:
    seen = [r["transport"] for r in rows]
    return [t for t in TRANSPORTS if t in seen] + sorted({t for t in seen if t not in TRANSPORTS})


def _grid(by: dict, rows: list, row_keys, col_keys, cell) -> list[str]:
    """Markdown lines `| transport | row key | cells |`, one per transport and row key: `cell(r)` of the
    result `by[(transport, row key, column key)]`, "failed" if it failed, empty if it was not measured."""
    out = []
    for tr in _transports_in(rows):
        for k in row_keys:
            cells = [
                "" if r is None else "failed" if "error" in r else cell(r)
                for r in (by.get((tr, k, c)) for c in col_keys)
            ]
            out.append(f"| {tr} | {k} | " + " | ".join(cells) + " |")
    return out


def render_tables(results: dict) -> str:
    """The result tables (markdown), one section per benchmark that ran."""
    out: list[str] = []
    g = results.get("goals") or goals(results)
    if g:
        out += ["### Goals", "", "| goal | target | measured | |", "|---|---|---|---|"]
        for k, v in g.items():
            op = GOALS[k][2].replace(">=", "≥").replace("<=", "≤")
            target = _fmt_goal(k, v["target"]) if not k.startswith("inprocess_overhead") else f"{100 * v['target']:.0f}%"
            out.append(f"| {v['what']} | {op} {target} | {_fmt_goal(k, v['value'])} | {'met' if v['met'] else '**missed**'} |")
        out.append("")

    bw = results.get("bandwidth")
    if bw:
        rows = bw["rows"]
        sizes = bw["sizes"]
        memcpy = bw["memcpy_GBps"]
        head = "| transport | leaves | " + " | ".join(fmt_bytes(s) for s in sizes) + " |"
        sep = "|---|---|" + "---|" * len(sizes)
        out += [
            "### 1. Bandwidth: push+pull round trip",
            "",
            "Bandwidth = 2 × tree size / median round-trip time, in GB/s, and (in brackets) as a fraction of the "
            "single-core memcpy bandwidth (`np.copyto`, warm) of a same-size buffer, timed right before and right after "
            "that transport's round trips (the *memcpy* row: the median of all of them). "
            "Server: 1 shard, `optax.sgd(1e-3)`. Up to a few MB the memcpy runs in cache, so small trees show "
            "latency, not bandwidth (see the round-trip times below).",
            "",
            head,
            sep,
            "| *memcpy* | | " + " | ".join(f"{memcpy[str(s)]:.2f}" for s in sizes) + " |",
        ]
        by = {(r["transport"], r["leaves"], r["bytes"]): r for r in rows}
        layouts = sorted({r["leaves"] for r in rows})
        out += _grid(by, rows, layouts, sizes, lambda r: f"{r['GBps']:.3g} ({_pct(r['fraction_of_memcpy'])})")
        out += ["", "Median round-trip time (ms):", "", head, sep]
        out += _grid(by, rows, layouts, sizes, lambda r: f"{1e3 * r['round_trip_s']:.3g}")
        out.append("")

    seed = results.get("seed")
    if seed:
        out += [
            "### 2. Against the seed's sharded numpy Ray parameter server",
            "",
            f"{seed['workers']} workers, {seed['shards']} shards, float32 D elements, each worker "
            f"{seed['warmup']} warm-up + K timed pull→push rounds; median of {seed['repeats']} alternating runs. "
            "CPUs busy: the share of all CPUs' time not idle during the timed rounds (`/proc/stat`), median over runs; "
            "near 100% means the run is CPU-bound.",
            "",
            "| D | K | system | updates/s (median) | all runs | jaxps / seed | CPUs busy |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in seed["rows"]:
            runs = ", ".join(f"{x:.0f}" for x in r.get("updates_per_s_all", []))
            rate = f"{r['updates_per_s']:.1f}" if "updates_per_s" in r else "failed"
            ratio = "" if r["system"] == "seed" or "ratio_to_seed" not in r else f"**{r['ratio_to_seed']:.2f}x**"
            load = _pct(r["cpu_busy"]) if "cpu_busy" in r else ""
            out.append(f"| {r['dim']:,} | {r['rounds']} | {r['system']} | {rate} | {runs} | {ratio} | {load} |")
        out.append("")

    ov = results.get("overhead")
    if ov:
        out += ["### 3. Training overhead (in-process, 1 worker)", ""]
        if "error" in ov:
            out += [f"failed: {ov['error']}", ""]
        else:
            out += [
                f"{ov['source']}; {ov['params']:,} parameters, batch {ov['batch']}, {ov['optimizer']}, "
                f"{ov['repeats']} alternating blocks of {ov['steps_per_block']} steps.",
                "",
                "| loop | steps/s (median) | all blocks |",
                "|---|---|---|",
                f"| plain jit optax | {ov['plain_steps_per_s']:.2f} | {', '.join(f'{x:.1f}' for x in ov['plain_all'])} |",
            ]
            if "split_all" in ov:
                out.append(
                    f"| plain optax split in two jits (grad, update) | {ov['split_steps_per_s']:.2f} | "
                    f"{', '.join(f'{x:.1f}' for x in ov['split_all'])} |"
                )
            out += [
                f"| through jaxps (inprocess) | {ov['jaxps_steps_per_s']:.2f} | {', '.join(f'{x:.1f}' for x in ov['jaxps_all'])} |",
            ]
            if "overhead_unchecked" in ov:
                out.append(
                    f"| through jaxps, `nonfinite=\"allow\"` | {ov['jaxps_unchecked_steps_per_s']:.2f} | "
                    f"{', '.join(f'{x:.1f}' for x in ov['jaxps_unchecked_all'])} |"
                )
            out += [
                "",
                f"Overhead (median over repeats of plain/jaxps − 1): **{100 * ov['overhead']:+.1f}%** "
                f"(repeats: {', '.join(f'{100 * x:+.1f}%' for x in ov['overhead_all'])}).",
            ]
            if "overhead_split" in ov:
                out.append(
                    f"Plain optax split in two jits, as a parameter server must (the worker computes the gradient, the server "
                    f"updates): **{100 * ov['overhead_split']:+.1f}%** (repeats: {', '.join(f'{100 * x:+.1f}%' for x in ov['overhead_split_all'])})."
                )
            if "overhead_unchecked" in ov:
                out.append(
                    f"With `nonfinite=\"allow\"`: **{100 * ov['overhead_unchecked']:+.1f}%** "
                    f"(repeats: {', '.join(f'{100 * x:+.1f}%' for x in ov['overhead_unchecked_all'])})."
                )
            out.append("")

    sc = results.get("scaling")
    if sc:
        rows = sc["rows"]
        workers = sorted({r["workers"] for r in rows})
        out += [
            "### 4. Scaling: updates/s by workers and shards",
            "",
            f"Tree: {sc['tree']}; async mode; `optax.sgd`; synthetic gradients; {sc['seconds']} s timed per point.",
            "",
            "| transport | shards | " + " | ".join(f"{w} worker{'s' if w > 1 else ''}" for w in workers) + " |",
            "|---|---|" + "---|" * len(workers),
        ]
        by = {(r["transport"], r["shards"], r["workers"]): r for r in rows}
        out += _grid(by, rows, sorted({r["shards"] for r in rows}), workers, lambda r: f"{r['updates_per_s']:.1f}")
        out.append("")

    errors = [e for k in ("bandwidth", "seed", "overhead", "scaling") for e in results.get(k, {}).get("errors", [])]
    if errors:
        out += ["### Failures", ""] + [f"- {e}" for e in errors] + [""]
    return "\n".join(out)


def render_machine(results: dict) -> str:
    m = results.get("machine", {})
    lines = ["| | |", "|---|---|"]
    for k, v in m.items():
        if k == "versions":
            v = ", ".join(f"{a} {b}" for a, b in v.items())
        lines.append(f"| {k} | {v} |")
    return "\n".join(lines)


def plot(results: dict, out_dir: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    bw = results.get("bandwidth")
    if bw:
        rows = [r for r in bw["rows"] if "error" not in r]
        layouts = sorted({r["leaves"] for r in bw["rows"]}) or [1]
        fig, axes = plt.subplots(1, len(layouts), figsize=(6 * len(layouts), 4.5), sharey=True, squeeze=False)
        sizes = bw["sizes"]
        for ax, leaves in zip(axes[0], layouts):
            ax.plot(sizes, [bw["memcpy_GBps"][str(s)] for s in sizes], "k--", marker="x", label="memcpy (1 core, np.copyto)")
            for tr in _transports_in(bw["rows"]):
                pts = sorted((r["bytes"], r["GBps"]) for r in rows if r["transport"] == tr and r["leaves"] == leaves)
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=tr)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("tree size (bytes)")
            ax.set_title(f"push+pull round trip, {leaves} leaf" if leaves == 1 else f"push+pull round trip, {leaves} leaves")
            ax.grid(alpha=0.3, which="both")
        axes[0][0].set_ylabel("GB/s  (2 × tree size / round-trip time)")
        axes[0][0].legend(loc="lower right", fontsize=8)
        fig.tight_layout()
        path = os.path.join(out_dir, "bandwidth.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    sc = results.get("scaling")
    if sc and len({r["workers"] for r in sc["rows"]}) > 1:
        rows = [r for r in sc["rows"] if "error" not in r]
        fig, ax = plt.subplots(figsize=(6.5, 4.5))
        styles = ["-", "--", ":", "-."]
        for c, tr in enumerate(_transports_in(sc["rows"])):
            for k, s in enumerate(sorted({r["shards"] for r in rows})):
                pts = sorted((r["workers"], r["updates_per_s"]) for r in rows if r["transport"] == tr and r["shards"] == s)
                if pts:
                    ax.plot(*zip(*pts), marker="o", color=f"C{c}", linestyle=styles[k % 4], label=f"{tr}, {s} shard{'s' if s > 1 else ''}")
        ax.set_xlabel("workers")
        ax.set_ylabel("updates/s")
        ax.set_yscale("log")
        ax.set_xticks(sorted({r["workers"] for r in rows}))
        ax.set_title(f"async updates/s, {sc['tree']}")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        path = os.path.join(out_dir, "scaling.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths
