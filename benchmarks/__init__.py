"""Benchmarks of attnssl, one module per protocol of docs/benchmarks.md, each run from the
repository root as ``python -m benchmarks.NAME``; :mod:`benchmarks.helpers` holds what they
share."""
