"""moejax.model.balance against independent numpy (float64, loop-based) references."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.model import balance, routing

# One compilation per call signature instead of op-by-op dispatch (keeps the file fast on CPU).
tokens_per_expert = jax.jit(balance.tokens_per_expert, static_argnums=1)
switch_aux_loss = jax.jit(balance.switch_aux_loss, static_argnums=2)
seq_aux_loss = jax.jit(balance.seq_aux_loss)
z_loss = jax.jit(balance.z_loss)
moepp_loss = jax.jit(balance.moepp_loss, static_argnums=2)
max_violation = jax.jit(balance.max_violation)
router_entropy = jax.jit(balance.router_entropy)


# ----- numpy reference -----

def ref_load(idx, e, mask=None):
  load = np.zeros(e)
  for t in range(idx.shape[0]):
    if mask is not None and not mask[t]:
      continue
    for j in idx[t]:
      if 0 <= j < e:
        load[j] += 1
  return load


def ref_switch(scores, idx, mask=None):
  t_all, e = scores.shape
  k = idx.shape[1]
  keep = [t for t in range(t_all) if mask is None or mask[t]]
  if not keep:
    return 0.0
  load = ref_load(idx[keep], e)
  f = load / (len(keep) * k)
  p = np.asarray(scores, np.float64)[keep].mean(0)
  return e * np.sum(f * p)


def ref_seq(scores, idx, mask=None):
  b, _, e = scores.shape
  k = idx.shape[-1]
  losses = []
  for s in range(b):
    keep = [t for t in range(scores.shape[1]) if mask is None or mask[s, t]]
    if not keep:
      continue
    f = e / (k * len(keep)) * ref_load(idx[s, keep], e)
    normed = [scores[s, t] / np.sum(scores[s, t], dtype=np.float64) for t in keep]
    p = np.mean(normed, axis=0)
    losses.append(np.sum(f * p))
  return np.mean(losses) if losses else 0.0


def ref_z(logits, mask=None):
  vals = []
  for t in range(logits.shape[0]):
    if mask is None or mask[t]:
      x = np.asarray(logits[t], np.float64)
      m = x.max()
      vals.append((m + np.log(np.sum(np.exp(x - m)))) ** 2)
  return np.mean(vals) if vals else 0.0


def ref_moepp(probs, idx, n_ffn, tau, mask=None):
  t_all, e = probs.shape
  keep = [t for t in range(t_all) if mask is None or mask[t]]
  f = ref_load(idx[keep], e) / len(keep)
  p = np.asarray(probs, np.float64)[keep].mean(0)
  eta = np.array([1.0 if i < n_ffn else tau for i in range(e)])
  return np.sum(eta * f * p)


def ref_entropy(scores, mask=None):
  vals = []
  for t in range(scores.shape[0]):
    if mask is None or mask[t]:
      p = np.asarray(scores[t], np.float64) / np.sum(scores[t], dtype=np.float64)
      vals.append(-sum(pi * np.log(pi) for pi in p if pi > 0))
  return np.mean(vals) if vals else 0.0


def ref_update_bias(bias, load, rate, rule):
  mean = np.mean(load)
  out = np.array(bias, np.float64)
  for i in range(len(load)):
    e = mean - load[i]
    out[i] += rate * (np.sign(e) if rule == "sign" else e / mean)
  return out


def _random_routing(rng, t, e, k, score_fn="softmax"):
  """Scores and their (unbiased) top-k, computed with numpy."""
  logits = rng.normal(size=(t, e))
  if score_fn == "softmax":
    s = np.exp(logits - logits.max(-1, keepdims=True))
    s /= s.sum(-1, keepdims=True)
  else:
    s = 1 / (1 + np.exp(-logits))
  idx = np.argsort(-s, axis=-1, kind="stable")[:, :k]
  return s.astype(np.float32), idx.astype(np.int32), logits.astype(np.float32)


TEK = [(16, 8, 1), (24, 8, 2), (20, 16, 4), (12, 16, 8), (9, 4, 4)]


# ----- tokens_per_expert -----

@pytest.mark.parametrize("t,e,k", TEK)
def test_tokens_per_expert_matches_reference(t, e, k):
  rng = np.random.default_rng(t + e + k)
  _, idx, _ = _random_routing(rng, t, e, k)
  mask = rng.random(t) > 0.3
  for m in (None, mask):
    load = tokens_per_expert(idx, e, m)
    assert load.dtype == jnp.float32
    np.testing.assert_array_equal(load, ref_load(idx, e, m))
  assert float(tokens_per_expert(idx, e, mask).sum()) == k * mask.sum()


def test_tokens_per_expert_ignores_out_of_range_ids():
  idx = np.array([[0, 4], [5, 1], [-1, 1], [3, 3]], np.int32)  # E=4: ids 4, 5, -1 are not counted
  np.testing.assert_array_equal(tokens_per_expert(idx, 4), [1, 2, 0, 2])
  np.testing.assert_array_equal(tokens_per_expert(idx, 4, np.array([1, 1, 0, 1], bool)),
                                [1, 1, 0, 2])


# ----- Switch aux loss -----

@pytest.mark.parametrize("t,e,k", TEK)
@pytest.mark.parametrize("score_fn", ["softmax", "sigmoid"])
def test_switch_aux_loss_matches_reference(t, e, k, score_fn):
  rng = np.random.default_rng(t * k)
  s, idx, _ = _random_routing(rng, t, e, k, score_fn)
  mask = rng.random(t) > 0.3
  fn = switch_aux_loss
  np.testing.assert_allclose(fn(s, idx, e), ref_switch(s, idx), rtol=1e-5)
  np.testing.assert_allclose(fn(s, idx, e, mask), ref_switch(s, idx, mask), rtol=1e-5)
  # Masked tokens count nowhere: same value as dropping them.
  np.testing.assert_allclose(fn(s, idx, e, mask), fn(s[mask], idx[mask], e), rtol=1e-6)


@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_switch_aux_loss_uniform_routing_is_one(k):
  e, t = 8, 16
  scores = np.full((t, e), 1.0 / e, np.float32)
  idx = (np.arange(t * k).reshape(t, k) % e).astype(np.int32)  # every expert gets t*k/e picks
  np.testing.assert_allclose(switch_aux_loss(scores, idx, e), 1.0, rtol=1e-6)
  collapsed = np.zeros((t, k), np.int32) + np.arange(k, dtype=np.int32)
  peaked = np.full((t, e), 0.0, np.float32)
  peaked[:, :k] = 1.0 / k
  assert float(switch_aux_loss(peaked, collapsed, e)) == pytest.approx(e / k, rel=1e-6)


def test_switch_aux_loss_gradient_and_empty_mask():
  rng = np.random.default_rng(7)
  t, e, k = 10, 8, 2
  s, idx, _ = _random_routing(rng, t, e, k)
  mask = rng.random(t) > 0.4
  g = jax.grad(switch_aux_loss)(s, idx, e, mask)
  f = ref_load(idx, e, mask) / (mask.sum() * k)
  np.testing.assert_allclose(g, e * f[None, :] * mask[:, None] / mask.sum(), rtol=1e-5, atol=1e-8)
  assert float(switch_aux_loss(s, idx, e, np.zeros(t, bool))) == 0.0


# ----- DeepSeek-V3 sequence-wise loss -----

@pytest.mark.parametrize("b,l,e,k", [(2, 8, 8, 1), (3, 6, 8, 2), (2, 10, 16, 4), (2, 5, 16, 8)])
def test_seq_aux_loss_matches_reference(b, l, e, k):
  rng = np.random.default_rng(b * l + k)
  s, idx, _ = _random_routing(rng, b * l, e, k, "sigmoid")
  s, idx = s.reshape(b, l, e), idx.reshape(b, l, k)
  mask = rng.random((b, l)) > 0.3
  mask[0] = False  # a fully padded sequence does not take part in the mean
  fn = seq_aux_loss
  np.testing.assert_allclose(fn(s, idx), ref_seq(s, idx), rtol=1e-5)
  np.testing.assert_allclose(fn(s, idx, mask), ref_seq(s, idx, mask), rtol=1e-5)
  one = fn(s[1:2, mask[1]], idx[1:2, mask[1]])  # dropping the masked tokens of sequence 1
  np.testing.assert_allclose(fn(s[1:2], idx[1:2], mask[1:2]), one, rtol=1e-6)


def test_seq_aux_loss_is_per_sequence_and_uniform_is_one():
  e, k, l = 4, 2, 4
  uniform = np.full((1, l, e), 0.3, np.float32)  # equal sigmoid scores -> s' = 1/E
  spread = (np.arange(l * k).reshape(1, l, k) % e).astype(np.int32)
  np.testing.assert_allclose(seq_aux_loss(uniform, spread), 1.0, rtol=1e-6)
  # Two sequences each fully collapsed on different experts: balanced over the batch (Switch
  # loss 1.0) but not within each sequence (DeepSeek-V3 loss E/K = 2.0).
  idx = np.stack([np.tile([[0, 1]], (l, 1)), np.tile([[2, 3]], (l, 1))]).astype(np.int32)
  scores = np.zeros((2, l, e), np.float32)
  scores[0, :, :2] = scores[1, :, 2:] = 0.5
  np.testing.assert_allclose(seq_aux_loss(scores, idx), 2.0, rtol=1e-6)
  np.testing.assert_allclose(
      switch_aux_loss(scores.reshape(-1, e), idx.reshape(-1, k), e), 1.0, rtol=1e-6)


# ----- z-loss -----

def test_z_loss_matches_reference_and_is_stable():
  rng = np.random.default_rng(8)
  logits = (rng.normal(size=(12, 8)) * 3).astype(np.float32)
  mask = rng.random(12) > 0.3
  np.testing.assert_allclose(z_loss(logits), ref_z(logits), rtol=1e-5)
  np.testing.assert_allclose(z_loss(logits, mask), ref_z(logits, mask), rtol=1e-5)
  big = np.full((3, 8), 100.0, np.float32)
  np.testing.assert_allclose(z_loss(jnp.asarray(big, jnp.bfloat16)),
                             (100 + np.log(8)) ** 2, rtol=1e-5)
  assert float(z_loss(logits, np.zeros(12, bool))) == 0.0


# ----- MoE++ heterogeneous loss -----

@pytest.mark.parametrize("n_ffn,n_zc,k", [(8, 4, 2), (4, 2, 1), (16, 4, 2), (6, 0, 2)])
def test_moepp_loss_matches_reference(n_ffn, n_zc, k):
  rng = np.random.default_rng(n_ffn + n_zc)
  e = n_ffn + n_zc
  p, idx, _ = _random_routing(rng, 20, e, k)
  mask = rng.random(20) > 0.25
  for tau in (0.75, 1.0):
    np.testing.assert_allclose(moepp_loss(p, idx, n_ffn, tau),
                               ref_moepp(p, idx, n_ffn, tau), rtol=1e-5)
    np.testing.assert_allclose(moepp_loss(p, idx, n_ffn, tau, mask),
                               ref_moepp(p, idx, n_ffn, tau, mask), rtol=1e-5)
  # tau = 1 is the plain f.P sum, i.e. the Switch loss / (E*K) with this f normalisation.
  np.testing.assert_allclose(moepp_loss(p, idx, n_ffn, 1.0),
                             switch_aux_loss(p, idx, e) * k / e, rtol=1e-5)


def test_moepp_loss_weights_zero_computation_experts_by_tau():
  probs = np.full((4, 4), 0.25, np.float32)
  idx = np.array([[3], [3], [3], [3]], np.int32)  # everything to the ZC expert 3
  # f_3 = 1, P_3 = 0.25 -> tau * 0.25
  np.testing.assert_allclose(moepp_loss(probs, idx, 3, 0.75), 0.75 * 0.25, rtol=1e-6)
  np.testing.assert_allclose(moepp_loss(probs, idx * 0, 3, 0.75), 0.25, rtol=1e-6)
  with pytest.raises(ValueError, match="num_ffn_experts"):
    moepp_loss(probs, idx, 5, 0.75)


# ----- MaxVio, entropy -----

def test_max_violation():
  np.testing.assert_allclose(max_violation(np.array([4.0, 4, 4, 4])), 0.0)
  np.testing.assert_allclose(max_violation(np.array([8.0, 0, 4, 4])), 1.0)
  np.testing.assert_allclose(max_violation(np.array([16.0, 0, 0, 0])), 3.0)
  load = np.random.default_rng(9).integers(0, 20, size=(3, 8)).astype(np.float32)
  ref = [(row.max() - row.mean()) / row.mean() for row in load]
  np.testing.assert_allclose(max_violation(load), ref, rtol=1e-6)
  assert float(max_violation(np.zeros(4))) == 0.0


@pytest.mark.parametrize("score_fn", ["softmax", "sigmoid"])
def test_router_entropy_matches_reference(score_fn):
  rng = np.random.default_rng(10)
  s, _, _ = _random_routing(rng, 12, 8, 2, score_fn)
  mask = rng.random(12) > 0.3
  np.testing.assert_allclose(router_entropy(s), ref_entropy(s), rtol=1e-5)
  np.testing.assert_allclose(router_entropy(s, mask), ref_entropy(s, mask), rtol=1e-5)


def test_router_entropy_limits():
  np.testing.assert_allclose(router_entropy(np.full((3, 8), 0.125, np.float32)),
                             np.log(8), rtol=1e-6)
  one_hot = np.eye(8, dtype=np.float32)[[1, 5]]
  assert float(router_entropy(one_hot)) == 0.0
  g = jax.grad(router_entropy)(jnp.asarray(one_hot) * 0.9 + 0.0125)
  assert np.isfinite(np.asarray(g)).all()


# ----- bias update -----

def test_update_bias_sign_rule():
  bias = np.zeros(4, np.float32)
  load = np.array([10.0, 2.0, 4.0, 4.0])  # mean 5: expert 0 overloaded, 1-3 underloaded
  new = np.asarray(balance.update_bias(bias, load, 0.001))
  np.testing.assert_allclose(new, [-0.001, 0.001, 0.001, 0.001], rtol=1e-6)
  assert new[0] < bias[0]  # the overloaded expert's bias goes down
  same = balance.update_bias(bias + 0.3, np.array([3.0, 3.0, 3.0, 3.0]), 0.001)
  np.testing.assert_array_equal(same, bias + 0.3)  # sign(0) = 0: balanced -> unchanged


@pytest.mark.parametrize("rule", ["sign", "error"])
def test_update_bias_matches_reference(rule):
  rng = np.random.default_rng(11)
  bias = rng.normal(size=16).astype(np.float32) * 0.01
  load = rng.integers(0, 30, size=16).astype(np.float32)
  load[3] = load.mean()  # an exactly balanced expert
  rate = jnp.float32(1e-3)  # traced under jit, as with a schedule
  new = jax.jit(functools.partial(balance.update_bias, rule=rule))(bias, load, rate)
  np.testing.assert_allclose(new, ref_update_bias(bias, load, 1e-3, rule), rtol=1e-5, atol=1e-9)
  assert new.dtype == jnp.float32
  assert balance.update_bias(jnp.zeros(16, jnp.bfloat16), load, 1e-3, rule).dtype == jnp.bfloat16


def test_update_bias_bad_input():
  with pytest.raises(ValueError, match="rule"):
    balance.update_bias(np.zeros(4), np.ones(4), 1e-3, rule="sgd")
  with pytest.raises(ValueError, match="load_E"):
    balance.update_bias(np.zeros(4), np.ones(5), 1e-3)


def test_loss_free_balancing_reduces_max_violation():
  """ALF-LB Algorithm 1 end to end: with a router skewed towards a few experts, repeated sign
  updates of the bias (selection only) bring MaxVio down while the gates stay unbiased."""
  rng = np.random.default_rng(12)
  t, e, k = 256, 8, 2
  logits = (rng.normal(size=(t, e)) + np.linspace(2.0, -2.0, e)).astype(np.float32)
  route = jax.jit(functools.partial(routing.route, top_k=k, score_fn="sigmoid", renormalize=True))

  @jax.jit
  def step(bias):
    r = route(logits, bias)
    load = tokens_per_expert(r.expert_idx_TxK, e)
    return balance.update_bias(bias, load, 0.02), max_violation(load)

  bias = jnp.zeros(e, jnp.float32)
  vios = []
  for _ in range(150):
    bias, vio = step(bias)
    vios.append(float(vio))
  assert vios[0] > 1.5
  assert max(vios[-20:]) < 0.3
  assert float(bias[0]) < 0 < float(bias[-1])  # the favoured expert is pushed down


def test_mask_shape_and_expert_count_are_checked():
  s = np.full((4, 8), 0.125, np.float32)
  idx = np.zeros((4, 2), np.int32)
  with pytest.raises(ValueError, match="token_mask_T"):
    switch_aux_loss(s, idx, 8, np.ones(5, bool))
  with pytest.raises(ValueError, match="num_experts=6"):
    switch_aux_loss(s, idx, 6)
  with pytest.raises(ValueError, match="seq_aux_loss"):
    seq_aux_loss(s, idx)
