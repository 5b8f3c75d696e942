"""MoE++ zero-computation experts, gating residual and heterogeneous capacities (arXiv 2410.07348).

Routed experts are ordered [FFN x E] + [constant x n_const] + [copy x n_copy] + [zero x n_zero]
(the official MoE++ order), so an id in [E, E + n_const) is a constant expert, the next n_copy ids
are copy experts and the last n_zero ids are zero experts. Ids past all of them (a masked-token
sentinel) contribute nothing.

  zero:     E_zero(x)  = 0                                   (Eq. 3, "discard")
  copy:     E_copy(x)  = x                                   (Eq. 4, "skip")
  constant: E_const(x) = a1 x + a2 v, [a1, a2] = softmax(W_c x), W_c in R^{2xD}, v in R^D (Eq. 5)
  gating residual: G(x^j) = W^j x^j + W_g^j G(x^{j-1})     (Eq. 6)
  capacities: C_FFN = gamma tau T / (tau N_FFN + N_ZC), C_ZC = gamma T / (tau N_FFN + N_ZC)  (Eqs. 8-9)

Pure jnp functions; the parameters live in `moejax.model.moe.MoELayer`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def const_expert(x_TxD: jax.Array, w_Dx2: jax.Array, v_D: jax.Array) -> jax.Array:
  """One constant expert for every token: a1 x + a2 v with [a1, a2] = softmax(x W_c) (Eq. 5), fp32."""
  x32 = x_TxD.astype(jnp.float32)
  alpha_Tx2 = jax.nn.softmax(x32 @ w_Dx2.astype(jnp.float32), axis=-1)
  return alpha_Tx2[:, :1] * x32 + alpha_Tx2[:, 1:] * v_D.astype(jnp.float32)


def zero_computation_experts(x_TxD: jax.Array, idx_TxK: jax.Array, gates_TxK: jax.Array, *,
                             num_ffn: int, num_const: int, num_copy: int,
                             const_w_NxDx2: jax.Array | None = None,
                             const_v_NxD: jax.Array | None = None) -> jax.Array:
  """sum_k gate_{t,k} E_{e_{t,k}}(x_t) over the copies routed to zero-computation experts.

  FFN ids (< num_ffn) and zero-expert ids contribute nothing. Computed in fp32 and returned in x's
  dtype. The constant experts are cheap (a [D, 2] projection each), so all n_const of them are
  evaluated for every token and mixed with the per-token gate mass each received.
  """
  if idx_TxK.shape != gates_TxK.shape or idx_TxK.shape[0] != x_TxD.shape[0]:
    raise ValueError(f"zero_computation_experts: x {x_TxD.shape}, expert_idx {idx_TxK.shape} and "
                     f"gates {gates_TxK.shape} must share T (and K)")
  x32 = x_TxD.astype(jnp.float32)
  g32 = gates_TxK.astype(jnp.float32)
  y_TxD = jnp.zeros_like(x32)
  if num_const:
    if const_w_NxDx2 is None or const_v_NxD is None:
      raise ValueError("zero_computation_experts: num_const > 0 needs const_w_NxDx2 and const_v_NxD")
    if const_w_NxDx2.shape != (num_const, x_TxD.shape[1], 2) or \
        const_v_NxD.shape != (num_const, x_TxD.shape[1]):
      raise ValueError(f"zero_computation_experts: expected const_w [{num_const}, D, 2] and const_v "
                       f"[{num_const}, D], got {const_w_NxDx2.shape}, {const_v_NxD.shape}")
    ids_N = num_ffn + jnp.arange(num_const)
    mass_TxN = jnp.sum(jnp.where(idx_TxK[:, :, None] == ids_N, g32[:, :, None], 0.0), axis=1)
    alpha_TxNx2 = jax.nn.softmax(
        jnp.einsum("td,ndc->tnc", x32, const_w_NxDx2.astype(jnp.float32)), axis=-1)
    y_TxD += jnp.sum(mass_TxN * alpha_TxNx2[..., 0], axis=1, keepdims=True) * x32
    y_TxD += (mass_TxN * alpha_TxNx2[..., 1]) @ const_v_NxD.astype(jnp.float32)
  if num_copy:
    start = num_ffn + num_const
    is_copy_TxK = (idx_TxK >= start) & (idx_TxK < start + num_copy)
    y_TxD += jnp.sum(jnp.where(is_copy_TxK, g32, 0.0), axis=1, keepdims=True) * x32
  return y_TxD.astype(x_TxD.dtype)


def gating_residual(logits_TxE: jax.Array, prev_logits_TxE: jax.Array | None,
                    w_ExE: jax.Array) -> jax.Array:
  """G(x^j) = W^j x^j + G(x^{j-1}) W_g (Eq. 6) in fp32; the first MoE layer passes prev=None."""
  if prev_logits_TxE is None:
    return logits_TxE.astype(jnp.float32)
  if prev_logits_TxE.shape != logits_TxE.shape:
    raise ValueError(f"gating_residual: prev_logits shape {prev_logits_TxE.shape} != router logits "
                     f"shape {logits_TxE.shape} (layers must share the routed expert count)")
  return logits_TxE.astype(jnp.float32) + prev_logits_TxE.astype(jnp.float32) @ w_ExE.astype(
      jnp.float32)


def heterogeneous_capacities(num_tokens: int, top_k: int, num_ffn: int, num_zc: int, tau: float,
                             gamma: float) -> tuple[int, int]:
  """(C_FFN, C_ZC) slots per expert from MoE++ Eqs. 8-9, rounded up and capped at T.

  The paper's T is taken as the number of routed copies T*K, so that without zero-computation
  experts and tau = 1 this is the GShard capacity ceil(T*K/E * gamma) (`dispatch.expert_capacity`).
  gamma is the capacity factor (1.1 in the paper).
  """
  if num_tokens <= 0 or top_k <= 0 or num_ffn <= 0 or num_zc < 0:
    raise ValueError(f"heterogeneous_capacities: need T > 0, K > 0, num_ffn > 0, num_zc >= 0; got "
                     f"{num_tokens}, {top_k}, {num_ffn}, {num_zc}")
  if not 0.0 < tau <= 1.0 or gamma <= 0:
    raise ValueError(f"heterogeneous_capacities: need tau in (0, 1] and gamma > 0; got {tau}, {gamma}")
  copies = num_tokens * top_k
  denom = tau * num_ffn + num_zc
  c_ffn = max(1, min(num_tokens, math.ceil(gamma * tau * copies / denom)))
  c_zc = max(1, min(num_tokens, math.ceil(gamma * copies / denom)))
  return c_ffn, c_zc
