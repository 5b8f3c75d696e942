"""Attention internals: the masked softmax, causal block skipping and the MLA chunked core equal
their plain (unchunked, two-select) references in values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.model import attention as A
from moejax.model import mla


def _select_softmax(scores, mask):
  """The previous formulation: select before and after the softmax."""
  m = mask[:, None]
  s = jnp.where(m, scores, jnp.finfo(jnp.float32).min)
  return jnp.where(m, jax.nn.softmax(s, axis=-1), 0.0)


def test_masked_softmax_equals_two_select_form_including_empty_rows():
  rng = np.random.default_rng(0)
  scores = jnp.asarray(rng.normal(size=(2, 3, 5, 7)) * 4, jnp.float32)
  mask = rng.random((2, 5, 7)) < 0.5
  mask[0, 1] = False  # a query with no allowed key
  mask = jnp.asarray(mask)
  got = A.masked_softmax(scores, mask)
  np.testing.assert_array_equal(np.asarray(got)[0, :, 1], 0.0)
  np.testing.assert_allclose(got, _select_softmax(scores, mask), rtol=1e-6, atol=1e-7)
  g_got = jax.grad(lambda s: jnp.sum(jnp.sin(A.masked_softmax(s, mask)) * s))(scores)
  g_ref = jax.grad(lambda s: jnp.sum(jnp.sin(_select_softmax(s, mask)) * s))(scores)
  assert np.all(np.isfinite(np.asarray(g_got)))
  np.testing.assert_allclose(g_got, g_ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("length,want", [(16, 1), (64, 1), (128, 1), (256, 2), (384, 3), (640, 4),
                                         (1024, 4), (2048, 4)])
def test_causal_chunks(length, want):
  assert A.causal_chunks(length) == want
  assert length % want == 0


def _causal_problem(b=2, l=12, seed=0):
  rng = np.random.default_rng(seed)
  seg = np.ones((b, l), np.int32)
  seg[0, 7:] = 2      # two packed documents
  seg[1, :3] = 0      # left padding
  seg = jnp.asarray(seg)
  return rng, seg, A.attention_mask(seg, seg, jnp.arange(l, dtype=jnp.int32))


@pytest.mark.parametrize("chunks", [2, 3, 4])
def test_causal_blocks_equal_full_attention_values_and_gradients(chunks):
  rng, _, mask = _causal_problem()
  b, l, h, g, dh = 2, 12, 4, 2, 8
  q = jnp.asarray(rng.normal(size=(b, l, h, dh)), jnp.float32)
  k, v = (jnp.asarray(rng.normal(size=(b, l, g, dh)), jnp.float32) for _ in range(2))

  def run(c, q, k, v):
    return A.dot_product_attention(q, k, v, mask, chunks=c)

  full = run(1, q, k, v)
  np.testing.assert_allclose(run(chunks, q, k, v), full, rtol=1e-5, atol=1e-6)
  grads = [jax.grad(lambda *a, c=c: jnp.sum(jnp.sin(run(c, *a))), argnums=(0, 1, 2))(q, k, v)
           for c in (1, chunks)]
  for x, y in zip(*grads):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def test_mla_expanded_chunked_equals_unchunked():
  rng, _, mask = _causal_problem(seed=1)
  b, l, h, dn, dr, dv, r = 2, 12, 3, 6, 4, 5, 7
  args = [jnp.asarray(rng.normal(size=s), jnp.float32)
          for s in ((b, l, h, dn), (b, l, h, dr), (b, l, r), (b, l, dr), (r, h, dn), (r, h, dv))]

  def run(c, *a):
    return mla.mla_expanded(*a, mask, 0.3, chunks=c)

  full = run(1, *args)
  np.testing.assert_allclose(run(3, *args), full, rtol=1e-5, atol=1e-6)
  g1, g3 = (jax.grad(lambda *a, c=c: jnp.sum(jnp.sin(run(c, *a))), argnums=range(6))(*args)
            for c in (1, 3))
  for x, y in zip(g1, g3):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
