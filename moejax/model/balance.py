"""Load-balancing math: expert loads, balance losses, router metrics and the ALF-LB bias update.

Pure `jax.numpy` functions (no Flax), jit-able, fp32 internally. Every loss returns an *unscaled*
fp32 scalar; the MoE layer multiplies it by its coefficient. A `token_mask` (True/1 = real token)
removes a token from every count, mean and normaliser: masked tokens count nowhere. Means over zero
real tokens are defined as 0.

Papers (equation numbers as in each paper):
  Switch Transformer, arXiv 2101.03961 (Sec. 2.2, Eqs. 4-6); GShard, arXiv 2006.16668 (Alg. 1).
  ALF-LB (auxiliary-loss-free balancing), arXiv 2408.15664: Eq. 2 (loss baseline), Eq. 4 (MaxVio),
    Algorithm 1 (bias update).
  DeepSeek-V3, arXiv 2412.19437: Eqs. 17-20 (complementary sequence-wise balance loss).
  ST-MoE, arXiv 2202.08906: Eq. 5 (router z-loss).
  MoE++, arXiv 2410.07348: Eq. 7 (heterogeneous load balance loss).

Shapes are named by suffix: B batch, L length, T tokens, E experts, K top-k.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

BIAS_UPDATE_RULES = ("sign", "error")


def _token_weights(token_mask, shape, name: str) -> jax.Array:
  """fp32 weights of shape `shape` (1 = counted); all ones when no mask is given."""
  if token_mask is None:
    return jnp.ones(shape, jnp.float32)
  token_mask = jnp.asarray(token_mask)
  if token_mask.shape != tuple(shape):
    raise ValueError(f"{name}: expected shape {tuple(shape)}, got {token_mask.shape}")
  return token_mask.astype(jnp.float32)


def _check_experts(scores_TxE: jax.Array, num_experts: int, name: str) -> None:
  if scores_TxE.shape[-1] != num_experts:
    raise ValueError(f"{name}: expected the last axis to have num_experts={num_experts} entries, "
                     f"got shape {scores_TxE.shape}")


def _safe_div(num: jax.Array, den: jax.Array) -> jax.Array:
  """num / den, and 0 where den == 0 (no real tokens)."""
  return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0)


def tokens_per_expert(expert_idx_TxK: jax.Array, num_experts: int,
                      token_mask_T: Optional[jax.Array] = None) -> jax.Array:
  """load_E: how many (token, choice) pairs picked each expert, counting real tokens only (fp32).

  This is c_i of ALF-LB Algorithm 1 (arXiv 2408.15664). Ids outside [0, num_experts) — e.g. MoE++
  zero-computation experts when `num_experts` counts only FFN experts — are not counted. Leading
  dimensions of `expert_idx` are flattened ([..., K]; the mask then has shape [...]).
  """
  expert_idx_TxK = jnp.asarray(expert_idx_TxK)
  weights = _token_weights(token_mask_T, expert_idx_TxK.shape[:-1], "token_mask_T")
  weights_TxK = jnp.broadcast_to(weights[..., None], expert_idx_TxK.shape)
  idx_M = expert_idx_TxK.reshape(-1).astype(jnp.int32)
  idx_M = jnp.where((idx_M >= 0) & (idx_M < num_experts), idx_M, num_experts)
  load_E = jnp.zeros((num_experts,), jnp.float32)
  return load_E.at[idx_M].add(weights_TxK.reshape(-1), mode="drop")


def switch_aux_loss(scores_TxE: jax.Array, expert_idx_TxK: jax.Array, num_experts: int,
                    token_mask_T: Optional[jax.Array] = None) -> jax.Array:
  """Switch/GShard load-balancing loss E * sum_i f_i P_i (arXiv 2101.03961 Eqs. 4-6; the same
  f.P loss is ALF-LB arXiv 2408.15664 Eq. 2 and DeepSeekMoE arXiv 2401.06066 L_ExpBal).

  f_i = load_i / (T*K) (fraction of the T*K choices sent to expert i; non-differentiable),
  P_i = (1/T) sum_t s_{i,t} (differentiable), T = number of real tokens. Uniform routing gives
  exactly 1.0 for any K. Scores are used as given (softmax probabilities, or raw sigmoid scores).
  """
  scores_TxE = jnp.asarray(scores_TxE).astype(jnp.float32)
  _check_experts(scores_TxE, num_experts, "switch_aux_loss: scores_TxE")
  k = expert_idx_TxK.shape[-1]
  weights_T = _token_weights(token_mask_T, scores_TxE.shape[:-1], "token_mask_T")
  n_tokens = weights_T.sum()
  load_E = tokens_per_expert(expert_idx_TxK, num_experts, token_mask_T)
  f_E = _safe_div(load_E, n_tokens * k)
  p_E = _safe_div(jnp.einsum("...e,...->e", scores_TxE, weights_T), n_tokens)
  return num_experts * jnp.sum(f_E * p_E)


def seq_aux_loss(scores_BxLxE: jax.Array, unbiased_idx_BxLxK: jax.Array,
                 token_mask_BxL: Optional[jax.Array] = None) -> jax.Array:
  """DeepSeek-V3 complementary sequence-wise balance loss (arXiv 2412.19437 Eqs. 17-20).

  Per sequence with L real tokens, N_r = E experts and K_r = K picks:
    f_i = N_r / (K_r L) * sum_t 1(s_{i,t} in Topk(s_t, K_r))   (Eq. 18, the *unbiased* top-k),
    s'_{i,t} = s_{i,t} / sum_j s_{j,t}                          (Eq. 19, over all routed experts),
    P_i = (1/L) sum_t s'_{i,t}                                  (Eq. 20),
    L_Bal = sum_i f_i P_i                                       (Eq. 17, without alpha).
  The paper does not say how sequences are aggregated; we average over the sequences that have at
  least one real token. Uniform routing gives 1.0.
  """
  scores_BxLxE = jnp.asarray(scores_BxLxE).astype(jnp.float32)
  if scores_BxLxE.ndim != 3 or unbiased_idx_BxLxK.ndim != 3:
    raise ValueError("seq_aux_loss: expected scores_BxLxE [B, L, E] and unbiased_idx_BxLxK "
                     f"[B, L, K], got {scores_BxLxE.shape} and {unbiased_idx_BxLxK.shape}")
  if unbiased_idx_BxLxK.shape[:2] != scores_BxLxE.shape[:2]:
    raise ValueError(f"seq_aux_loss: unbiased_idx_BxLxK shape {unbiased_idx_BxLxK.shape} does not "
                     f"match scores_BxLxE {scores_BxLxE.shape} in [B, L]")
  num_experts = scores_BxLxE.shape[-1]
  k = unbiased_idx_BxLxK.shape[-1]
  weights_BxL = _token_weights(token_mask_BxL, scores_BxLxE.shape[:2], "token_mask_BxL")
  n_tokens_B = weights_BxL.sum(axis=1)
  counts_BxE = jax.vmap(lambda idx, w: tokens_per_expert(idx, num_experts, w))(
      unbiased_idx_BxLxK, weights_BxL)
  f_BxE = _safe_div(num_experts * counts_BxE, k * n_tokens_B[:, None])
  normed_BxLxE = scores_BxLxE / (scores_BxLxE.sum(axis=-1, keepdims=True) + 1e-20)
  p_BxE = _safe_div(jnp.einsum("ble,bl->be", normed_BxLxE, weights_BxL), n_tokens_B[:, None])
  per_seq_B = jnp.sum(f_BxE * p_BxE, axis=-1)
  has_tokens_B = (n_tokens_B > 0).astype(jnp.float32)
  return _safe_div(jnp.sum(per_seq_B * has_tokens_B), has_tokens_B.sum())


def z_loss(logits_TxE: jax.Array, token_mask_T: Optional[jax.Array] = None) -> jax.Array:
  """Router z-loss (1/T) sum_t (log sum_j exp x_{j,t})^2 in fp32 (ST-MoE arXiv 2202.08906 Eq. 5)."""
  logits_TxE = jnp.asarray(logits_TxE).astype(jnp.float32)
  weights_T = _token_weights(token_mask_T, logits_TxE.shape[:-1], "token_mask_T")
  lse_T = jax.nn.logsumexp(logits_TxE, axis=-1)
  return _safe_div(jnp.sum(weights_T * lse_T ** 2), weights_T.sum())


def moepp_loss(probs_TxE: jax.Array, expert_idx_TxK: jax.Array, num_ffn_experts: int, tau: float,
               token_mask_T: Optional[jax.Array] = None) -> jax.Array:
  """MoE++ heterogeneous load balance loss L_b = sum_i eta_i f_i P_i (arXiv 2410.07348 Eq. 7).

  eta_i = 1 for FFN experts (i < num_ffn_experts) and tau for zero-computation experts,
  f_i = (1/T) sum_t 1(token t selects i) (so sum_i f_i = K), P_i = (1/T) sum_t softmax(G(x_t))_i,
  T = number of real tokens. `probs_TxE` are the softmax router probabilities over all
  E = N_FFN + N_ZC experts, in the moejax order [FFN..., zero-computation...].
  """
  probs_TxE = jnp.asarray(probs_TxE).astype(jnp.float32)
  num_experts = probs_TxE.shape[-1]
  if not 0 <= num_ffn_experts <= num_experts:
    raise ValueError(f"moepp_loss: num_ffn_experts={num_ffn_experts} must be between 0 and the "
                     f"number of experts in probs_TxE ({num_experts})")
  weights_T = _token_weights(token_mask_T, probs_TxE.shape[:-1], "token_mask_T")
  n_tokens = weights_T.sum()
  f_E = _safe_div(tokens_per_expert(expert_idx_TxK, num_experts, token_mask_T), n_tokens)
  p_E = _safe_div(jnp.einsum("...e,...->e", probs_TxE, weights_T), n_tokens)
  eta_E = jnp.where(jnp.arange(num_experts) < num_ffn_experts, 1.0,
                    jnp.asarray(tau, jnp.float32))
  return jnp.sum(eta_E * f_E * p_E)


def max_violation(load_E: jax.Array) -> jax.Array:
  """MaxVio = (max_i load_i - mean load) / mean load (ALF-LB arXiv 2408.15664 Eq. 4); 0 for an
  empty load. Leading axes are reduced independently ([..., E] -> [...])."""
  load_E = jnp.asarray(load_E).astype(jnp.float32)
  mean = load_E.mean(axis=-1)
  return _safe_div(load_E.max(axis=-1) - mean, mean)


def router_entropy(scores_TxE: jax.Array, token_mask_T: Optional[jax.Array] = None) -> jax.Array:
  """Mean over real tokens of the entropy -sum_i p_i log p_i (nats) of p = s / sum_j s_j (the
  scores normalised per token; a no-op for softmax). 0 log 0 = 0. log(E) means uniform routing."""
  scores_TxE = jnp.asarray(scores_TxE).astype(jnp.float32)
  weights_T = _token_weights(token_mask_T, scores_TxE.shape[:-1], "token_mask_T")
  p_TxE = scores_TxE / (scores_TxE.sum(axis=-1, keepdims=True) + 1e-20)
  safe_p_TxE = jnp.where(p_TxE > 0, p_TxE, 1.0)
  entropy_T = -jnp.sum(jnp.where(p_TxE > 0, p_TxE * jnp.log(safe_p_TxE), 0.0), axis=-1)
  return _safe_div(jnp.sum(weights_T * entropy_T), weights_T.sum())


def update_bias(bias_E: jax.Array, load_E: jax.Array, rate, rule: str = "sign") -> jax.Array:
  """ALF-LB bias update, after the optimizer step (arXiv 2408.15664 Algorithm 1; DeepSeek-V3
  arXiv 2412.19437 Sec. 2.1.2 with gamma = rate).

  e_i = mean_j(load_j) - load_i is the load violation error: positive means underloaded, so the
  bias of an underloaded expert goes up and that of an overloaded one goes down.
    rule "sign":  b_i += rate * sign(e_i)  (sign(0) = 0: a perfectly loaded expert is unchanged);
    rule "error": b_i += rate * e_i / mean(load)  (the u*e_i variant, Table 3; e is normalised by
                  the mean load so that `rate` does not depend on the batch size; 0 if no load).
  `load_E` must be the load of the previous (whole) batch: using the current one leaks future
  tokens. Returns the new bias in the dtype of `bias_E`.
  """
  bias_E = jnp.asarray(bias_E)
  load_E = jnp.asarray(load_E).astype(jnp.float32)
  if bias_E.shape != load_E.shape:
    raise ValueError(f"update_bias: bias_E shape {bias_E.shape} and load_E shape {load_E.shape} "
                     "must match")
  mean = load_E.mean(axis=-1, keepdims=True)
  error_E = mean - load_E
  if rule == "sign":
    step_E = jnp.sign(error_E)
  elif rule == "error":
    step_E = _safe_div(error_E, mean)
  else:
    raise ValueError(f"update_bias: rule={rule!r}: expected one of {BIAS_UPDATE_RULES}")
  rate = jnp.asarray(rate, jnp.float32)
  return (bias_E.astype(jnp.float32) + rate * step_E).astype(bias_E.dtype)
