"""Token dispatch for routed SwiGLU experts: dropless (sort + grouped matmul) and GShard capacity.

Both paths compute y_t = sum_k gate_{t,k} * FFN_{e_{t,k}}(x_t) with FFN_e(x) =
(silu(x W_gate[e]) * x W_up[e]) W_down[e] (SwiGLU, arXiv 2002.05202 Eq. 6), in the dtype of `x`
(the caller's compute dtype; weights are cast to it) with fp32 accumulation. Expert ids >= E (the
MoE++ zero-computation experts of arXiv 2410.07348, or a sentinel for masked tokens) contribute
nothing here: the caller adds their output separately.

- `dropless`: MegaBlocks-style (arXiv 2211.15841) no-drop dispatch. The T*K copies are sorted by
  expert (stable), the three projections run as grouped matmuls (`ops.gmm`, or one fused
  `ops.expert_swiglu` where the implementation has it: the XLA ops on CPU) and the results are
  gathered back and weighted by the gates (`ops.unpermute`). Decode-sized inputs on XLA CPU
  (T*K <= E/2 copies) take `gathered` instead: no sort, no loop.
- `gathered`: each copy multiplies its own expert's weights, gathered per copy ([T, K, D, F]), in
  three batched matrix-vector products. It reads one expert's weights per copy, so it only pays
  when few copies share an expert; on XLA CPU it was ~1.4-2.4x faster than the tile loop for
  T*K <= E/2 (`python -m moejax.bench.decode_experts`, docs/benchmarks.md).
- `capacity`: GShard (arXiv 2006.16668 §2.2, Algorithm 1) fixed-capacity dispatch. Every expert
  holds at most C copies; positions come from a cumulative sum over one-hot assignments in which all
  tokens' first choices precede all second choices, and so on. Copies at position >= C are dropped
  (zero combine weight: the token keeps only its residual). Dispatch and combine are einsums over a
  [T, E, C] tensor, as in GShard / Switch (arXiv 2101.03961).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp


def _check_inputs(name: str, x_TxD, idx_TxK, gates_TxK, w_gate_EDF, w_up_EDF, w_down_EFD) -> None:
  if x_TxD.ndim != 2:
    raise ValueError(f"{name}: x must be [T, D], got shape {x_TxD.shape}")
  if idx_TxK.ndim != 2 or idx_TxK.shape[0] != x_TxD.shape[0]:
    raise ValueError(f"{name}: expert_idx must be [T={x_TxD.shape[0]}, K], got {idx_TxK.shape}")
  if gates_TxK.shape != idx_TxK.shape:
    raise ValueError(f"{name}: gates shape {gates_TxK.shape} != expert_idx shape {idx_TxK.shape}")
  if not jnp.issubdtype(idx_TxK.dtype, jnp.integer):
    raise TypeError(f"{name}: expert_idx must be integer, got {idx_TxK.dtype}")
  e, d, f = w_gate_EDF.shape
  if d != x_TxD.shape[1]:
    raise ValueError(f"{name}: w_gate is [E, D={d}, F] but x has D={x_TxD.shape[1]}")
  if w_up_EDF.shape != (e, d, f) or w_down_EFD.shape != (e, f, d):
    raise ValueError(f"{name}: expert weights must be w_gate/w_up [E, D, F] and w_down [E, F, D]; got "
                     f"{w_gate_EDF.shape}, {w_up_EDF.shape}, {w_down_EFD.shape}")


# ----------------------------------------------------------------------------------------------
# Dropless.
# ----------------------------------------------------------------------------------------------

def dropless(x_TxD: jax.Array, idx_TxK: jax.Array, gates_TxK: jax.Array, w_gate_EDF: jax.Array,
             w_up_EDF: jax.Array, w_down_EFD: jax.Array, ops: Any) -> jax.Array:
  """No-drop routed SwiGLU experts: `sorted_experts`, or `gathered` for decode-sized inputs on XLA
  CPU (T*K <= E/2 copies, where it measured faster; see the module docstring). Same values.

  Args:
    x_TxD: tokens in the compute dtype.
    idx_TxK: expert ids; ids >= E (= w_gate_EDF.shape[0]) are skipped (contribute zero).
    gates_TxK: combine weights (fp32 recommended).
    w_*: expert weights, cast to x's dtype.
    ops: `moejax.kernels.get_ops(impl)` (gmm, permute, unpermute; `expert_swiglu` when the
      implementation fuses the three expert matmuls).
  Returns:
    y_TxD in x's dtype.
  """
  if (getattr(ops, "name", None) == "xla" and jax.default_backend() == "cpu"
      and 2 * idx_TxK.size <= w_gate_EDF.shape[0]):
    return gathered(x_TxD, idx_TxK, gates_TxK, w_gate_EDF, w_up_EDF, w_down_EFD)
  return sorted_experts(x_TxD, idx_TxK, gates_TxK, w_gate_EDF, w_up_EDF, w_down_EFD, ops)


def sorted_experts(x_TxD: jax.Array, idx_TxK: jax.Array, gates_TxK: jax.Array,
                   w_gate_EDF: jax.Array, w_up_EDF: jax.Array, w_down_EFD: jax.Array,
                   ops: Any) -> jax.Array:
  """permute -> 3 grouped matmuls (or `ops.expert_swiglu`) -> gate-weighted unpermute; arguments
  and result as `dropless`."""
  _check_inputs("dropless", x_TxD, idx_TxK, gates_TxK, w_gate_EDF, w_up_EDF, w_down_EFD)
  dt = x_TxD.dtype
  num_experts = w_gate_EDF.shape[0]
  x_sorted_MxD, group_sizes_E, sort_order_M = ops.permute(x_TxD, idx_TxK, num_experts)
  if getattr(ops, "expert_swiglu", None) is not None:  # the three matmuls fused per row tile.
    out_MxD = ops.expert_swiglu(x_sorted_MxD, w_gate_EDF.astype(dt), w_up_EDF.astype(dt),
                                w_down_EFD.astype(dt), group_sizes_E)
  else:
    gate_MxF = ops.gmm(x_sorted_MxD, w_gate_EDF.astype(dt), group_sizes_E,
                       preferred_element_type=jnp.float32)
    up_MxF = ops.gmm(x_sorted_MxD, w_up_EDF.astype(dt), group_sizes_E,
                     preferred_element_type=jnp.float32)
    h_MxF = (jax.nn.silu(gate_MxF) * up_MxF).astype(dt)
    out_MxD = ops.gmm(h_MxF, w_down_EFD.astype(dt), group_sizes_E,
                      preferred_element_type=jnp.float32)
  # Copies of skipped ids (>= E) sort to the end; force their rows to exact zeros whatever the kernel
  # leaves there, and give them zero gates.
  num_rows = out_MxD.shape[0]
  valid_M = jnp.arange(num_rows) < jnp.sum(group_sizes_E)
  out_MxD = jnp.where(valid_M[:, None], out_MxD.astype(jnp.float32), 0.0)
  gates_ffn_TxK = jnp.where(idx_TxK < num_experts, gates_TxK.astype(jnp.float32), 0.0)
  y_TxD = ops.unpermute(out_MxD, sort_order_M, gates_ffn_TxK)
  return y_TxD.astype(dt)


def gathered(x_TxD: jax.Array, idx_TxK: jax.Array, gates_TxK: jax.Array, w_gate_EDF: jax.Array,
             w_up_EDF: jax.Array, w_down_EFD: jax.Array) -> jax.Array:
  """Routed SwiGLU experts with every copy's expert weights gathered: no sort, no grouped matmul.

  y_t = sum_k gate_{t,k} FFN_{e_{t,k}}(x_t) as three batched [1, D] x [D, F] products over the
  T*K copies, gate/up accumulated in fp32 and h cast to x's dtype (as `dropless`). Ids >= E
  contribute zero. Reads T*K experts' weights (duplicates included): meant for decode-sized T.
  Returns y_TxD in x's dtype.
  """
  _check_inputs("gathered", x_TxD, idx_TxK, gates_TxK, w_gate_EDF, w_up_EDF, w_down_EFD)
  dt = x_TxD.dtype
  num_experts = w_gate_EDF.shape[0]
  safe_idx_TxK = jnp.clip(idx_TxK, 0, num_experts - 1)
  x_TxKxD = jnp.broadcast_to(x_TxD[:, None, :], idx_TxK.shape + x_TxD.shape[1:])
  gate_TxKxF = jnp.einsum("tkd,tkdf->tkf", x_TxKxD, w_gate_EDF.astype(dt)[safe_idx_TxK],
                          preferred_element_type=jnp.float32)
  up_TxKxF = jnp.einsum("tkd,tkdf->tkf", x_TxKxD, w_up_EDF.astype(dt)[safe_idx_TxK],
                        preferred_element_type=jnp.float32)
  h_TxKxF = (jax.nn.silu(gate_TxKxF) * up_TxKxF).astype(dt)
  out_TxKxD = jnp.einsum("tkf,tkfd->tkd", h_TxKxF, w_down_EFD.astype(dt)[safe_idx_TxK],
                         preferred_element_type=jnp.float32)
  gates_ffn_TxK = jnp.where(idx_TxK < num_experts, gates_TxK.astype(jnp.float32), 0.0)
  return jnp.einsum("tkd,tk->td", out_TxKxD, gates_ffn_TxK).astype(dt)


# ----------------------------------------------------------------------------------------------
# Capacity (GShard).
# ----------------------------------------------------------------------------------------------

def expert_capacity(num_tokens: int, top_k: int, num_experts: int, factor: float) -> int:
  """C = ceil(T*K/E * capacity_factor), capped at T (an expert sees each token at most once)."""
  if num_tokens <= 0 or top_k <= 0 or num_experts <= 0:
    raise ValueError(f"expert_capacity: T, K, E must be positive, got {num_tokens}, {top_k}, "
                     f"{num_experts}")
  if factor <= 0:
    raise ValueError(f"expert_capacity: capacity_factor must be > 0, got {factor}")
  return max(1, min(num_tokens, math.ceil(num_tokens * top_k / num_experts * factor)))


def priority_positions(idx_TxK: jax.Array, num_experts: int) -> tuple[jax.Array, jax.Array]:
  """Each copy's slot in its expert's buffer under GShard priority (first choices first).

  The T*K copies are ordered choice-major (all tokens' choice 0, then all choice 1, ...), token
  order within a choice; the position of a copy is the number of earlier copies sent to the same
  expert (a cumulative sum over one-hot assignments). Returns (position_TxK int32, valid_TxK bool);
  valid is False for ids outside [0, num_experts), whose position is meaningless.
  """
  t, k = idx_TxK.shape
  idx_KxT = idx_TxK.T
  onehot_KTxE = jax.nn.one_hot(idx_KxT.reshape(k * t), num_experts, dtype=jnp.int32)
  before_KTxE = jnp.cumsum(onehot_KTxE, axis=0) - onehot_KTxE   # copies strictly earlier
  position_KT = jnp.sum(before_KTxE * onehot_KTxE, axis=-1)
  position_TxK = position_KT.reshape(k, t).T
  valid_TxK = (idx_TxK >= 0) & (idx_TxK < num_experts)
  return position_TxK.astype(jnp.int32), valid_TxK


def capacity_keep(idx_TxK: jax.Array, capacity_E: jax.Array) -> jax.Array:
  """Which copies fit: valid id and GShard priority position < capacity of its expert.

  `capacity_E` gives a (possibly different) capacity per expert, e.g. MoE++'s heterogeneous
  capacities (arXiv 2410.07348 Eqs. 8-9). Returns keep_TxK (bool).
  """
  capacity_E = jnp.asarray(capacity_E, jnp.int32)
  num_experts = capacity_E.shape[0]
  position_TxK, valid_TxK = priority_positions(idx_TxK, num_experts)
  cap_TxK = jnp.take(capacity_E, jnp.clip(idx_TxK, 0, num_experts - 1))
  return valid_TxK & (position_TxK < cap_TxK)


def capacity(x_TxD: jax.Array, idx_TxK: jax.Array, gates_TxK: jax.Array, w_gate_EDF: jax.Array,
             w_up_EDF: jax.Array, w_down_EFD: jax.Array,
             capacity: int) -> tuple[jax.Array, jax.Array]:  # pylint: disable=redefined-outer-name
  """GShard fixed-capacity routed SwiGLU experts with einsum dispatch/combine.

  Args:
    x_TxD: tokens in the compute dtype.
    idx_TxK: expert ids; ids >= E are skipped (no slot, no output, not counted as dropped).
    gates_TxK: combine weights.
    w_*: expert weights [E, D, F] / [E, F, D], cast to x's dtype.
    capacity: C, slots per expert (see `expert_capacity`).
  Returns:
    (y_TxD in x's dtype, dropped_fraction): the fp32 fraction of the T*K copies that were routed
    to an FFN expert but found it full.
  """
  _check_inputs("capacity", x_TxD, idx_TxK, gates_TxK, w_gate_EDF, w_up_EDF, w_down_EFD)
  if not isinstance(capacity, int) or capacity <= 0:
    raise ValueError(f"capacity: expected a positive int capacity C, got {capacity!r}")
  dt = x_TxD.dtype
  t, k = idx_TxK.shape
  num_experts = w_gate_EDF.shape[0]
  position_TxK, valid_TxK = priority_positions(idx_TxK, num_experts)
  keep_TxK = valid_TxK & (position_TxK < capacity)
  # one_hot of an out-of-range id / position is all zeros, so skipped and dropped copies vanish.
  expert_TxKxE = jax.nn.one_hot(jnp.where(keep_TxK, idx_TxK, -1), num_experts, dtype=jnp.float32)
  slot_TxKxC = jax.nn.one_hot(position_TxK, capacity, dtype=jnp.float32)
  dispatch_TxExC = jnp.einsum("tke,tkc->tec", expert_TxKxE, slot_TxKxC)
  combine_TxExC = jnp.einsum("tke,tkc,tk->tec", expert_TxKxE, slot_TxKxC,
                             gates_TxK.astype(jnp.float32))
  x_ExCxD = jnp.einsum("tec,td->ecd", dispatch_TxExC.astype(dt), x_TxD,
                       preferred_element_type=jnp.float32).astype(dt)
  gate_ExCxF = jnp.einsum("ecd,edf->ecf", x_ExCxD, w_gate_EDF.astype(dt),
                          preferred_element_type=jnp.float32)
  up_ExCxF = jnp.einsum("ecd,edf->ecf", x_ExCxD, w_up_EDF.astype(dt),
                        preferred_element_type=jnp.float32)
  h_ExCxF = (jax.nn.silu(gate_ExCxF) * up_ExCxF).astype(dt)
  out_ExCxD = jnp.einsum("ecf,efd->ecd", h_ExCxF, w_down_EFD.astype(dt),
                         preferred_element_type=jnp.float32)
  y_TxD = jnp.einsum("tec,ecd->td", combine_TxExC, out_ExCxD)
  dropped = jnp.sum(valid_TxK & ~keep_TxK)
  return y_TxD.astype(dt), dropped.astype(jnp.float32) / (t * k)
