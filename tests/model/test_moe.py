"""MoELayer and moepp against independent numpy references; RouterBias isolation; jit per config."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from moejax.model import dispatch, moepp
from moejax.model.config import ModelConfig
from moejax.model.layers import MLP
from moejax.model.moe import AUX_KEYS, MoELayer, RouterBias

B, L, D, F = 2, 12, 16, 8   # T = 24 tokens


pytestmark = pytest.mark.usefixtures("fast_compiles")   # tests/conftest.py


def _cfg(**kw):
  base = dict(vocab_size=64, d_model=D, num_layers=1, num_heads=2, ff_dim=32, expert_ff_dim=F,
              num_experts=4, top_k=2, compute_dtype="float32", param_dtype="float32",
              init_std=0.3, balance=("aux_loss",))
  base.update(kw)
  return ModelConfig(**base)


def _x(seed=0, b=B, l=L):
  return jax.random.normal(jax.random.key(seed), (b, l, D), jnp.float32)


@nnx.jit(static_argnames=("deterministic",))
def _fwd(layer, x, prev=None, mask=None, deterministic=True, rngs=None):
  """The layer under nnx.jit (one compilation per config: much faster than op-by-op on CPU)."""
  return layer(x, prev_logits_BxLxE=prev, token_mask_BxL=mask, deterministic=deterministic,
               rngs=rngs)


def _np(v):
  return np.asarray(v[...], np.float64)


# ----- numpy reference of the whole layer -----

def _np_swiglu(x, wg, wu, wd):
  g = x @ wg
  return ((g / (1.0 + np.exp(-g))) * (x @ wu)) @ wd


def _np_route(logits, cfg, bias=None):
  if cfg.score_fn == "softmax":
    z = np.exp(logits - logits.max(-1, keepdims=True))
    s = z / z.sum(-1, keepdims=True)
  else:
    s = 1.0 / (1.0 + np.exp(-logits))
  sel = s if bias is None else s + bias
  idx = np.argsort(-sel, axis=-1, kind="stable")[:, :cfg.top_k]
  g = np.take_along_axis(s, idx, -1)
  if cfg.renormalize:
    g = g / g.sum(-1, keepdims=True)
  return s, idx, g * cfg.routed_scaling_factor


def _np_gshard_keep(idx, caps):
  count = np.zeros(len(caps), np.int64)
  keep = np.zeros(idx.shape, bool)
  for k in range(idx.shape[1]):
    for t in range(idx.shape[0]):
      e = idx[t, k]
      if count[e] < caps[e]:
        keep[t, k] = True
        count[e] += 1
  return keep


def _np_layer(layer, x_BxLxD, prev=None, caps=None):
  """Per-token loop: sum_k gate * E_{e}(x) over [FFN][const][copy][zero] (+ shared experts)."""
  cfg = layer.cfg
  x = np.asarray(x_BxLxD, np.float64).reshape(-1, cfg.d_model)
  logits = x @ _np(layer.router.w_DxE)
  if prev is not None:
    logits = logits + np.asarray(prev, np.float64).reshape(x.shape[0], -1) @ _np(
        layer.gate_residual_ExE)
  bias = None if layer.router_bias_E is None else _np(layer.router_bias_E)
  _, idx, gates = _np_route(logits, cfg, bias)
  keep = np.ones(idx.shape, bool) if caps is None else _np_gshard_keep(idx, caps)
  e, nc, ncp = cfg.num_experts, cfg.num_const_experts, cfg.num_copy_experts
  wg, wu, wd = _np(layer.w_gate_EDF), _np(layer.w_up_EDF), _np(layer.w_down_EFD)
  y = np.zeros_like(x)
  for t in range(x.shape[0]):
    for k in range(cfg.top_k):
      i, g = idx[t, k], gates[t, k]
      if not keep[t, k]:
        continue
      if i < e:
        y[t] += g * _np_swiglu(x[t], wg[i], wu[i], wd[i])
      elif i < e + nc:
        a = x[t] @ _np(layer.const_w_NxDx2)[i - e]
        a = np.exp(a - a.max()) / np.exp(a - a.max()).sum()
        y[t] += g * (a[0] * x[t] + a[1] * _np(layer.const_v_NxD)[i - e])
      elif i < e + nc + ncp:
        y[t] += g * x[t]
  if layer.shared is not None:
    s = layer.shared
    y += _np_swiglu(x, _np(s.w_gate_DxF), _np(s.w_up_DxF), _np(s.w_down_FxD))
  return y.reshape(x_BxLxD.shape), logits, idx, keep


# ----- outputs -----

@pytest.mark.parametrize("kw", [
    dict(),
    dict(num_shared_experts=2, score_fn="sigmoid", routed_scaling_factor=2.5, n_groups=2,
         topk_groups=1, balance=("alf_lb", "seq_aux_loss")),
    dict(renormalize=False, top_k=3, balance=("z_loss",)),
], ids=["softmax", "v3_shared_sigmoid", "no_renorm"])
def test_layer_matches_numpy_loop(kw):
  cfg = _cfg(**kw)
  layer = MoELayer(cfg, rngs=nnx.Rngs(0))
  if layer.router_bias_E is not None:  # a nonzero bias must steer selection but not the gates.
    layer.router_bias_E[...] = jnp.array([0.0, 0.3, -0.2, 0.1])
  x = _x(1)
  if cfg.n_groups:  # group-limited routing is routing.py's job; compare without it here.
    layer.cfg = cfg.replace(n_groups=0, topk_groups=0)
  y, aux, logits = _fwd(layer, x)
  want, want_logits, _, _ = _np_layer(layer, x)
  assert y.shape == (B, L, D) and logits.shape == (B, L, cfg.num_routed)
  np.testing.assert_allclose(np.asarray(logits).reshape(-1, cfg.num_routed), want_logits,
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(y), want, rtol=1e-4, atol=1e-5)


def test_capacity_layer_equals_dropless_when_nothing_dropped():
  x = _x(2)
  dl = MoELayer(_cfg(num_shared_experts=1), rngs=nnx.Rngs(3))
  cap = MoELayer(_cfg(num_shared_experts=1, dispatch="capacity", capacity_factor=100.0),
                 rngs=nnx.Rngs(3))
  y_dl, aux_dl, _ = _fwd(dl, x)
  y_cap, aux_cap, _ = _fwd(cap, x)
  np.testing.assert_allclose(np.asarray(y_cap), np.asarray(y_dl), rtol=1e-5, atol=1e-6)
  assert float(aux_cap["dropped_fraction"]) == 0.0 == float(aux_dl["dropped_fraction"])


def test_capacity_layer_drops_like_gshard():
  cfg = _cfg(dispatch="capacity", capacity_factor=0.5)
  layer = MoELayer(cfg, rngs=nnx.Rngs(4))
  layer.router.w_DxE[...] = layer.router.w_DxE[...].at[:, 0].add(1.0)  # skew toward expert 0.
  x = _x(5)
  t = B * L
  c = dispatch.expert_capacity(t, cfg.top_k, cfg.num_experts, cfg.capacity_factor)
  want, _, _, keep = _np_layer(layer, x, caps=[c] * cfg.num_experts)
  assert not keep.all()
  y, aux, _ = _fwd(layer, x)
  np.testing.assert_allclose(np.asarray(y), want, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(float(aux["dropped_fraction"]), (~keep).sum() / (t * cfg.top_k),
                             rtol=1e-6)


def test_single_expert_top1_equals_dense_mlp():
  cfg = _cfg(num_experts=1, top_k=1, expert_ff_dim=F)
  layer = MoELayer(cfg, rngs=nnx.Rngs(6))
  mlp = MLP(D, F, cfg, rngs=nnx.Rngs(7))
  mlp.w_gate_DxF[...] = layer.w_gate_EDF[...][0]
  mlp.w_up_DxF[...] = layer.w_up_EDF[...][0]
  mlp.w_down_FxD[...] = layer.w_down_EFD[...][0]
  x = _x(8)
  for c in (cfg, cfg.replace(dispatch="capacity", capacity_factor=1.0)):
    layer.cfg = c
    y, aux, _ = _fwd(layer, x)
    np.testing.assert_allclose(np.asarray(y), np.asarray(mlp(x)), rtol=1e-5, atol=1e-6)
    assert float(aux["dropped_fraction"]) == 0.0


# ----- MoE++ -----

MOEPP = dict(num_experts=4, num_const_experts=2, num_copy_experts=1, num_zero_experts=1,
             balance=("moepp_loss",))


def test_zero_computation_experts_vs_numpy():
  rng = np.random.default_rng(0)
  t, e = 6, 3
  x = rng.standard_normal((t, D)).astype(np.float32)
  w = rng.standard_normal((2, D, 2)).astype(np.float32)
  v = rng.standard_normal((2, D)).astype(np.float32)
  # ids: 0..2 FFN, 3..4 const, 5 copy, 6 zero.
  idx = np.array([[0, 3], [4, 5], [6, 1], [5, 6], [3, 4], [2, 6]], np.int32)
  gates = rng.uniform(0.1, 1, (t, 2)).astype(np.float32)
  got = moepp.zero_computation_experts(jnp.asarray(x), jnp.asarray(idx), jnp.asarray(gates),
                                       num_ffn=e, num_const=2, num_copy=1,
                                       const_w_NxDx2=jnp.asarray(w), const_v_NxD=jnp.asarray(v))
  want = np.zeros((t, D))
  for i in range(t):
    for k in range(2):
      j = idx[i, k]
      if j in (3, 4):
        a = x[i] @ w[j - 3]
        a = np.exp(a) / np.exp(a).sum()
        want[i] += gates[i, k] * (a[0] * x[i] + a[1] * v[j - 3])
      elif j == 5:
        want[i] += gates[i, k] * x[i]
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(got)[3], gates[3, 0] * x[3], rtol=1e-6)


@pytest.mark.parametrize("mode", ["dropless", "capacity"])
def test_moepp_layer_vs_numpy_with_gating_residual(mode):
  cfg = _cfg(**MOEPP, gating_residual=True, dispatch=mode, capacity_factor=1.1, top_k=2)
  layer = MoELayer(cfg, rngs=nnx.Rngs(9))
  x = _x(10)
  prev = jax.random.normal(jax.random.key(11), (B, L, cfg.num_routed))
  caps = None
  if mode == "capacity":
    c_ffn, c_zc = moepp.heterogeneous_capacities(B * L, 2, 4, 4, cfg.moepp_tau, 1.1)
    # Eqs. 8-9 with T -> T*K = 48: tau*48*1.1/(0.75*4 + 4) and 48*1.1/7.
    assert (c_ffn, c_zc) == (6, 8)
    caps = [c_ffn] * 4 + [c_zc] * 4
  want, want_logits, idx, keep = _np_layer(layer, x, prev=prev, caps=caps)
  assert (idx >= 4).any(), "the test should route some copies to zero-computation experts"
  y, aux, logits = _fwd(layer, x, prev)
  np.testing.assert_allclose(np.asarray(logits).reshape(-1, 8), want_logits, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(y), want, rtol=1e-4, atol=1e-5)
  ffn_drops = ((~keep) & (idx < 4)).sum() / idx.size
  np.testing.assert_allclose(float(aux["dropped_fraction"]), ffn_drops, atol=1e-7)
  assert float(aux["moepp_loss"]) > 0


# ----- RouterBias -----

def test_router_bias_gets_no_gradient_and_no_optimizer_state():
  cfg = _cfg(balance=("alf_lb", "aux_loss"))
  layer = MoELayer(cfg, rngs=nnx.Rngs(12))
  assert isinstance(layer.router_bias_E, RouterBias)
  assert not isinstance(layer.router_bias_E, nnx.Param)
  path_names = lambda state: {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(state)}
  assert not any("router_bias" in p for p in path_names(nnx.state(layer, nnx.Param)))
  assert path_names(nnx.state(layer, RouterBias)) == {"router_bias_E"}
  assert MoELayer(_cfg(), rngs=nnx.Rngs(0)).router_bias_E is None  # only with 'alf_lb'.

  def loss_fn(model, x):
    y, aux, _ = model(x)
    return jnp.mean(y ** 2) + aux["balance_loss"]

  x = _x(13)
  grads = nnx.jit(nnx.grad(loss_fn))(layer, x)
  names = path_names(grads)
  assert "router/w_DxE" in names and not any("router_bias" in p for p in names)
  opt = nnx.Optimizer(layer, optax.adamw(1e-2), wrt=nnx.Param)
  assert not any("router_bias" in p for p in path_names(nnx.state(opt.opt_state)))
  layer.router_bias_E[...] = jnp.array([0.5, 0.0, 0.0, 0.0])
  w_before = np.asarray(layer.router.w_DxE[...]).copy()

  @nnx.jit
  def train_step(model, opt, x):
    opt.update(model, nnx.grad(loss_fn)(model, x))

  train_step(layer, opt, x)
  np.testing.assert_array_equal(np.asarray(layer.router_bias_E[...]), [0.5, 0.0, 0.0, 0.0])
  assert not np.allclose(np.asarray(layer.router.w_DxE[...]), w_before)


def test_router_bias_steers_selection_only():
  cfg = _cfg(balance=("alf_lb",))
  layer = MoELayer(cfg, rngs=nnx.Rngs(14))
  layer.router_bias_E[...] = jnp.array([0.0, 0.0, 0.0, 10.0])
  _, aux, _ = _fwd(layer, _x(15))
  load = np.asarray(aux["tokens_per_expert"])
  assert load[3] == B * L  # every token picks expert 3
  _, r = nnx.jit(lambda m, x: m.route(x))(layer, _x(15).reshape(-1, D))
  s = np.asarray(r.scores_TxE)
  np.testing.assert_allclose(np.asarray(r.gates_TxK),
                             np.take_along_axis(s, np.asarray(r.expert_idx_TxK), -1)
                             / np.take_along_axis(s, np.asarray(r.expert_idx_TxK), -1).sum(
                                 -1, keepdims=True), rtol=1e-5)


# ----- aux -----

def test_aux_values_and_token_mask():
  balance = ("aux_loss", "seq_aux_loss", "z_loss", "alf_lb")
  cfg = _cfg(balance=balance, num_zero_experts=1, num_copy_experts=1)
  layer = MoELayer(cfg, rngs=nnx.Rngs(16))
  x = _x(17)
  mask = jnp.ones((B, L), bool).at[1, 7:].set(False)
  y, aux, _ = _fwd(layer, x, mask=mask)
  assert set(aux) == set(AUX_KEYS)
  for k, v in aux.items():
    assert v.dtype == jnp.float32 and np.isfinite(np.asarray(v)).all(), k
  assert aux["tokens_per_expert"].shape == (cfg.num_routed,)
  assert float(aux["tokens_per_expert"].sum()) == (B * L - 5) * cfg.top_k
  assert float(aux["moepp_loss"]) == 0.0  # not enabled -> zero
  want = (cfg.aux_loss_coef * aux["aux_loss"] + cfg.seq_aux_loss_coef * aux["seq_aux_loss"]
          + cfg.z_loss_coef * aux["z_loss"])
  np.testing.assert_allclose(float(aux["balance_loss"]), float(want), rtol=1e-6)
  assert float(aux["aux_loss"]) > 0 and float(aux["z_loss"]) > 0 and float(aux["router_entropy"]) > 0
  # Masked tokens get no routed output; unmasked ones are unchanged by masking the others.
  np.testing.assert_array_equal(np.asarray(y)[1, 7:], 0.0)
  y_full, _, _ = _fwd(layer, x)
  np.testing.assert_allclose(np.asarray(y)[0], np.asarray(y_full)[0], rtol=1e-6)


def test_train_mode_noise_needs_rngs_and_changes_routing():
  cfg = _cfg(router_jitter=0.5, expert_dropout=0.3)
  layer = MoELayer(cfg, rngs=nnx.Rngs(18))
  x = _x(19)
  y_eval, _, l_eval = _fwd(layer, x)
  y_eval2, _, _ = _fwd(layer, x, deterministic=True, rngs=nnx.Rngs(5))
  np.testing.assert_array_equal(np.asarray(y_eval), np.asarray(y_eval2))
  with pytest.raises(ValueError, match="rngs"):
    layer(x, deterministic=False)
  y_tr, _, l_tr = _fwd(layer, x, deterministic=False, rngs=nnx.Rngs(dropout=1))
  assert not np.allclose(np.asarray(l_tr), np.asarray(l_eval))
  assert not np.allclose(np.asarray(y_tr), np.asarray(y_eval))


def test_bad_inputs_raise():
  layer = MoELayer(_cfg(), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="d_model"):
    layer(jnp.zeros((B, L, D + 1)))
  with pytest.raises(ValueError, match="token_mask"):
    layer(_x(), token_mask_BxL=jnp.ones((B, L + 1), bool))
  with pytest.raises(ValueError, match="num_experts"):
    MoELayer(_cfg(num_experts=0, top_k=1), rngs=nnx.Rngs(0))


# ----- jit per configuration -----

_COMBOS = list(itertools.product(
    ["dropless", "capacity"],
    ["plain", "alf_lb_seq", "moepp", "v3_groups_shared", "train_noise"]))


@pytest.mark.parametrize("mode,variant", _COMBOS, ids=[f"{m}-{v}" for m, v in _COMBOS])
def test_layer_runs_under_jit(mode, variant):
  kw = dict(dispatch=mode, compute_dtype="bfloat16")
  kw.update({
      "plain": dict(balance=("aux_loss", "z_loss")),
      "alf_lb_seq": dict(balance=("alf_lb", "seq_aux_loss"), score_fn="sigmoid"),
      "moepp": dict(MOEPP, gating_residual=True),
      "v3_groups_shared": dict(num_experts=8, top_k=3, n_groups=4, topk_groups=2,
                               num_shared_experts=1, score_fn="sigmoid", routed_scaling_factor=2.5,
                               balance=("alf_lb",)),
      "train_noise": dict(router_jitter=0.1, expert_dropout=0.2),
  }[variant])
  cfg = _cfg(**kw)
  layer = MoELayer(cfg, rngs=nnx.Rngs(20))
  train = variant == "train_noise"
  prev = jnp.zeros((B, L, cfg.num_routed)) if cfg.gating_residual else None

  @nnx.jit
  def f(model, x, rngs):
    return model(x, prev_logits_BxLxE=prev, token_mask_BxL=jnp.ones((B, L), bool),
                 deterministic=not train, rngs=rngs)

  y, aux, logits = f(layer, _x(21), nnx.Rngs(22))
  assert y.shape == (B, L, D) and y.dtype == jnp.bfloat16
  assert logits.dtype == jnp.float32
  assert np.isfinite(np.asarray(y, np.float32)).all()
  for k in AUX_KEYS:
    assert np.isfinite(np.asarray(aux[k])).all(), k
  np.testing.assert_allclose(float(aux["tokens_per_expert"].sum()), B * L * cfg.top_k)
