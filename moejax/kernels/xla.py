"""Plain-XLA reference implementations of the MoE hot-path ops: always available, the test oracle.

The Pallas kernels in this package implement the same signatures and are checked against these.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def gmm(lhs_MxK: jax.Array, rhs_ExKxN: jax.Array, group_sizes_E: jax.Array,
        preferred_element_type=None) -> jax.Array:
  """Grouped matmul: rows of `lhs` sorted by group; rows [start_e, start_e + size_e) use rhs[e].

  Rows beyond sum(group_sizes) come out as zeros. Returns [M, N].
  """
  return jax.lax.ragged_dot(lhs_MxK, rhs_ExKxN, group_sizes_E.astype(jnp.int32),
                            preferred_element_type=preferred_element_type)


def permute(x_TxD: jax.Array, expert_idx_TxK: jax.Array, num_groups: int):
  """Sorts the T*K (token, choice) copies by expert id (stable, so ties keep token order).

  Ids >= num_groups (e.g. MoE++ zero-computation experts) sort to the end and are not counted in
  group_sizes. Returns (x_sorted_MxD, group_sizes_E, sort_order_M) with M = T*K; copy m of the
  sorted array is token sort_order[m] // K, choice sort_order[m] % K.
  """
  t, k = expert_idx_TxK.shape
  flat_idx_M = expert_idx_TxK.reshape(t * k)
  sort_order_M = jnp.argsort(flat_idx_M, stable=True)
  x_sorted_MxD = jnp.take(x_TxD, sort_order_M // k, axis=0)
  group_sizes_E = jnp.bincount(flat_idx_M, length=num_groups).astype(jnp.int32)
  return x_sorted_MxD, group_sizes_E, sort_order_M


def unpermute(y_sorted_MxD: jax.Array, sort_order_M: jax.Array, gates_TxK: jax.Array) -> jax.Array:
  """Inverse of `permute` followed by the gate-weighted sum over the K choices. Returns [T, D]."""
  t, k = gates_TxK.shape
  inverse_M = jnp.argsort(sort_order_M)
  y_TxKxD = jnp.take(y_sorted_MxD, inverse_M, axis=0).reshape(t, k, -1)
  return jnp.einsum("tkd,tk->td", y_TxKxD, gates_TxK.astype(y_TxKxD.dtype))
