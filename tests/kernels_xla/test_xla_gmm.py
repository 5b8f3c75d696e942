"""CPU grouped matmuls (blocked, tiled, fused SwiGLU) equal jax.lax.ragged_dot in values and gradients."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.kernels import xla


@pytest.mark.parametrize("m,k,n,sizes", [
    (64, 8, 16, [64]),
    (100, 16, 8, [0, 37, 0, 50, 13]),          # empty groups, M not a multiple of the block
    (300, 8, 8, [120, 0, 3, 70, 7]),           # rows beyond sum(group_sizes) must be zero
    (7, 4, 4, [1, 1, 1, 1, 1, 1, 1, 0]),
])
def test_blocked_equals_ragged(m, k, n, sizes):
  rng = np.random.default_rng(m)
  lhs = jnp.asarray(rng.normal(size=(m, k)), jnp.float32)
  rhs = jnp.asarray(rng.normal(size=(len(sizes), k, n)), jnp.float32)
  gs = jnp.asarray(sizes, jnp.int32)
  ref = xla.gmm_ragged(lhs, rhs, gs)
  got = xla.gmm_blocked(lhs, rhs, gs, block=16)
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
  assert np.all(np.asarray(got)[sum(sizes):] == 0)

  def loss(fn, a, b):
    return jnp.sum(jnp.sin(fn(a, b, gs)))

  g_ref = jax.grad(lambda a, b: loss(xla.gmm_ragged, a, b), argnums=(0, 1))(lhs, rhs)
  g_got = jax.grad(lambda a, b: loss(lambda x, w, g: xla.gmm_blocked(x, w, g, block=16), a, b),
                   argnums=(0, 1))(lhs, rhs)
  for x, y in zip(g_got, g_ref):
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-4)


CASES = [
    (64, 8, 16, [64], None),
    (100, 16, 8, [0, 37, 0, 50, 13], 16),      # empty groups, groups spanning several tiles
    (300, 8, 8, [120, 0, 3, 70, 7], None),     # rows beyond sum(group_sizes) must be zero
    (7, 4, 4, [1, 1, 1, 1, 1, 1, 1, 0], None),
    (7, 4, 4, [1, 1, 1, 1, 1, 1, 1, 0], 4),    # a tile larger than every group
    (5, 3, 2, [0, 0, 0], None),                # no rows at all in any group
    (33, 8, 8, [0, 33], 8),                    # the last tile is clamped into the array
]


def _problem(m, k, n, sizes):
  rng = np.random.default_rng(m + len(sizes))
  return (jnp.asarray(rng.normal(size=(m, k)), jnp.float32),
          jnp.asarray(rng.normal(size=(len(sizes), k, n)), jnp.float32),
          jnp.asarray(sizes, jnp.int32))


@pytest.mark.parametrize("m,k,n,sizes,tile", CASES)
def test_tiled_equals_ragged_values_and_gradients(m, k, n, sizes, tile):
  lhs, rhs, gs = _problem(m, k, n, sizes)
  tiled = lambda a, b, g: xla.gmm_tiled(a, b, g, tile=tile)  # noqa: E731
  got = jax.jit(tiled)(lhs, rhs, gs)
  np.testing.assert_allclose(got, xla.gmm_ragged(lhs, rhs, gs), rtol=1e-5, atol=1e-5)
  assert np.all(np.asarray(got)[sum(sizes):] == 0)

  def loss(fn, a, b):
    return jnp.sum(jnp.sin(fn(a, b, gs)))

  g_ref = jax.grad(lambda a, b: loss(xla.gmm_ragged, a, b), argnums=(0, 1))(lhs, rhs)
  g_got = jax.jit(jax.grad(lambda a, b: loss(tiled, a, b), argnums=(0, 1)))(lhs, rhs)
  for x, y in zip(g_got, g_ref):
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-4)
  assert np.all(np.asarray(g_got[1])[np.asarray(sizes) == 0] == 0)  # empty groups: zero grad


def _swiglu_ref(x, wg, wu, wd, gs):
  gate = xla.gmm_ragged(x, wg, gs, jnp.float32)
  up = xla.gmm_ragged(x, wu, gs, jnp.float32)
  return xla.gmm_ragged((jax.nn.silu(gate) * up).astype(x.dtype), wd, gs, jnp.float32)


@pytest.mark.parametrize("m,d,f,sizes,tile", CASES)
def test_expert_swiglu_equals_three_ragged_gmms(m, d, f, sizes, tile):
  rng = np.random.default_rng(m)
  e = len(sizes)
  x = jnp.asarray(rng.normal(size=(m, d)), jnp.float32)
  wg, wu = (jnp.asarray(0.5 * rng.normal(size=(e, d, f)), jnp.float32) for _ in range(2))
  wd = jnp.asarray(0.5 * rng.normal(size=(e, f, d)), jnp.float32)
  gs = jnp.asarray(sizes, jnp.int32)
  fused = lambda *a: xla.expert_swiglu(*a, tile=tile)  # noqa: E731
  got = jax.jit(fused)(x, wg, wu, wd, gs)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, _swiglu_ref(x, wg, wu, wd, gs), rtol=1e-5, atol=1e-4)
  assert np.all(np.asarray(got)[sum(sizes):] == 0)

  def loss(fn, *w):
    return jnp.sum(jnp.sin(fn(*w, gs)))

  g_ref = jax.grad(lambda *w: loss(_swiglu_ref, *w), argnums=(0, 1, 2, 3))(x, wg, wu, wd)
  g_got = jax.jit(jax.grad(lambda *w: loss(fused, *w), argnums=(0, 1, 2, 3)))(x, wg, wu, wd)
  for a, b in zip(g_got, g_ref):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-3)


def test_expert_swiglu_bf16_close_to_fp32():
  rng = np.random.default_rng(0)
  sizes = [40, 0, 25, 31]
  x = rng.normal(size=(96, 16)).astype(np.float32)
  w = [rng.normal(size=s).astype(np.float32) * 0.3 for s in ((4, 16, 8), (4, 16, 8), (4, 8, 16))]
  gs = jnp.asarray(sizes, jnp.int32)
  want = _swiglu_ref(jnp.asarray(x), *map(jnp.asarray, w), gs)
  got = jax.jit(xla.expert_swiglu)(jnp.asarray(x, jnp.bfloat16),
                                   *(jnp.asarray(a, jnp.bfloat16) for a in w), gs)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=5e-2, atol=5e-2)


def test_default_tile():
  assert xla.default_tile(8192, 16) == 512          # one tile per group under balanced routing
  assert xla.default_tile(64, 16) == 8              # decode at batch 16, top-4
  assert xla.default_tile(4, 16) == 4               # decode at batch 1: never more than M
  assert xla.default_tile(1 << 20, 8) == 512
  for m, e in ((1, 1), (7, 8), (100, 5), (2048, 8)):
    t = xla.default_tile(m, e)
    assert 1 <= t <= m and t & (t - 1) == 0 or t == m


def test_gmm_and_ops_on_cpu_use_the_tiled_loops():
  from moejax.kernels import get_ops
  ops = get_ops("xla")
  assert ops.expert_swiglu is xla.expert_swiglu
  lhs, rhs, gs = _problem(40, 8, 4, [10, 0, 30])
  jaxpr = str(jax.make_jaxpr(lambda a, b: ops.gmm(a, b, gs))(lhs, rhs))
  assert ("while" in jaxpr) == (jax.default_backend() == "cpu")
