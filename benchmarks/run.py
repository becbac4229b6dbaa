"""Runs the jaxps benchmarks and writes a markdown table, JSON and PNG plots.

    python benchmarks/run.py                       # everything, 8-10 minutes on 2 cores
    python benchmarks/run.py --quick               # about a minute; a smoke run into a temporary folder
    python benchmarks/run.py --only bandwidth,seed --out /tmp/bench

Benchmarks: bandwidth (push+pull round trip vs memcpy), seed (vs the seed's
numpy Ray parameter server), overhead (training through jaxps vs a plain optax
loop), scaling (updates/s by workers and shards). Results go to
`<out>/results.md`, `<out>/results.json`, `<out>/bandwidth.png` and
`<out>/scaling.png`; a full run with the default `--out` also rewrites
`benchmarks/BENCHMARKS.md`. Exits 1 if any measurement failed (the tables
say which).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("RAY_DEDUP_LOGS", "1")

HERE = os.path.dirname(os.path.abspath(__file__))
# the repo root first, for `import benchmarks`; not benchmarks/ itself, where `python benchmarks/run.py` puts it
sys.path[:] = [os.path.dirname(HERE)] + [p for p in sys.path if os.path.abspath(p or ".") != HERE]

from benchmarks import bandwidth, overhead, report, scaling, seed_ps  # noqa: E402
from benchmarks.common import RAY_INIT, TRANSPORTS, error_text, log, machine_info, set_worker_path, shm_segments  # noqa: E402

BENCHMARKS = ("bandwidth", "seed", "overhead", "scaling")
DEFAULT_OUT = os.path.join(HERE, "results")
BENCHMARKS_MD = os.path.join(HERE, "BENCHMARKS.md")
FINDINGS_MD = os.path.join(HERE, "findings.md")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes and few repeats: a smoke run of about a minute")
    p.add_argument("--only", default=",".join(BENCHMARKS), help=f"comma-separated subset of {','.join(BENCHMARKS)}")
    p.add_argument(
        "--out", default=None,
        help="folder for results.md, results.json and the plots (default: benchmarks/results; with --quick, a new temporary folder)",
    )
    p.add_argument("--transports", default=",".join(TRANSPORTS), help="comma-separated subset of " + ",".join(TRANSPORTS))
    p.add_argument(
        "--benchmarks-md", default=None,
        help="also write this BENCHMARKS.md (default: benchmarks/BENCHMARKS.md on a full, non-quick run into the default --out)",
    )
    p.add_argument("--render-only", action="store_true", help="rewrite the tables, plots and BENCHMARKS.md from <out>/results.json; measure nothing")
    args = p.parse_args(argv)
    if args.out is None:  # a smoke run's numbers never land in the committed results
        args.out = tempfile.mkdtemp(prefix="jaxps-bench-quick-") if args.quick else DEFAULT_OUT
    args.only = [b.strip() for b in args.only.split(",") if b.strip()]
    bad = [b for b in args.only if b not in BENCHMARKS]
    if bad:
        p.error(f"unknown benchmark(s) {bad}; choose from {', '.join(BENCHMARKS)}")
    args.transports = [t.strip() for t in args.transports.split(",") if t.strip()]
    bad = [t for t in args.transports if t not in TRANSPORTS]
    if bad:
        p.error(f"unknown transport(s) {bad}; choose from {', '.join(TRANSPORTS)}")
    return args


def command_line(args) -> str:
    return "python benchmarks/run.py" + "".join(f" {a}" for a in sys.argv[1:])


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.render_only:
        with open(os.path.join(args.out, "results.json")) as f:
            results = json.load(f)
        write_outputs(args, results, quick=results.get("quick", False), full=all(b in results for b in BENCHMARKS))
        return 0
    set_worker_path()
    started = time.perf_counter()
    shm_before = shm_segments()
    os.makedirs(args.out, exist_ok=True)
    json_path = os.path.join(args.out, "results.json")
    results: dict = {}
    if set(args.only) != set(BENCHMARKS) and os.path.exists(json_path):
        with open(json_path) as f:  # a partial run updates the earlier results
            results = json.load(f)
    results.update(machine=machine_info(), quick=args.quick, command=command_line(args))
    log(f"jaxps benchmarks ({'quick' if args.quick else 'full'}): {', '.join(args.only)}; transports {', '.join(args.transports)}")

    transports = list(args.transports)
    ray = None
    if any(t.startswith("ray") for t in transports) or "seed" in args.only:
        try:
            import ray

            ray.init(**RAY_INIT, logging_level="warning")
            log(f"ray session started: {RAY_INIT}")
        except Exception as e:
            log(f"ray unavailable ({error_text(e)}): skipping the ray transport and the seed comparison")
            ray = None
            transports = [t for t in transports if not t.startswith("ray")]
    failed = []
    try:
        for name in args.only:
            t = time.perf_counter()
            log(f"== {name} ==")
            try:
                if name == "bandwidth":
                    results[name] = bandwidth.run(args.quick, transports)
                elif name == "seed":
                    if ray is None:
                        raise RuntimeError("needs Ray")
                    results[name] = seed_ps.run(args.quick, transports)
                elif name == "overhead":
                    results[name] = overhead.run(args.quick)
                elif name == "scaling":
                    results[name] = scaling.run(args.quick, transports)
            except Exception as e:
                text = error_text(e)
                log(f"  FAILED {name}: {text}")
                import traceback

                traceback.print_exc()
                results[name] = {"error": text, "errors": [f"{name}: {text}"]}
            failed += results[name].get("errors", [])
            results[name]["wall_s"] = time.perf_counter() - t
            log(f"== {name}: {results[name]['wall_s']:.1f} s ==")
    finally:
        if ray is not None and ray.is_initialized():
            ray.shutdown()
            log("ray session shut down")

    wall = time.perf_counter() - started
    results["wall_s"] = wall
    results["goals"] = report.goals(results)
    leaked_procs = multiprocessing.active_children()
    leaked_shm = sorted(shm_segments() - shm_before)
    if leaked_procs or leaked_shm:
        log(f"WARNING: left behind: processes {leaked_procs}, /dev/shm segments {leaked_shm} (segments may be other runs')")
    results["left_behind"] = {"processes": [str(p) for p in leaked_procs], "shm": leaked_shm}

    with open(json_path, "w") as f:
        json.dump(results, f, indent=1, default=str)
    write_outputs(args, results, quick=args.quick, full=set(args.only) == set(BENCHMARKS))
    for goal in results["goals"].values():
        log(f"goal: {goal['what']}: {goal['value']:.3g} (target {goal['target']}) -> {'met' if goal['met'] else 'MISSED'}")
    log(f"total wall time {wall:.1f} s; {len(failed)} failed measurement(s)")
    return 1 if failed else 0


def write_outputs(args, results: dict, quick: bool, full: bool) -> None:
    """results.md and the plots into `args.out`; BENCHMARKS.md after a full run into the default folder."""
    pngs = report.plot(results, args.out)
    tables = report.render_tables(results)
    md = [
        f"# jaxps benchmark results{' (quick smoke run: not measurements)' if quick else ''}",
        "",
        f"Command: `{results['command']}` — wall time {results['wall_s']:.0f} s.",
        "",
        report.render_machine(results),
        "",
        tables,
    ]
    md += [f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in pngs]
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    bench_md = args.benchmarks_md
    if bench_md is None and not quick and full and os.path.abspath(args.out) == DEFAULT_OUT:
        bench_md = BENCHMARKS_MD
    if bench_md:
        write_benchmarks_md(bench_md, results, tables, pngs)
        log(f"wrote {bench_md}")
    log(f"wrote {os.path.join(args.out, 'results.json')}, {os.path.join(args.out, 'results.md')}, {', '.join(pngs)}")


def write_benchmarks_md(path: str, results: dict, tables: str, pngs: list[str]) -> None:
    where = os.path.dirname(os.path.abspath(path))
    method = {
        "Bandwidth": bandwidth.__doc__,
        "Against the seed": seed_ps.__doc__,
        "Overhead": overhead.__doc__,
        "Scaling": scaling.__doc__,
    }
    md = [
        "# jaxps benchmarks",
        "",
        "Generated by `python benchmarks/run.py` (a full run: about 10 minutes on this 2-core machine; "
        "`--quick` is a smoke run of about a minute that CI uses and that measures nothing worth reading). "
        "Results: [results/results.md](results/results.md), [results/results.json](results/results.json).",
        "",
        f"This run: `{results['command']}`, wall time **{results['wall_s']:.0f} s**.",
        "",
        "## Machine",
        "",
        report.render_machine(results),
        "",
        "The machine was shared with other jobs during the run (see the load average), so absolute numbers are noisy; "
        "the jaxps-vs-baseline comparisons alternate their runs to spread that noise over both sides.",
        "",
        "## Results",
        "",
        tables,
        "",
    ]
    md += [f"![{os.path.basename(p)}]({os.path.relpath(p, where)})" for p in pngs]
    if os.path.exists(FINDINGS_MD):
        with open(FINDINGS_MD) as f:
            md += ["", f.read().strip()]
    md += ["", "## Method", ""]
    for title, doc in method.items():
        md += [f"### {title}", "", "```text", (doc or "").strip(), "```", ""]
    with open(path, "w") as f:
        f.write("\n".join(md) + "\n")


if __name__ == "__main__":
    sys.exit(main())
