"""Tile choice for the GMM kernels: a fixed default, or a small measured search cached in-process.

On GPU `gmm_tiles` times forward+backward of a few (tm, tk, tn) candidates on synthetic inputs of
the requested shapes (uniform group sizes) the first time a (device kind, M, K, N, E, dtype) key is
seen, and caches the winner for the life of the process. The search runs eagerly, outside whatever
jit is being traced (inputs are fresh concrete arrays), so it costs one compile per candidate once.
`MOEJAX_AUTOTUNE=0` turns the search off (the heuristic default is used). Under interpret mode (CPU)
and on TPU no search is done.
"""

from __future__ import annotations

import functools
import os
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp

Tiles = tuple[int, int, int]  # (tm, tk, tn)

# Triton needs power-of-two blocks of at least 16 per side for tl.dot.
GPU_CANDIDATES: tuple[Tiles, ...] = (
    (128, 64, 128), (64, 64, 128), (128, 32, 128), (128, 64, 256), (64, 32, 64), (128, 128, 128))
INTERPRET_TILES: Tiles = (64, 32, 32)

_CACHE: dict[tuple, Tiles] = {}


def _pow2_at_most(x: int, cap: int, floor: int = 16) -> int:
  p = floor
  while p * 2 <= min(x, cap):
    p *= 2
  return p


def _fit(dim: int, cap: int) -> int:
  """Largest power of two <= cap (>= 16) that divides dim, else the largest <= dim (pads)."""
  p = _pow2_at_most(dim, cap)
  q = p
  while q >= 16:
    if dim % q == 0:
      return q
    q //= 2
  return p


def default_tiles(m: int, k: int, n: int, dtype, interpret: bool) -> Tiles:
  """Heuristic tiles: small in interpret mode; 128x(64|32)x128 on GPU, shrunk for small M."""
  if interpret:
    tm, tk, tn = INTERPRET_TILES
    return (min(tm, _pow2_at_most(m, tm)), min(tk, _pow2_at_most(k, tk)),
            min(tn, _pow2_at_most(n, tn)))
  tk_cap = 64 if jnp.dtype(dtype).itemsize <= 2 else 32
  return (_pow2_at_most(m, 128), _fit(k, tk_cap), _fit(n, 128))


def cached(key: tuple) -> Optional[Tiles]:
  return _CACHE.get(key)


def measure(fn: Callable[[], object], reps: int = 3) -> float:
  """Seconds per call of fn() after one warm-up call (which compiles)."""
  jax.block_until_ready(fn())
  start = time.perf_counter()
  for _ in range(reps):
    out = fn()
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / reps


def gmm_tiles(m: int, k: int, n: int, e: int, dtype, interpret: bool,
              run: Callable[..., object]) -> Tiles:
  """Tiles for a GMM of [m,k] x [e,k,n]: measured once per key on GPU, else the default.

  `run(lhs, rhs, group_sizes, tiles)` must execute the kernel (forward + backward) for one choice.
  """
  default = default_tiles(m, k, n, dtype, interpret)
  if interpret or jax.default_backend() != "gpu" or os.environ.get("MOEJAX_AUTOTUNE", "1") == "0":
    return default
  key = (jax.devices()[0].device_kind, m, k, n, e, jnp.dtype(dtype).name)
  if key in _CACHE:
    return _CACHE[key]
  candidates = [t for t in GPU_CANDIDATES if k % t[1] == 0 and n % t[2] == 0 and t[0] <= max(m, 16)]
  if not candidates:
    _CACHE[key] = default
    return default
  _CACHE[key] = search(m, k, n, e, dtype, candidates, run, default)
  return _CACHE[key]


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4))
def _synthetic(m: int, k: int, n: int, e: int, dtype):
  """Dense pseudo-random lhs [m,k], rhs [e,k,n] (sines of an iota: cheap to compile, unlike
  threefry) and uniform group sizes (the remainder goes to the last group)."""
  lhs = jnp.sin(jnp.arange(m * k, dtype=jnp.float32) * 0.7071).reshape(m, k).astype(dtype)
  rhs = (jnp.sin(jnp.arange(e * k * n, dtype=jnp.float32) * 1.618) * 0.02).reshape(e, k, n)
  rhs = rhs.astype(dtype)
  sizes = jnp.full((e,), m // e, jnp.int32).at[-1].add(m - (m // e) * e)
  return lhs, rhs, sizes


def search(m: int, k: int, n: int, e: int, dtype, candidates, run, default: Tiles) -> Tiles:
  """Times `run` for each candidate on synthetic inputs; returns the fastest (default if none ran).

  Runs under `ensure_compile_time_eval`, so it executes eagerly even when called while a jit is
  being traced (omnistaging would otherwise stage the synthetic inputs into that trace).
  """
  with jax.ensure_compile_time_eval():
    lhs, rhs, sizes = _synthetic(m, k, n, e, jnp.dtype(dtype))
    best, best_time = default, float("inf")
    for tiles in candidates:
      lhs_p = jnp.pad(lhs, ((0, (-m) % tiles[0]), (0, 0)))
      step = jax.jit(lambda a, b, t=tiles: run(a, b, sizes, t))
      try:
        seconds = measure(lambda: step(lhs_p, rhs))  # pylint: disable=cell-var-from-loop
      except Exception:  # pylint: disable=broad-except  (a candidate may not fit shared memory)
        continue
      if seconds < best_time:
        best, best_time = tiles, seconds
  return best
