"""The CPU-friendly blocked grouped matmul equals jax.lax.ragged_dot (values and gradients)."""
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
