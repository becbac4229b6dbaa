"""jaxps benchmarks: `python benchmarks/run.py [--quick]`; see benchmarks/BENCHMARKS.md."""
