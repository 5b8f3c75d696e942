"""Benchmarks (never tests): `python -m moejax.bench.kernels`, `python -m moejax.bench.vs_transformers`;
`python -m moejax.bench.op_profile` shows where a step's time goes, per HLO op."""
