"""Plain-XLA reference implementations of the MoE hot-path ops: always available, the test oracle.

The Pallas kernels in this package implement the same signatures and are checked against these.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def gmm_ragged(lhs_MxK: jax.Array, rhs_ExKxN: jax.Array, group_sizes_E: jax.Array,
               preferred_element_type=None) -> jax.Array:
  """Grouped matmul: rows of `lhs` sorted by group; rows [start_e, start_e + size_e) use rhs[e].

  `jax.lax.ragged_dot`, the reference oracle. Rows beyond sum(group_sizes) come out as zeros.
  Returns [M, N].
  """
  return jax.lax.ragged_dot(lhs_MxK, rhs_ExKxN, group_sizes_E.astype(jnp.int32),
                            preferred_element_type=preferred_element_type)


def gmm_blocked(lhs_MxK: jax.Array, rhs_ExKxN: jax.Array, group_sizes_E: jax.Array,
                block: int = 64, preferred_element_type=None) -> jax.Array:
  """Same result as `gmm_ragged`, computed as a batched matmul over fixed-size row blocks.

  Each group is padded to a multiple of `block` rows in a static buffer of ceil(M/block) + E blocks,
  so every block belongs to one group; then one `einsum('bmk,bkn->bmn')` with the block's weights.
  FLOPs are (M + E*block) * K * N instead of the E * M * K * N that ragged_dot's dense expansion
  costs on CPU; the weight gather is [blocks, K, N], so this is for CPU-sized experts only.
  """
  m, k = lhs_MxK.shape
  e, _, n = rhs_ExKxN.shape
  num_blocks = -(-m // block) + e
  sizes_E = group_sizes_E.astype(jnp.int32)
  ends_E = jnp.cumsum(sizes_E)
  starts_E = ends_E - sizes_E
  blocks_E = -(-sizes_E // block)
  block_ends_E = jnp.cumsum(blocks_E)
  block_starts_E = block_ends_E - blocks_E
  block_group = jnp.minimum(jnp.searchsorted(block_ends_E, jnp.arange(num_blocks), side="right"),
                            e - 1)
  slot = jnp.arange(num_blocks * block)
  slot_group = block_group[slot // block]
  offset = slot - block_starts_E[slot_group] * block
  slot_valid = (offset < sizes_E[slot_group]) & (slot // block < block_ends_E[-1])
  source_row = jnp.where(slot_valid, starts_E[slot_group] + offset, 0)
  buf = jnp.where(slot_valid[:, None], jnp.take(lhs_MxK, source_row, axis=0), 0)
  out = jnp.einsum("bmk,bkn->bmn", buf.reshape(num_blocks, block, k),
                   jnp.take(rhs_ExKxN, block_group, axis=0),
                   preferred_element_type=preferred_element_type)
  row = jnp.arange(m)
  row_group = jnp.minimum(jnp.searchsorted(ends_E, row, side="right"), e - 1)
  row_valid = row < ends_E[-1]
  dest = jnp.where(row_valid, block_starts_E[row_group] * block + row - starts_E[row_group], 0)
  return jnp.where(row_valid[:, None], jnp.take(out.reshape(num_blocks * block, n), dest, axis=0), 0)


def gmm(lhs_MxK: jax.Array, rhs_ExKxN: jax.Array, group_sizes_E: jax.Array,
        preferred_element_type=None) -> jax.Array:
  """The XLA grouped matmul: `gmm_blocked` on CPU (about 10x faster there, forward+backward),
  `gmm_ragged` (`jax.lax.ragged_dot`) on accelerators. Both give the same values."""
  if jax.default_backend() == "cpu":
    return gmm_blocked(lhs_MxK, rhs_ExKxN, group_sizes_E,
                       preferred_element_type=preferred_element_type)
  return gmm_ragged(lhs_MxK, rhs_ExKxN, group_sizes_E, preferred_element_type)


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
