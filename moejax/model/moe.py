"""The MoE feed-forward layer: router, routed SwiGLU experts, shared experts, MoE++ experts, aux.

    y_t = sum_{i<N_s} FFN^(s)_i(x_t) + sum_k g_{t,k} E_{e_{t,k}}(x_t)

(DeepSeekMoE arXiv 2401.06066 §3 / DeepSeek-V3 arXiv 2412.19437 Eq. 12; the residual is added by the
block). Routed experts are ordered [FFN x E] + [const] + [copy] + [zero] (MoE++ arXiv 2410.07348).

- Router (`MoELayer.route`, the one place a fused router kernel would replace): fp32 logits
  x W_r (Switch arXiv 2101.03961 "selective precision"), plus the MoE++ gating residual
  prev_logits W_g (Eq. 6); in training, multiplicative jitter U(1-eps, 1+eps) on the router input
  (Switch) and expert dropout (a random expert mask); then `routing.route` with the ALF-LB bias
  (arXiv 2408.15664 Eq. 3) under `stop_gradient`.
- Routed FFN experts through `dispatch.dropless` (sort + grouped matmul, `cfg.impl` ops) or
  `dispatch.capacity` (GShard arXiv 2006.16668 capacity with first-choice priority; with MoE++
  experts, the heterogeneous capacities of Eqs. 8-9 with gamma = capacity_factor).
- Balance losses and metrics from `moejax.model.balance`, returned raw in `aux`; `balance_loss` is
  sum over cfg.balance of coefficient x loss ('alf_lb' adds no loss: the trainer updates the
  `RouterBias` from `aux["tokens_per_expert"]`).

Tokens with token_mask == False (padding) are routed to no expert (their routed output is 0; shared
experts still run) and are left out of every statistic.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from moejax import sharding
from moejax.kernels import get_ops
from moejax.model import balance, dispatch, moepp, routing
from moejax.model.config import ModelConfig
from moejax.model.layers import MLP, dtype_of, normal_param

AUX_KEYS = ("tokens_per_expert", "aux_loss", "seq_aux_loss", "z_loss", "moepp_loss",
            "balance_loss", "max_vio", "dropped_fraction", "router_entropy")


def _expert_parallel(impl: str):
  """`moejax.parallel.expert_parallel.ep_experts` bound to the active mesh when its expert axis is
  > 1 (shard_map all-to-all EP), else None: the single-device path."""
  if sharding.active() is None:
    return None
  from moejax.parallel import expert_parallel  # pylint: disable=import-outside-toplevel
  plan = expert_parallel.plan_from_active()
  return None if plan is None else functools.partial(expert_parallel.ep_experts, plan=plan, impl=impl)


class RouterBias(nnx.Variable):
  """ALF-LB / DeepSeek-V3 selection bias b_E (arXiv 2408.15664 Eq. 3). Not an `nnx.Param`: it gets
  no gradient and no optimizer state; the trainer updates it with `balance.update_bias`."""


class Router(nnx.Module):
  """Linear router W_r [D, E_routed], always fp32 (param `w_DxE`)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.w_DxE = normal_param(rngs, (cfg.d_model, cfg.num_routed), ("embed", "expert"), cfg,
                              dtype="float32")

  def __call__(self, x_TxD: jax.Array) -> jax.Array:
    return jnp.dot(x_TxD.astype(jnp.float32), self.w_DxE[...], precision=jax.lax.Precision.HIGHEST)


def _stream_key(rngs: nnx.Rngs | None, what: str) -> jax.Array:
  if rngs is None:
    raise ValueError(f"MoELayer: {what} is on (deterministic=False) but no `rngs` was given")
  for name in ("router", "dropout", "default"):
    if name in rngs:
      return rngs[name]()
  raise ValueError(f"MoELayer: {what} needs an nnx.Rngs with a 'router', 'dropout' or default stream")


