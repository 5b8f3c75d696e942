"""Pallas GMM / TGMM (interpret mode on CPU) vs a numpy per-group loop and `jax.lax.ragged_dot`.

Tolerances: fp32 inputs 1e-5 relative to the output scale (both sides accumulate in fp32); bf16
inputs 2e-2 relative (bf16 has an 8-bit mantissa; the reference is computed in float64 from the
same bf16-rounded inputs, the kernel accumulates in fp32 and rounds the output to bf16).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.kernels import autotune, gmm as gmm_lib, xla


def _np_gmm(lhs, rhs, sizes):
  lhs, rhs = np.asarray(lhs, np.float64), np.asarray(rhs, np.float64)
  out = np.zeros((lhs.shape[0], rhs.shape[2]))
  start = 0
  for e, size in enumerate(np.asarray(sizes)):
    out[start:start + size] = lhs[start:start + size] @ rhs[e]
    start += size
  return out


def _np_tgmm(lhs, dout, sizes):
  lhs, dout = np.asarray(lhs, np.float64), np.asarray(dout, np.float64)
  out, start = [], 0
  for size in np.asarray(sizes):
    out.append(lhs[start:start + size].T @ dout[start:start + size])
    start += size
  return np.stack(out)


def _inputs(m, k, n, sizes, dtype=jnp.float32, seed=0):
  rng = np.random.default_rng(seed)
  lhs = jnp.asarray(rng.normal(size=(m, k)), dtype)
  rhs = jnp.asarray(rng.normal(size=(len(sizes), k, n)) / np.sqrt(k), dtype)
  return lhs, rhs, jnp.asarray(sizes, jnp.int32)


def _close(got, want, rtol):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  scale = max(np.abs(want).max(), 1.0)
  np.testing.assert_allclose(got, want, atol=rtol * scale, rtol=0)


# (m, k, n, group sizes, tiles): empty groups (first, middle, last), a ragged tail (sum < M),
# M not a multiple of tm, K/N not multiples of tk/tn (padding), groups smaller than a tile.
CASES = [
    (128, 32, 32, [0, 40, 0, 57, 31, 0], (32, 16, 16)),
    (200, 48, 40, [30, 0, 77, 50, 20], None),
    (96, 64, 64, [3, 1, 0, 2, 60], (16, 32, 32)),
    (64, 16, 16, [0, 0, 0], (32, 16, 16)),
]


@pytest.mark.parametrize("m,k,n,sizes,tiles", CASES)
def test_gmm_fp32_matches_numpy(m, k, n, sizes, tiles):
  lhs, rhs, gs = _inputs(m, k, n, sizes)
  got = jax.jit(lambda a, b, g: gmm_lib.gmm(a, b, g, tiles=tiles))(lhs, rhs, gs)
  assert got.shape == (m, n) and got.dtype == jnp.float32
  _close(got, _np_gmm(lhs, rhs, sizes), 1e-5)
  assert not np.asarray(got[sum(sizes):]).any(), "rows past sum(group_sizes) must be zero"


def test_gmm_matches_xla_oracle():
  m, k, n, sizes, _ = CASES[1]  # default tiles, padding in M, K and N
  lhs, rhs, gs = _inputs(m, k, n, sizes)
  got, want = jax.jit(lambda a, b, g: (gmm_lib.gmm(a, b, g), xla.gmm(a, b, g)))(lhs, rhs, gs)
  _close(got, want, 1e-5)


def test_gmm_bf16_and_fp32_output():
  sizes = [50, 0, 13, 64]
  lhs, rhs, gs = _inputs(144, 32, 48, sizes, jnp.bfloat16, seed=1)
  want = _np_gmm(lhs.astype(jnp.float32), rhs.astype(jnp.float32), sizes)
  got, got32 = jax.jit(lambda a, b, g: (
      gmm_lib.gmm(a, b, g, tiles=(32, 16, 16)),
      gmm_lib.gmm(a, b, g, preferred_element_type=jnp.float32, tiles=(32, 16, 16))))(lhs, rhs, gs)
  assert got.dtype == jnp.bfloat16
  _close(got, want, 2e-2)
  assert got32.dtype == jnp.float32
  _close(got32, want, 1e-5)  # fp32 accumulation of exact bf16 products


@pytest.mark.parametrize("dtype,rtol", [(jnp.float32, 1e-5), (jnp.bfloat16, 3e-2)])
def test_gmm_grad_matches_ragged_dot(dtype, rtol):
  sizes = [0, 37, 45, 0, 20]  # sum 102 < M = 120: a ragged tail
  lhs, rhs, gs = _inputs(120, 32, 32, sizes, dtype, seed=2)
  cot = jnp.asarray(np.random.default_rng(3).normal(size=(120, 32)), jnp.float32)

  def loss(fn):
    return lambda a, b: (fn(a, b, gs).astype(jnp.float32) * cot).sum()

  got = jax.jit(jax.grad(loss(lambda a, b, g: gmm_lib.gmm(a, b, g, tiles=(32, 16, 16))),
                         argnums=(0, 1)))(lhs, rhs)
  want = jax.grad(loss(jax.lax.ragged_dot), argnums=(0, 1))(lhs, rhs)
  for g, w in zip(got, want):
    assert g.dtype == dtype and g.shape == w.shape
    _close(g, w, rtol)
  assert not np.asarray(got[1][0]).any() and not np.asarray(got[1][3]).any(), "empty experts"
  assert not np.asarray(got[0][102:]).any(), "rows of no group get no gradient"


def test_tgmm_matches_numpy_per_group():
  sizes = [0, 33, 0, 60, 7]
  lhs, _, gs = _inputs(110, 32, 16, sizes, seed=4)
  dout = jnp.asarray(np.random.default_rng(5).normal(size=(110, 48)), jnp.float32)
  got = jax.jit(lambda a, b, g: gmm_lib.tgmm(a, b, g, tiles=(32, 16, 16)))(lhs, dout, gs)
  assert got.shape == (5, 32, 48)
  _close(got, _np_tgmm(lhs, dout, sizes), 1e-5)


def test_tile_schedule_covers_every_row_once():
  sizes = np.array([5, 0, 0, 20, 1, 0, 30])  # sum 56; tile 4 (rows 64..79) holds no group
  first, last = (np.asarray(a) for a in gmm_lib.tile_schedule(jnp.asarray(sizes), 80, 16))
  ends = np.cumsum(sizes)
  for tile in range(5):
    rows = np.arange(tile * 16, tile * 16 + 16)
    owners = set(np.searchsorted(ends, rows[rows < ends[-1]], side="right").tolist())
    visits = set(range(first[tile], last[tile] + 1))
    nonempty_visits = {g for g in visits if sizes[g] > 0}
    assert owners == nonempty_visits, (tile, owners, visits)
  assert last[4] < first[4]


def test_bad_inputs_raise():
  lhs, rhs, gs = _inputs(16, 16, 16, [8, 8])
  with pytest.raises(ValueError, match="group_sizes_E"):
    gmm_lib.gmm(lhs, rhs, gs[:1])
  with pytest.raises(ValueError, match="rhs_ExKxN"):
    gmm_lib.gmm(lhs, rhs[:, :8], gs)
  with pytest.raises(ValueError, match="integer"):
    gmm_lib.gmm(lhs, rhs, gs.astype(jnp.float32))


def test_autotune_search_runs_eagerly_inside_jit():
  """The search must time concrete arrays even while an outer jit is tracing."""
  def run(a, b, g, tiles):  # a cheap stand-in for the kernel: this test is about staging
    return jnp.dot(a, b[0]) * tiles[0] + g.sum()

  picked = []

  @jax.jit
  def outer(x):
    picked.append(autotune.search(32, 16, 16, 2, jnp.float32, [(16, 16, 16), (32, 16, 16)], run,
                                  (16, 16, 16)))
    return x + 1

  outer(jnp.zeros(()))
  assert picked[0] in [(16, 16, 16), (32, 16, 16)]
  assert autotune.default_tiles(8, 1408, 1408, jnp.bfloat16, False) == (16, 64, 128)
