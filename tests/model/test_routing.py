"""moejax.model.routing against an independent numpy (float64, loop-based) reference."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.model import routing


# ----- numpy reference -----

def ref_scores(logits, score_fn):
  x = np.asarray(logits, np.float64)
  if score_fn == "softmax":
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)
  return 1.0 / (1.0 + np.exp(-x))


def ref_top_k_row(row, k):
  order = sorted(range(len(row)), key=lambda i: (-row[i], i))
  return order[:k]


def ref_group_mask_row(row, n_groups, topk_groups):
  per = len(row) // n_groups
  group_scores = []
  for g in range(n_groups):
    vals = sorted(row[g * per:(g + 1) * per], reverse=True)
    group_scores.append(sum(vals[:min(2, per)]))
  keep = ref_top_k_row(group_scores, topk_groups)
  out = np.array(row, np.float64)
  for g in range(n_groups):
    if g not in keep:
      out[g * per:(g + 1) * per] = -np.inf
  return out


def ref_route(logits, bias, k, score_fn, renormalize, scale, n_groups, topk_groups, mask):
  s = ref_scores(logits, score_fn)
  t, e = s.shape
  idx = np.zeros((t, k), np.int64)
  gates = np.zeros((t, k), np.float64)
  unbiased = np.zeros((t, k), np.int64)
  for i in range(t):
    sel = s[i] + (0.0 if bias is None else np.asarray(bias, np.float64))
    if mask is not None:
      sel = np.where(mask[i], sel, -np.inf)
    if n_groups:
      sel = ref_group_mask_row(sel, n_groups, topk_groups)
    idx[i] = ref_top_k_row(sel, k)
    for j in range(k):
      allowed = mask is None or mask[i, idx[i, j]]
      gates[i, j] = s[i, idx[i, j]] if allowed else 0.0
    if renormalize:
      gates[i] = gates[i] / (gates[i].sum() + 1e-20)
    gates[i] *= scale
    unbiased[i] = ref_top_k_row(s[i], k)
  return s, idx, gates, unbiased


def _logits(rng, t, e, ties):
  """Normal logits, or small integers so that exact ties are frequent."""
  if ties:
    return rng.integers(-1, 2, size=(t, e)).astype(np.float32)
  return rng.normal(size=(t, e)).astype(np.float32)


# ----- router_scores -----

@pytest.mark.parametrize("score_fn", ["softmax", "sigmoid"])
def test_router_scores_matches_numpy_and_is_fp32(score_fn):
  logits = np.random.default_rng(0).normal(size=(5, 7)).astype(np.float32) * 3
  out = routing.router_scores(jnp.asarray(logits, jnp.bfloat16), score_fn)
  assert out.dtype == jnp.float32
  ref = ref_scores(np.asarray(jnp.asarray(logits, jnp.bfloat16).astype(jnp.float32)), score_fn)
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-7)


def test_router_scores_rejects_unknown_fn():
  with pytest.raises(ValueError, match="score_fn"):
    routing.router_scores(jnp.zeros((2, 4)), "relu")


# ----- top_k -----

@pytest.mark.parametrize("e", [8, 16])
@pytest.mark.parametrize("k", [1, 2, 4, 8])
@pytest.mark.parametrize("ties", [False, True])
def test_top_k_matches_reference(e, k, ties):
  vals = _logits(np.random.default_rng(e * 100 + k), 24, e, ties)
  v, i = jax.jit(routing.top_k, static_argnums=1)(vals, k)
  assert i.dtype == jnp.int32 and v.shape == (24, k)
  for t in range(24):
    ref = ref_top_k_row(vals[t], k)
    np.testing.assert_array_equal(i[t], ref)
    np.testing.assert_array_equal(v[t], vals[t, ref])


def test_top_k_exact_ties_break_to_lower_index():
  row = jnp.array([[1.0, 2.0, 2.0, 2.0, 0.0, 2.0]])
  np.testing.assert_array_equal(routing.top_k(row, 3)[1], [[1, 2, 3]])
  np.testing.assert_array_equal(routing.top_k(-row, 3)[1], [[4, 0, 1]])
  np.testing.assert_array_equal(routing.top_k(jnp.zeros((2, 300)), 5)[1], [list(range(5))] * 2)
  with_inf = jnp.array([[-jnp.inf, 0.5, -jnp.inf, 0.5, -jnp.inf]])
  np.testing.assert_array_equal(routing.top_k(with_inf, 4)[1], [[1, 3, 0, 2]])
  # -0.0 and +0.0 compare equal, so the lower index wins.
  np.testing.assert_array_equal(routing.top_k(jnp.array([[0.0, -0.0]]), 1)[1], [[0]])
  np.testing.assert_array_equal(routing.top_k(jnp.array([[-0.0, 0.0]]), 1)[1], [[0]])


def test_top_k_with_infinities_picks_distinct_experts():
  """More picks than finite entries: -inf entries follow in index order, never a repeated index
  (the argmax rounds must rank a taken entry below -inf)."""
  inf = np.inf
  rows = jnp.asarray([[-inf, 0.5, -inf, 2.0, -inf], [inf, -inf, inf, -inf, 1.0]], jnp.float32)
  for k in (3, 5):
    vals, idx = routing.top_k(rows, k)
    want = [list(np.lexsort((np.arange(5), -r))[:k]) for r in np.asarray(rows)]
    np.testing.assert_array_equal(idx, want)
    np.testing.assert_array_equal(vals, np.take_along_axis(np.asarray(rows), np.asarray(want), 1))
  np.testing.assert_array_equal(routing.top_k(rows, 3)[1], [[3, 1, 0], [0, 2, 4]])


def test_top_k_leading_dims_and_bad_k():
  vals = np.random.default_rng(1).normal(size=(2, 3, 6)).astype(np.float32)
  _, i = routing.top_k(vals, 2)
  assert i.shape == (2, 3, 2)
  for b in range(2):
    for t in range(3):
      np.testing.assert_array_equal(i[b, t], ref_top_k_row(vals[b, t], 2))
  for bad in (0, 7, 1.5):
    with pytest.raises(ValueError, match="k="):
      routing.top_k(vals, bad)


# ----- group_limited_mask -----

@pytest.mark.parametrize("e,n_groups,topk_groups", [(8, 4, 2), (16, 4, 1), (16, 8, 3), (8, 8, 3),
                                                    (12, 3, 3)])
@pytest.mark.parametrize("ties", [False, True])
def test_group_limited_mask_matches_reference(e, n_groups, topk_groups, ties):
  sel = _logits(np.random.default_rng(e + n_groups), 16, e, ties)
  out = np.asarray(routing.group_limited_mask(jnp.asarray(sel), n_groups, topk_groups))
  for t in range(16):
    np.testing.assert_array_equal(out[t], ref_group_mask_row(sel[t], n_groups, topk_groups))
  assert (np.isfinite(out).sum(-1) == topk_groups * (e // n_groups)).all()


def test_group_limited_mask_uses_top2_sum_not_max():
  # Group 0 has the single best expert; group 1 has the better top-2 sum.
  sel = jnp.array([[0.9, 0.0, 0.0, 0.0, 0.5, 0.5, 0.0, 0.0]])
  out = routing.group_limited_mask(sel, 2, 1)
  np.testing.assert_array_equal(np.isfinite(out), [[False] * 4 + [True] * 4])


def test_group_limited_mask_bad_args():
  with pytest.raises(ValueError, match="n_groups"):
    routing.group_limited_mask(jnp.zeros((2, 8)), 3, 1)
  with pytest.raises(ValueError, match="topk_groups"):
    routing.group_limited_mask(jnp.zeros((2, 8)), 4, 5)


# ----- route -----

ROUTE_CASES = [
    # (T, E, K, score_fn, renormalize, scale, n_groups, topk_groups)
    (16, 8, 1, "softmax", False, 1.0, 0, 0),     # Switch
    (16, 8, 2, "softmax", True, 1.0, 0, 0),      # Mixtral / Qwen3
    (12, 16, 8, "softmax", False, 1.0, 0, 0),    # OLMoE
    (20, 16, 4, "sigmoid", True, 2.5, 4, 2),     # DeepSeek-V3 style
    (9, 16, 8, "sigmoid", True, 1.0, 8, 4),
    (10, 8, 2, "sigmoid", False, 1.0, 0, 0),     # ALF-LB Eq. 3
    (7, 12, 4, "softmax", True, 0.5, 6, 3),
    (8, 4, 4, "sigmoid", True, 2.0, 4, 4),
]


@pytest.mark.parametrize("case", ROUTE_CASES)
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("ties", [False, True])
def test_route_matches_reference(case, with_bias, ties):
  t, e, k, score_fn, renorm, scale, n_groups, topk_groups = case
  rng = np.random.default_rng(t * e + k)
  logits = _logits(rng, t, e, ties)
  bias = (rng.normal(size=e) * 0.3).astype(np.float32) if with_bias else None
  if ties and with_bias:
    bias = np.round(bias * 4) / 4  # keeps many exact ties between biased scores
  fn = jax.jit(functools.partial(routing.route, top_k=k, score_fn=score_fn, renormalize=renorm,
                                 routed_scaling_factor=scale, n_groups=n_groups,
                                 topk_groups=topk_groups))
  r = fn(logits, bias)
  s, idx, gates, unbiased = ref_route(logits, bias, k, score_fn, renorm, scale, n_groups,
                                      topk_groups, None)
  np.testing.assert_allclose(r.scores_TxE, s, rtol=1e-5, atol=1e-7)
  np.testing.assert_array_equal(r.expert_idx_TxK, idx)
  np.testing.assert_allclose(r.gates_TxK, gates, rtol=1e-5, atol=1e-7)
  np.testing.assert_array_equal(r.unbiased_idx_TxK, unbiased)
  assert r.gates_TxK.dtype == jnp.float32 and r.expert_idx_TxK.dtype == jnp.int32
  if renorm:
    np.testing.assert_allclose(np.asarray(r.gates_TxK).sum(-1), scale, rtol=1e-5)


def test_route_with_expert_mask_matches_reference():
  rng = np.random.default_rng(3)
  t, e, k = 32, 8, 2
  logits = _logits(rng, t, e, False)
  mask = rng.random((t, e)) > 0.3
  mask[0] = False
  mask[0, 5] = True  # only one allowed expert for token 0: its second pick gets gate 0
  r = routing.route(logits, None, top_k=k, score_fn="softmax", renormalize=True,
                    expert_mask_TxE=mask)
  _, idx, gates, unbiased = ref_route(logits, None, k, "softmax", True, 1.0, 0, 0, mask)
  np.testing.assert_array_equal(r.expert_idx_TxK, idx)
  np.testing.assert_allclose(r.gates_TxK, gates, rtol=1e-5, atol=1e-7)
  np.testing.assert_array_equal(r.unbiased_idx_TxK, unbiased)
  np.testing.assert_allclose(r.gates_TxK[0], [1.0, 0.0], rtol=1e-6)
  picked_ok = np.take_along_axis(mask, np.asarray(r.expert_idx_TxK), -1)
  assert picked_ok[(mask.sum(-1) >= k)].all()


def test_bias_changes_selection_but_not_gate_values():
  rng = np.random.default_rng(4)
  t, e, k = 64, 8, 2
  logits = rng.normal(size=(t, e)).astype(np.float32)
  bias = np.zeros(e, np.float32)
  bias[7] = 0.4  # strongly favour expert 7 in the selection
  kw = dict(top_k=k, score_fn="sigmoid", renormalize=False)
  r = routing.route(logits, bias, **kw)
  r0 = routing.route(logits, None, **kw)
  assert not np.array_equal(r.expert_idx_TxK, r0.expert_idx_TxK)
  assert (np.asarray(r.expert_idx_TxK) == 7).sum() > (np.asarray(r0.expert_idx_TxK) == 7).sum()
  np.testing.assert_array_equal(r.scores_TxE, r0.scores_TxE)
  np.testing.assert_array_equal(r.unbiased_idx_TxK, r0.expert_idx_TxK)
  at_picks = np.take_along_axis(np.asarray(r.scores_TxE), np.asarray(r.expert_idx_TxK), -1)
  np.testing.assert_array_equal(r.gates_TxK, at_picks)  # s_{i,t}, never s_{i,t} + b_i


def test_bias_gets_no_gradient_and_gates_differentiate_through_unbiased_scores():
  rng = np.random.default_rng(5)
  t, e, k = 12, 8, 2
  logits = rng.normal(size=(t, e)).astype(np.float32)
  bias = (rng.normal(size=e) * 0.5).astype(np.float32)
  w = rng.normal(size=(t, k)).astype(np.float32)
  kw = dict(top_k=k, score_fn="sigmoid", renormalize=True, routed_scaling_factor=2.5)

  def loss(lg, b):
    r = routing.route(lg, b, **kw)
    return jnp.sum(r.gates_TxK * w) + jnp.sum(r.scores_TxE ** 2)

  g_logits, g_bias = jax.jit(jax.grad(loss, argnums=(0, 1)))(logits, bias)
  np.testing.assert_array_equal(g_bias, np.zeros(e, np.float32))

  idx = routing.route(logits, bias, **kw).expert_idx_TxK

  def loss_fixed_idx(lg):  # same loss with the selection frozen: no path through the bias
    s = jax.nn.sigmoid(lg)
    g = jnp.take_along_axis(s, idx, -1)
    g = 2.5 * g / (g.sum(-1, keepdims=True) + 1e-20)
    return jnp.sum(g * w) + jnp.sum(s ** 2)

  np.testing.assert_allclose(g_logits, jax.grad(loss_fixed_idx)(logits), rtol=1e-5, atol=1e-7)
  # The bias enters the computation only through stop_gradient.
  jaxpr = jax.make_jaxpr(lambda b: routing.route(logits, b, **kw))(bias).jaxpr
  users = [eqn.primitive.name for eqn in jaxpr.eqns if jaxpr.invars[0] in eqn.invars]
  assert users == ["stop_gradient"]
  _, tangent = jax.jvp(lambda b: routing.route(logits, b, **kw).gates_TxK, (bias,),
                       (np.ones(e, np.float32),))
  np.testing.assert_array_equal(tangent, np.zeros((t, k), np.float32))


def test_route_is_deterministic_on_exact_ties():
  logits = jnp.zeros((4, 8))
  for score_fn in ("softmax", "sigmoid"):
    r = routing.route(logits, jnp.zeros(8), top_k=3, score_fn=score_fn, renormalize=True)
    np.testing.assert_array_equal(r.expert_idx_TxK, [[0, 1, 2]] * 4)
    np.testing.assert_allclose(r.gates_TxK, np.full((4, 3), 1 / 3), rtol=1e-6)
  r = routing.route(logits, None, top_k=2, score_fn="sigmoid", renormalize=False, n_groups=4,
                    topk_groups=2)
  np.testing.assert_array_equal(r.expert_idx_TxK, [[0, 1]] * 4)


def test_route_rejects_bad_bias_shape():
  with pytest.raises(ValueError, match="bias_E"):
    routing.route(jnp.zeros((3, 8)), jnp.zeros(7), top_k=2, score_fn="softmax", renormalize=True)
