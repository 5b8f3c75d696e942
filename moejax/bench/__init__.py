"""Benchmarks (never tests): `python -m moejax.bench.kernels`."""
