"""Token permutation for dropless MoE with gather-only backward passes.

`permute` sorts the T*K (token, choice) copies by expert (MegaBlocks arXiv 2211.15841, Sec. 5.1:
"permute the tokens to group them by expert"); `unpermute` undoes it and takes the gate-weighted sum
over the K choices. Both have the semantics of `moejax.kernels.xla` (the oracle); the difference is
the backward: the autodiff transpose of a gather is a scatter-add, which is slow and
non-deterministic on GPU. Because `sort_order` is a permutation, the transpose of "gather by
sort_order" is "gather by its inverse", so both custom VJPs below only gather:
  permute:   x_sorted[m] = x[sort_order[m] // K]   ->  dx[t] = sum_k dx_sorted[inv[t*K + k]]
  unpermute: y_TxK[t, k] = y_sorted[inv[t*K + k]]  ->  dy_sorted[m] = gates*dout at sort_order[m]
The inverse permutation is an int32 scatter of M indices (a `set`, never an add of activations).
group_sizes come from a `searchsorted` over the sorted expert ids (no bincount scatter-add).
These are XLA ops (a gather is already bandwidth-bound in XLA); no Pallas kernel is needed here.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def inverse_permutation(sort_order_M: jax.Array) -> jax.Array:
  """inv[sort_order[m]] = m."""
  m = sort_order_M.shape[0]
  return jnp.zeros((m,), jnp.int32).at[sort_order_M].set(jnp.arange(m, dtype=jnp.int32),
                                                         unique_indices=True)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _gather_rows(x_TxD, sort_order_M, k):
  """x_sorted_MxD = x[sort_order // k]."""
  return jnp.take(x_TxD, sort_order_M // k, axis=0)


def _gather_rows_fwd(x_TxD, sort_order_M, k):
  return _gather_rows(x_TxD, sort_order_M, k), sort_order_M


def _gather_rows_bwd(k, sort_order_M, d_sorted_MxD):
  t = sort_order_M.shape[0] // k
  inv_M = inverse_permutation(sort_order_M)
  dx_TxKxD = jnp.take(d_sorted_MxD, inv_M, axis=0).reshape(t, k, -1)
  return dx_TxKxD.sum(axis=1, dtype=jnp.float32).astype(d_sorted_MxD.dtype), None


_gather_rows.defvjp(_gather_rows_fwd, _gather_rows_bwd)


def permute(x_TxD: jax.Array, expert_idx_TxK: jax.Array, num_groups: int):
  """Sort the T*K copies by expert id (stable). Returns (x_sorted_MxD, group_sizes_E, sort_order_M).

  Ids >= num_groups (MoE++ zero-computation experts) sort to the end and are not counted in
  group_sizes. Copy m is token sort_order[m] // K, choice sort_order[m] % K.
  """
  if x_TxD.ndim != 2 or expert_idx_TxK.ndim != 2 or expert_idx_TxK.shape[0] != x_TxD.shape[0]:
    raise ValueError(f"permute: expected x_TxD [T, D] and expert_idx_TxK [T, K] with the same T, "
                     f"got {x_TxD.shape} and {expert_idx_TxK.shape}")
  t, k = expert_idx_TxK.shape
  flat_M = expert_idx_TxK.reshape(t * k).astype(jnp.int32)
  sort_order_M = jnp.argsort(flat_M, stable=True).astype(jnp.int32)
  sorted_ids_M = jnp.take(flat_M, sort_order_M)
  bounds = jnp.searchsorted(sorted_ids_M, jnp.arange(num_groups + 1, dtype=jnp.int32), side="left")
  group_sizes_E = jnp.diff(bounds).astype(jnp.int32)
  x_sorted_MxD = _gather_rows(x_TxD, sort_order_M, k)
  return x_sorted_MxD, group_sizes_E, sort_order_M


@jax.custom_vjp
def unpermute(y_sorted_MxD: jax.Array, sort_order_M: jax.Array, gates_TxK: jax.Array) -> jax.Array:
  """Inverse of `permute` then the gate-weighted sum over the K choices. Returns [T, D]."""
  return _unpermute_fwd(y_sorted_MxD, sort_order_M, gates_TxK)[0]


def _unpermute_fwd(y_sorted_MxD, sort_order_M, gates_TxK):
  t, k = gates_TxK.shape
  inv_M = inverse_permutation(sort_order_M)
  y_TxKxD = jnp.take(y_sorted_MxD, inv_M, axis=0).reshape(t, k, -1)
  out_TxD = jnp.einsum("tkd,tk->td", y_TxKxD, gates_TxK.astype(y_TxKxD.dtype))
  return out_TxD, (y_TxKxD, sort_order_M, gates_TxK)


def _unpermute_bwd(res, d_out_TxD):
  y_TxKxD, sort_order_M, gates_TxK = res
  t, k = gates_TxK.shape
  d_y_TxKxD = d_out_TxD[:, None, :] * gates_TxK.astype(d_out_TxD.dtype)[:, :, None]
  d_sorted_MxD = jnp.take(d_y_TxKxD.reshape(t * k, -1), sort_order_M, axis=0)
  d_gates_TxK = jnp.einsum("tkd,td->tk", y_TxKxD, d_out_TxD.astype(y_TxKxD.dtype),
                           preferred_element_type=jnp.float32)
  return (d_sorted_MxD.astype(y_TxKxD.dtype), None, d_gates_TxK.astype(gates_TxK.dtype))


unpermute.defvjp(_unpermute_fwd, _unpermute_bwd)
