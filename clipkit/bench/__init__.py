"""Benchmarks that compare clipkit with its peers in one invocation and write their results as JSON.

Each module exposes `main(argv) -> int` (run as `clipkit bench NAME ...` or `python -m clipkit.bench.NAME`)."""
