"""Benchmarks: ``python -m bench.resolve`` and ``python -m bench.jobs`` (see bench/README.md)."""
