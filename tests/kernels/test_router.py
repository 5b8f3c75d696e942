"""Fused Pallas router (interpret mode on CPU) vs a numpy reference and `moejax.model.routing.route`.

fp32 throughout: scores, gates and statistics to 1e-5; expert ids exactly.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.kernels import router


def _np_route(logits, bias, k, score_fn, renormalize, scale, mask=None):
  x = np.asarray(logits, np.float64)
  if score_fn == "softmax":
    s = np.exp(x - x.max(-1, keepdims=True))
    s /= s.sum(-1, keepdims=True)
  else:
    s = 1.0 / (1.0 + np.exp(-x))
  sel = s + np.asarray(bias, np.float64)
  # lexsort: primary key -sel, secondary the expert index -> ties to the lower index
  idx = np.stack([np.lexsort((np.arange(len(row)), -row))[:k] for row in sel])
  gates = np.take_along_axis(s, idx, -1)
  if renormalize:
    gates = gates / (gates.sum(-1, keepdims=True) + 1e-20)
  gates = gates * scale
  valid = np.ones(x.shape[0]) if mask is None else np.asarray(mask, np.float64)
  counts = np.zeros(x.shape[1])
  for t in range(x.shape[0]):
    counts[idx[t]] += valid[t]
  return idx, gates, s, counts, (s * valid[:, None]).sum(0)


# (T, E, K, score_fn, renormalize, scale): T not a multiple of the 64-token tile, E and K not
# powers of two (padded inside), DeepSeek-V3-style sigmoid with scale 2.5, OLMoE-style no renorm.
CASES = [
    (100, 12, 3, "softmax", True, 1.0),
    (70, 8, 2, "sigmoid", True, 2.5),
    (33, 6, 6, "softmax", False, 1.0),
]


@pytest.mark.parametrize("t,e,k,score_fn,renormalize,scale", CASES)
def test_fused_route_matches_numpy(t, e, k, score_fn, renormalize, scale):
  rng = np.random.default_rng(t)
  logits = jnp.asarray(rng.normal(size=(t, e)) * 2, jnp.float32)
  bias = jnp.asarray(rng.normal(size=(e,)) * 0.3, jnp.float32)
  mask = jnp.asarray(rng.random(t) > 0.2)
  fn = jax.jit(lambda x, b, m: router.fused_route(
      x, b, top_k=k, score_fn=score_fn, renormalize=renormalize, routed_scaling_factor=scale,
      token_mask_T=m))
  idx, gates, scores, counts, sums = fn(logits, bias, mask)
  w_idx, w_gates, w_scores, w_counts, w_sums = _np_route(logits, bias, k, score_fn, renormalize,
                                                         scale, mask)
  assert idx.shape == (t, k) and idx.dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(idx), w_idx)
  np.testing.assert_allclose(np.asarray(gates), w_gates, atol=1e-5)
  np.testing.assert_allclose(np.asarray(scores), w_scores, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(counts), w_counts)
  np.testing.assert_allclose(np.asarray(sums), w_sums, rtol=1e-5)


def test_ties_break_toward_lower_index():
  logits = jnp.zeros((5, 8), jnp.float32).at[:, 6].set(1.0)
  idx, gates, *_ = jax.jit(lambda x: router.fused_route(x, None, top_k=3, score_fn="sigmoid",
                                                        renormalize=False))(logits)
  np.testing.assert_array_equal(np.asarray(idx), np.tile([6, 0, 1], (5, 1)))
  np.testing.assert_allclose(np.asarray(gates[:, 1]), 0.5)


def _reference():
  return pytest.importorskip("moejax.model.routing",
                             reason="moejax.model.routing (the router reference) is not there yet")


@pytest.mark.parametrize("score_fn,renormalize,scale", [("softmax", True, 1.0),
                                                        ("sigmoid", True, 2.5)])
def test_matches_model_route_values_and_grads(score_fn, renormalize, scale):
  routing = _reference()
  rng = np.random.default_rng(7)
  t, e, k = 40, 10, 4
  logits = jnp.asarray(rng.normal(size=(t, e)), jnp.float32)
  bias = jnp.asarray(rng.normal(size=(e,)) * 0.2, jnp.float32)
  w_g = jnp.asarray(rng.normal(size=(t, k)), jnp.float32)
  w_s = jnp.asarray(rng.normal(size=(t, e)), jnp.float32)
  kw = dict(top_k=k, score_fn=score_fn, renormalize=renormalize, routed_scaling_factor=scale)

  def ours(x):
    _, gates, scores, _, sums = router.fused_route(x, bias, **kw)
    return (gates * w_g).sum() + (scores * w_s).sum() + (sums ** 2).sum() / t

  def ref(x):
    r = routing.route(x, bias, **kw)
    return (r.gates_TxK * w_g).sum() + (r.scores_TxE * w_s).sum() + (
        r.scores_TxE.sum(0) ** 2).sum() / t

  r = jax.jit(lambda x: routing.route(x, bias, **kw))(logits)
  idx, gates, scores, _, _ = jax.jit(lambda x: router.fused_route(x, bias, **kw))(logits)
  np.testing.assert_array_equal(np.asarray(idx), np.asarray(r.expert_idx_TxK))
  np.testing.assert_allclose(np.asarray(gates), np.asarray(r.gates_TxK), atol=1e-6)
  np.testing.assert_allclose(np.asarray(scores), np.asarray(r.scores_TxE), atol=1e-6)
  np.testing.assert_allclose(np.asarray(jax.jit(jax.grad(ours))(logits)),
                             np.asarray(jax.jit(jax.grad(ref))(logits)), atol=1e-5)


def test_group_limited_falls_back_to_xla_and_matches_route():
  routing = _reference()
  rng = np.random.default_rng(8)
  logits = jnp.asarray(rng.normal(size=(24, 16)), jnp.float32)
  bias = jnp.asarray(rng.normal(size=(16,)) * 0.1, jnp.float32)
  kw = dict(top_k=4, score_fn="sigmoid", renormalize=True, routed_scaling_factor=2.5,
            n_groups=4, topk_groups=2)
  idx, gates, *_ = jax.jit(lambda x: router.fused_route(x, bias, **kw))(logits)
  r = jax.jit(lambda x: routing.route(x, bias, **kw))(logits)
  np.testing.assert_array_equal(np.asarray(idx), np.asarray(r.expert_idx_TxK))
  np.testing.assert_allclose(np.asarray(gates), np.asarray(r.gates_TxK), atol=1e-6)


def test_bad_inputs_raise():
  x = jnp.zeros((4, 8), jnp.float32)
  with pytest.raises(ValueError, match="score_fn"):
    router.fused_route(x, None, top_k=2, score_fn="relu", renormalize=True)
  with pytest.raises(ValueError, match="top_k"):
    router.fused_route(x, None, top_k=9, score_fn="softmax", renormalize=True)
  with pytest.raises(ValueError, match="bias_E"):
    router.fused_route(x, jnp.zeros(3), top_k=2, score_fn="softmax", renormalize=True)
