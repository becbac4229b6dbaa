"""Smoke test of the benchmarks: `python benchmarks/run.py --quick` finishes and writes its outputs.

Asserts nothing about speed, only that every benchmark ran over every
transport and that the table and the plot were written.
"""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRANSPORTS = ("inprocess", "multiprocessing", "ray", "ray-tcp", "ray-objectstore")


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_quick_run_writes_table_and_plot(tmp_path):
    pytest.importorskip("matplotlib")
    pytest.importorskip("ray")
    out = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "benchmarks", "run.py"), "--quick", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=230,
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\n--- stdout ---\n{proc.stdout[-6000:]}\n--- stderr ---\n{proc.stderr[-6000:]}"

    table = (out / "results.md").read_text()
    png = out / "bandwidth.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for section in ("### 1. Bandwidth", "### 2. Against the seed", "### 3. Training overhead", "### 4. Scaling"):
        assert section in table, section

    # a row per transport in the bandwidth and scaling tables, a jaxps row per transport against the seed
    for transport in TRANSPORTS:
        rows = [line for line in table.splitlines() if line.startswith(f"| {transport} |")]
        assert len(rows) >= 3, (transport, rows)  # bandwidth GB/s, bandwidth ms, scaling
        assert f"| jaxps/{transport} |" in table, transport
    assert "failed" not in table

    results = json.loads((out / "results.json").read_text())
    assert {r["transport"] for r in results["bandwidth"]["rows"]} == set(TRANSPORTS)
    assert {r["system"] for r in results["seed"]["rows"]} == {"seed", *(f"jaxps/{t}" for t in TRANSPORTS)}
    overhead = results["overhead"]
    assert all(overhead[k] > 0 for k in ("plain_steps_per_s", "split_steps_per_s", "jaxps_steps_per_s", "jaxps_unchecked_steps_per_s"))
    assert results["left_behind"]["processes"] == []