class MoELayer(nnx.Module):
  """Mixture-of-Experts FFN; see the module docstring. Call signature per docs/design.md."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    if not isinstance(cfg, ModelConfig):
      raise TypeError(f"MoELayer: cfg must be a ModelConfig, got {type(cfg).__name__}")
    if cfg.num_experts <= 0:
      raise ValueError(f"MoELayer: model.num_experts={cfg.num_experts}: expected > 0 for an MoE layer")
    self.cfg = cfg
    e, e_routed, d, f = cfg.num_experts, cfg.num_routed, cfg.d_model, cfg.expert_hidden
    self.router = Router(cfg, rngs=rngs)
    self.gate_residual_ExE = (normal_param(rngs, (e_routed, e_routed), (None, None), cfg,
                                           dtype="float32") if cfg.gating_residual else None)
    self.router_bias_E = (RouterBias(jnp.zeros((e_routed,), jnp.float32), axes=(None,))
                          if cfg.uses("alf_lb") else None)
    self.w_gate_EDF = normal_param(rngs, (e, d, f), ("expert", "embed", "mlp"), cfg)
    self.w_up_EDF = normal_param(rngs, (e, d, f), ("expert", "embed", "mlp"), cfg)
    self.w_down_EFD = normal_param(rngs, (e, f, d), ("expert", "mlp", "embed"), cfg)
    self.shared = (MLP(d, cfg.num_shared_experts * f, cfg, rngs=rngs)
                   if cfg.num_shared_experts else None)
    n = cfg.num_const_experts
    self.const_w_NxDx2 = normal_param(rngs, (n, d, 2), (None, "embed", None), cfg) if n else None
    self.const_v_NxD = normal_param(rngs, (n, d), (None, "embed"), cfg) if n else None

  # ----- routing (single entry point) -----
  def route(self, x_TxD: jax.Array, prev_logits_TxE: jax.Array | None = None, *,
            deterministic: bool = True,
            rngs: nnx.Rngs | None = None) -> tuple[jax.Array, routing.Routing]:
    """Router logits (fp32, incl. gating residual; returned for the next layer) and the Routing."""
    cfg = self.cfg
    t = x_TxD.shape[0]
    x_router = x_TxD.astype(jnp.float32)
    if not deterministic and cfg.router_jitter > 0:
      eps = cfg.router_jitter
      x_router = x_router * jax.random.uniform(_stream_key(rngs, "router_jitter"), x_router.shape,
                                               jnp.float32, 1.0 - eps, 1.0 + eps)
    logits_TxE = self.router(x_router)
    if self.gate_residual_ExE is not None:
      logits_TxE = moepp.gating_residual(logits_TxE, prev_logits_TxE, self.gate_residual_ExE[...])
    expert_mask_TxE = None
    if not deterministic and cfg.expert_dropout > 0:
      expert_mask_TxE = jax.random.bernoulli(_stream_key(rngs, "expert_dropout"),
                                             1.0 - cfg.expert_dropout, (t, cfg.num_routed))
    bias_E = (None if self.router_bias_E is None
              else jax.lax.stop_gradient(self.router_bias_E[...].astype(jnp.float32)))
    ops = get_ops(cfg.impl)
    if hasattr(ops, "route") and expert_mask_TxE is None and cfg.n_groups == 0:
      # Fused Pallas router (moejax.kernels.router): same selection, gates and gradients.
      idx_TxK, gates_TxK, scores_TxE, _, _ = ops.route(
          logits_TxE, bias_E, top_k=cfg.top_k, score_fn=cfg.score_fn,
          renormalize=cfg.renormalize, routed_scaling_factor=cfg.routed_scaling_factor)
      unbiased_TxK = idx_TxK if bias_E is None else routing.top_k(scores_TxE, cfg.top_k)[1]
      return logits_TxE, routing.Routing(scores_TxE, idx_TxK, gates_TxK, unbiased_TxK)
    r = routing.route(logits_TxE, bias_E, top_k=cfg.top_k, score_fn=cfg.score_fn,
                      renormalize=cfg.renormalize, routed_scaling_factor=cfg.routed_scaling_factor,
                      n_groups=cfg.n_groups, topk_groups=cfg.topk_groups,
                      expert_mask_TxE=expert_mask_TxE)
    return logits_TxE, r

  # ----- forward -----
  def __call__(self, x_BxLxD: jax.Array, *, prev_logits_BxLxE: jax.Array | None = None,
               token_mask_BxL: jax.Array | None = None, deterministic: bool = True,
               rngs: nnx.Rngs | None = None):
    cfg = self.cfg
    if x_BxLxD.ndim != 3 or x_BxLxD.shape[-1] != cfg.d_model:
      raise ValueError(f"MoELayer: expected x of shape [B, L, d_model={cfg.d_model}], "
                       f"got {x_BxLxD.shape}")
    b, l, d = x_BxLxD.shape
    t, k, e, e_routed = b * l, cfg.top_k, cfg.num_experts, cfg.num_routed
    if token_mask_BxL is not None and token_mask_BxL.shape != (b, l):
      raise ValueError(f"MoELayer: token_mask shape {token_mask_BxL.shape} != [B, L] = {(b, l)}")
    if prev_logits_BxLxE is not None and prev_logits_BxLxE.shape != (b, l, e_routed):
      raise ValueError(f"MoELayer: prev_logits shape {prev_logits_BxLxE.shape}, expected "
                       f"{(b, l, e_routed)}")
    dt = dtype_of(cfg.compute_dtype)
    x_TxD = x_BxLxD.reshape(t, d)
    prev_TxE = None if prev_logits_BxLxE is None else prev_logits_BxLxE.reshape(t, e_routed)
    logits_TxE, r = self.route(x_TxD, prev_TxE, deterministic=deterministic, rngs=rngs)

    mask_T = None if token_mask_BxL is None else token_mask_BxL.reshape(t).astype(bool)
    idx_TxK = r.expert_idx_TxK
    if mask_T is not None:  # padding goes to the sentinel id e_routed: no expert, no capacity.
      idx_TxK = jnp.where(mask_T[:, None], idx_TxK, e_routed)
    gates_TxK = r.gates_TxK.astype(jnp.float32)
    x_c = x_TxD.astype(dt)
    weights = (self.w_gate_EDF[...].astype(dt), self.w_up_EDF[...].astype(dt),
               self.w_down_EFD[...].astype(dt))

    dropped_fraction = jnp.zeros((), jnp.float32)
    zc_gates_TxK = gates_TxK
    ep = _expert_parallel(cfg.impl)   # None unless a mesh with an expert axis > 1 is active.
    if cfg.dispatch == "dropless" and ep is not None:
      y_TxD, _, _ = ep(x_c, idx_TxK, gates_TxK, *weights)
    elif cfg.dispatch == "dropless":
      y_TxD = dispatch.dropless(x_c, idx_TxK, gates_TxK, *weights, get_ops(cfg.impl))
    else:
      if cfg.num_zc_experts:
        c_ffn, c_zc = moepp.heterogeneous_capacities(t, k, e, cfg.num_zc_experts, cfg.moepp_tau,
                                                     cfg.capacity_factor)
        caps_E = jnp.array([c_ffn] * e + [c_zc] * cfg.num_zc_experts, jnp.int32)
        zc_gates_TxK = jnp.where(dispatch.capacity_keep(idx_TxK, caps_E), gates_TxK, 0.0)
      else:
        c_ffn = dispatch.expert_capacity(t, k, e, cfg.capacity_factor)
      if ep is None:
        y_TxD, dropped_fraction = dispatch.capacity(x_c, idx_TxK, gates_TxK, *weights, c_ffn)
      else:  # each batch shard is one GShard group: the same capacity formula on its tokens.
        cap_fn = ((lambda tl: moepp.heterogeneous_capacities(tl, k, e, cfg.num_zc_experts,
                                                             cfg.moepp_tau, cfg.capacity_factor)[0])
                  if cfg.num_zc_experts else
                  (lambda tl: dispatch.expert_capacity(tl, k, e, cfg.capacity_factor)))
        y_TxD, dropped_fraction, _ = ep(x_c, idx_TxK, gates_TxK, *weights, mode="capacity",
                                        capacity_fn=cap_fn)
      if mask_T is not None:  # report per real (unmasked) copy.
        dropped_fraction = dropped_fraction * t / jnp.maximum(jnp.sum(mask_T), 1)
    if cfg.num_zc_experts:
      y_TxD = y_TxD + moepp.zero_computation_experts(
          x_c, idx_TxK, zc_gates_TxK, num_ffn=e, num_const=cfg.num_const_experts,
          num_copy=cfg.num_copy_experts,
          const_w_NxDx2=None if self.const_w_NxDx2 is None else self.const_w_NxDx2[...],
          const_v_NxD=None if self.const_v_NxD is None else self.const_v_NxD[...])
    if self.shared is not None:
      y_TxD = y_TxD + self.shared(x_c)
    y_BxLxD = sharding.constrain(y_TxD.astype(dt).reshape(b, l, d), ("batch", "length", "embed"))

    aux = self.aux(logits_TxE, r, mask_T, (b, l))
    aux["dropped_fraction"] = dropped_fraction.astype(jnp.float32)
    return y_BxLxD, aux, logits_TxE.reshape(b, l, e_routed)

  def aux(self, logits_TxE: jax.Array, r: routing.Routing, mask_T: jax.Array | None,
          batch_shape: tuple[int, int]) -> dict[str, jax.Array]:
    """Balance losses (raw), their weighted sum and the routing metrics, all fp32 (docs/design.md)."""
    cfg = self.cfg
    b, l = batch_shape
    e, e_routed, k = cfg.num_experts, cfg.num_routed, cfg.top_k
    zero = jnp.zeros((), jnp.float32)
    load_E = balance.tokens_per_expert(r.expert_idx_TxK, e_routed, mask_T)
    losses = {"aux_loss": zero, "seq_aux_loss": zero, "z_loss": zero, "moepp_loss": zero}
    if cfg.uses("aux_loss"):
      losses["aux_loss"] = balance.switch_aux_loss(r.scores_TxE, r.expert_idx_TxK, e_routed, mask_T)
    if cfg.uses("seq_aux_loss"):
      losses["seq_aux_loss"] = balance.seq_aux_loss(
          r.scores_TxE.reshape(b, l, e_routed), r.unbiased_idx_TxK.reshape(b, l, k),
          None if mask_T is None else mask_T.reshape(b, l))
    if cfg.uses("z_loss"):
      losses["z_loss"] = balance.z_loss(logits_TxE, mask_T)
    if cfg.uses("moepp_loss"):
      losses["moepp_loss"] = balance.moepp_loss(r.scores_TxE, r.expert_idx_TxK, e, cfg.moepp_tau,
                                                mask_T)
    coefs = {"aux_loss": cfg.aux_loss_coef, "seq_aux_loss": cfg.seq_aux_loss_coef,
             "z_loss": cfg.z_loss_coef, "moepp_loss": cfg.moepp_loss_coef}
    balance_loss = zero
    for name, coef in coefs.items():
      if cfg.uses(name):
        balance_loss = balance_loss + coef * losses[name]
    out = {"tokens_per_expert": load_E.astype(jnp.float32)}
    out.update({name: v.astype(jnp.float32) for name, v in losses.items()})
    out["balance_loss"] = balance_loss.astype(jnp.float32)
    # MaxVio over the FFN experts: zero-computation experts have different load targets (MoE++).
    out["max_vio"] = balance.max_violation(load_E[:e]).astype(jnp.float32)
    out["dropped_fraction"] = zero
    out["router_entropy"] = balance.router_entropy(r.scores_TxE, mask_T).astype(jnp.float32)
    return out
