"""Plain-XLA reference implementations of the MoE hot-path ops: always available, the test oracle.

The Pallas kernels in this package implement the same signatures and are checked against these.
Grouped matmul (rows of `lhs` sorted by group, group e multiplied by rhs[e]) comes in three forms:
  gmm_ragged   `jax.lax.ragged_dot`: the oracle; on CPU XLA expands it densely (E x the FLOPs).
  gmm_blocked  a batched matmul over fixed-size row blocks (gathers one weight matrix per block).
  gmm_tiled    a `while` loop over (group, row tile) pairs: only the tiles that hold rows run, each
               a dense [tile, K] x [K, N] matmul on a dynamic slice; the backward pass is two more
               such loops (gather- and scatter-free). The CPU default (`gmm`).
"""

from __future__ import annotations

import functools

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


# ----------------------------------------------------------------------------------------------
# Tiled grouped matmul (CPU).
# ----------------------------------------------------------------------------------------------

def default_tile(num_rows: int, num_groups: int) -> int:
  """Rows per tile: the power of two <= M / E (one tile per group under balanced routing), in
  [8, 512], at most M.

  Larger tiles waste more rows (a group's last tile is padded: E * tile / 2 rows on average) but XLA
  CPU runs a [tile, K] x [K, N] matmul several times faster per FLOP at 512 rows than at 64, which
  measured faster overall for training shapes (M = 8192, E = 16); decode (M = B*K copies) gets
  tiles of 8 rows or fewer, so it reads only the weights of experts that have tokens.
  """
  per_group = max(1, num_rows // max(num_groups, 1))
  tile = 1 << (per_group.bit_length() - 1)
  return max(1, min(max(8, min(tile, 512)), num_rows))


def _tile_plan(group_sizes_E: jax.Array, num_rows: int, tile: int):
  """(group_J, first_row_J, group_end_J, num_tiles) for the tiles of every group, in group order.

  Group e's rows [start_e, end_e) are cut into ceil(size_e / tile) tiles; J = ceil(M / tile) + E
  bounds their total statically and only the first `num_tiles` entries are meaningful.
  """
  e = group_sizes_E.shape[0]
  sizes_E = group_sizes_E.astype(jnp.int32)
  ends_E = jnp.cumsum(sizes_E)
  tiles_E = -(-sizes_E // tile)
  tile_ends_E = jnp.cumsum(tiles_E)
  j = jnp.arange(-(-num_rows // tile) + e, dtype=jnp.int32)
  group_J = jnp.minimum(jnp.searchsorted(tile_ends_E, j, side="right"), e - 1).astype(jnp.int32)
  first_J = ends_E[group_J] - sizes_E[group_J] + (j - tile_ends_E[group_J] + tiles_E[group_J]) * tile
  return group_J, first_J, ends_E[group_J], tile_ends_E[-1]


def _tile_window(plan, i, num_rows: int, tile: int):
  """Tile i's group, slice start (clamped into the array) and [tile, 1] mask of its own rows."""
  group_J, first_J, end_J, _ = plan
  start = jnp.minimum(first_J[i], num_rows - tile)
  rows = start + jnp.arange(tile, dtype=jnp.int32)
  return group_J[i], start, ((rows >= first_J[i]) & (rows < end_J[i]))[:, None]


def _zeros(shape, dtype, *inputs) -> jax.Array:
  """Zeros for a loop carry that vary like `inputs` do inside `shard_map` (its loop carries must
  keep one type: a plain `jnp.zeros` is device-invariant while the loop body's results are not)."""
  zero = sum((jnp.zeros_like(a.reshape(-1)[0]).astype(dtype) for a in inputs),
             jnp.zeros((), dtype))
  return jnp.zeros(shape, dtype) + zero


def _matched(cotangent, primal):
  """A custom VJP's cotangent psum-ed over the `shard_map` axes it varies over but its primal does
  not (the primal entered the loop broadcast over them; autodiff would insert the same psum)."""
  def varying(a):
    return frozenset(getattr(getattr(jax.typeof(a), "manual_axis_type", None), "varying", ()) or ())

  extra = varying(cotangent) - varying(primal)
  return jax.lax.psum(cotangent, tuple(sorted(extra))) if extra else cotangent


def _tile_rows(a_MxN, start, tile: int):
  return jax.lax.dynamic_slice(a_MxN, (start, 0), (tile, a_MxN.shape[1]))


def _put_rows(a_MxN, rows_TxN, start, own):
  """a[start:start+tile] = rows where `own`, else unchanged (in place inside a while loop)."""
  old = _tile_rows(a_MxN, start, rows_TxN.shape[0])
  return jax.lax.dynamic_update_slice(a_MxN, jnp.where(own, rows_TxN.astype(a_MxN.dtype), old),
                                      (start, 0))


def _tiled_loop(lhs_MxK, rhs_ExKxN, plan, tile: int, out_dtype) -> jax.Array:
  """out[rows of group e] = lhs[rows] @ rhs[e], one tile per while-loop iteration; other rows 0."""
  m = lhs_MxK.shape[0]
  n = rhs_ExKxN.shape[2]

  def body(i, out_MxN):
    g, start, own = _tile_window(plan, i, m, tile)
    y = jnp.dot(_tile_rows(lhs_MxK, start, tile),
                jax.lax.dynamic_index_in_dim(rhs_ExKxN, g, 0, keepdims=False),
                preferred_element_type=out_dtype)
    return _put_rows(out_MxN, y, start, own)

  return jax.lax.fori_loop(0, plan[3], body,
                           _zeros((m, n), out_dtype, lhs_MxK, rhs_ExKxN, plan[0]))


def _tiled_rhs_grad(lhs_MxK, dout_MxN, plan, num_groups: int, tile: int) -> jax.Array:
  """d rhs [E, K, N] (fp32): sum over group e's tiles of lhs_tile^T @ dout_tile (rows masked)."""
  m, k = lhs_MxK.shape
  n = dout_MxN.shape[1]

  def body(i, d_ExKxN):
    g, start, own = _tile_window(plan, i, m, tile)
    x = _tile_rows(lhs_MxK, start, tile)
    dy = jnp.where(own, _tile_rows(dout_MxN, start, tile), 0)
    # x.T @ dy, not a dot_general contracting dim 0 of both: XLA CPU runs that form ~2x slower.
    dw = jnp.dot(x.T, dy.astype(jnp.result_type(x, dy)), preferred_element_type=jnp.float32)
    acc = jax.lax.dynamic_index_in_dim(d_ExKxN, g, 0, keepdims=False) + dw
    return jax.lax.dynamic_update_index_in_dim(d_ExKxN, acc, g, 0)

  return jax.lax.fori_loop(0, plan[3], body, _zeros((num_groups, k, n), jnp.float32, lhs_MxK,
                                                     dout_MxN, plan[0]))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _gmm_tiled(lhs_MxK, rhs_ExKxN, group_sizes_E, tile, out_dtype):
  plan = _tile_plan(group_sizes_E, lhs_MxK.shape[0], tile)
  return _tiled_loop(lhs_MxK, rhs_ExKxN, plan, tile, out_dtype)


def _gmm_tiled_fwd(lhs_MxK, rhs_ExKxN, group_sizes_E, tile, out_dtype):
  return _gmm_tiled(lhs_MxK, rhs_ExKxN, group_sizes_E, tile, out_dtype), (lhs_MxK, rhs_ExKxN,
                                                                          group_sizes_E)


def _gmm_tiled_bwd(tile, out_dtype, res, dout_MxN):
  """d lhs = gmm(dout, rhs^T) (a forward loop); d rhs = per-group lhs^T dout (a second loop)."""
  del out_dtype
  lhs_MxK, rhs_ExKxN, group_sizes_E = res
  plan = _tile_plan(group_sizes_E, lhs_MxK.shape[0], tile)
  rhs_t = jnp.swapaxes(rhs_ExKxN, 1, 2)
  d_lhs = _tiled_loop(dout_MxN.astype(jnp.result_type(dout_MxN, rhs_t)), rhs_t, plan, tile,
                      jnp.float32)
  d_rhs = _tiled_rhs_grad(lhs_MxK, dout_MxN, plan, rhs_ExKxN.shape[0], tile)
  return (_matched(d_lhs.astype(lhs_MxK.dtype), lhs_MxK),
          _matched(d_rhs.astype(rhs_ExKxN.dtype), rhs_ExKxN), None)


_gmm_tiled.defvjp(_gmm_tiled_fwd, _gmm_tiled_bwd)


def gmm_tiled(lhs_MxK: jax.Array, rhs_ExKxN: jax.Array, group_sizes_E: jax.Array,
              tile: int | None = None, preferred_element_type=None) -> jax.Array:
  """Same result as `gmm_ragged` (rows beyond sum(group_sizes) are zeros) as a loop over row tiles.

  Work is (M + E*tile/2 on average) * K * N FLOPs in `tile`-row dense matmuls, no weight gather;
  the backward pass (custom VJP) is d lhs = gmm(d out, rhs^T) and d rhs[e] = lhs_e^T d out_e, two
  more tile loops. `tile` defaults to `default_tile(M, E)`. Returns [M, N] in
  `preferred_element_type` (default: the promoted input dtype).
  """
  m = lhs_MxK.shape[0]
  n = rhs_ExKxN.shape[2]
  out_dtype = jnp.dtype(preferred_element_type or jnp.result_type(lhs_MxK, rhs_ExKxN))
  if m == 0:
    return jnp.zeros((0, n), out_dtype)
  tile = min(int(tile or default_tile(m, rhs_ExKxN.shape[0])), m)
  return _gmm_tiled(lhs_MxK, rhs_ExKxN, group_sizes_E.astype(jnp.int32), tile, out_dtype)


# ----------------------------------------------------------------------------------------------
# Fused SwiGLU experts over row tiles (CPU).
# ----------------------------------------------------------------------------------------------

def _swiglu_loop(x_MxD, w_gate_EDF, w_up_EDF, w_down_EFD, plan, tile: int, keep: bool):
  """out = (silu(x Wg[e]) * x Wu[e]) Wd[e] per tile (fp32); with `keep`, also gate/up [M, F]."""
  m = x_MxD.shape[0]
  f, d = w_down_EFD.shape[1:]
  dt = x_MxD.dtype
  idx = functools.partial(jax.lax.dynamic_index_in_dim, keepdims=False)

  def body(i, carry):
    g, start, own = _tile_window(plan, i, m, tile)
    x = _tile_rows(x_MxD, start, tile)
    gate = jnp.dot(x, idx(w_gate_EDF, g), preferred_element_type=jnp.float32)
    up = jnp.dot(x, idx(w_up_EDF, g), preferred_element_type=jnp.float32)
    h = (jax.nn.silu(gate) * up).astype(dt)
    out = _put_rows(carry[0], jnp.dot(h, idx(w_down_EFD, g), preferred_element_type=jnp.float32),
                    start, own)
    if not keep:
      return (out,)
    return out, _put_rows(carry[1], gate, start, own), _put_rows(carry[2], up, start, own)

  like = (x_MxD, w_gate_EDF, w_up_EDF, w_down_EFD, plan[0])
  init = (_zeros((m, d), jnp.float32, *like),)
  if keep:
    init += (_zeros((m, f), jnp.float32, *like),) * 2
  return jax.lax.fori_loop(0, plan[3], body, init)


def _swiglu_bwd_loop(x_MxD, w_gate_EDF, w_up_EDF, w_down_EFD, gate_MxF, up_MxF, dout_MxD, plan,
                     tile: int):
  """One loop over the tiles for d x [M, D] and the fp32 d W_gate, d W_up, d W_down."""
  m, d = x_MxD.shape
  e, f = w_down_EFD.shape[:2]
  idx = functools.partial(jax.lax.dynamic_index_in_dim, keepdims=False)

  def accumulate(acc_E, g, delta):
    return jax.lax.dynamic_update_index_in_dim(acc_E, idx(acc_E, g) + delta, g, 0)

  def body(i, carry):
    dx_MxD, dwg, dwu, dwd = carry
    g, start, own = _tile_window(plan, i, m, tile)
    x = _tile_rows(x_MxD, start, tile).astype(jnp.float32)
    gate, up = _tile_rows(gate_MxF, start, tile), _tile_rows(up_MxF, start, tile)
    dy = jnp.where(own, _tile_rows(dout_MxD, start, tile).astype(jnp.float32), 0.0)
    sig = jax.nn.sigmoid(gate)
    silu = gate * sig
    h = (silu * up).astype(x_MxD.dtype).astype(jnp.float32)
    dh = jnp.dot(dy, idx(w_down_EFD, g).astype(jnp.float32).T)
    d_up = dh * silu
    d_gate = dh * up * sig * (1.0 + gate * (1.0 - sig))
    dx = (jnp.dot(d_gate, idx(w_gate_EDF, g).astype(jnp.float32).T)
          + jnp.dot(d_up, idx(w_up_EDF, g).astype(jnp.float32).T))
    return (_put_rows(dx_MxD, dx, start, own),
            accumulate(dwg, g, jnp.dot(x.T, d_gate)),   # a.T @ b: see `_tiled_rhs_grad`.
            accumulate(dwu, g, jnp.dot(x.T, d_up)),
            accumulate(dwd, g, jnp.dot(h.T, dy)))

  like = (x_MxD, w_gate_EDF, w_up_EDF, w_down_EFD, gate_MxF, dout_MxD, plan[0])
  init = (_zeros((m, d), jnp.float32, *like), _zeros((e, d, f), jnp.float32, *like),
          _zeros((e, d, f), jnp.float32, *like), _zeros((e, f, d), jnp.float32, *like))
  return jax.lax.fori_loop(0, plan[3], body, init)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _swiglu_tiled(x_MxD, w_gate_EDF, w_up_EDF, w_down_EFD, group_sizes_E, tile):
  plan = _tile_plan(group_sizes_E, x_MxD.shape[0], tile)
  return _swiglu_loop(x_MxD, w_gate_EDF, w_up_EDF, w_down_EFD, plan, tile, keep=False)[0]


def _swiglu_tiled_fwd(x_MxD, w_gate_EDF, w_up_EDF, w_down_EFD, group_sizes_E, tile):
  plan = _tile_plan(group_sizes_E, x_MxD.shape[0], tile)
  out, gate, up = _swiglu_loop(x_MxD, w_gate_EDF, w_up_EDF, w_down_EFD, plan, tile, keep=True)
  return out, (x_MxD, w_gate_EDF, w_up_EDF, w_down_EFD, group_sizes_E, gate, up)


def _swiglu_tiled_bwd(tile, res, dout_MxD):
  x_MxD, w_gate_EDF, w_up_EDF, w_down_EFD, group_sizes_E, gate, up = res
  plan = _tile_plan(group_sizes_E, x_MxD.shape[0], tile)
  dx, dwg, dwu, dwd = _swiglu_bwd_loop(x_MxD, w_gate_EDF, w_up_EDF, w_down_EFD, gate, up, dout_MxD,
                                       plan, tile)
  return (_matched(dx.astype(x_MxD.dtype), x_MxD), _matched(dwg.astype(w_gate_EDF.dtype), w_gate_EDF),
          _matched(dwu.astype(w_up_EDF.dtype), w_up_EDF),
          _matched(dwd.astype(w_down_EFD.dtype), w_down_EFD), None)


_swiglu_tiled.defvjp(_swiglu_tiled_fwd, _swiglu_tiled_bwd)


def expert_swiglu(x_sorted_MxD: jax.Array, w_gate_EDF: jax.Array, w_up_EDF: jax.Array,
                  w_down_EFD: jax.Array, group_sizes_E: jax.Array, tile: int | None = None) -> jax.Array:
  """Routed SwiGLU experts on expert-sorted rows: (silu(x Wg[e]) * x Wu[e]) Wd[e] for the rows of
  group e (arXiv 2002.05202 Eq. 6), fp32 [M, D]; rows beyond sum(group_sizes) are zeros.

  Operands in one compute dtype; gate/up accumulate in fp32 and h is cast back to it, exactly as
  three `gmm` calls would. On CPU one tile loop does all three matmuls per tile (and one more loop
  the whole backward pass, with gate/up kept from the forward pass); elsewhere three `gmm_ragged`.
  """
  m = x_sorted_MxD.shape[0]
  d = w_down_EFD.shape[2]
  if jax.default_backend() != "cpu":
    gate = gmm_ragged(x_sorted_MxD, w_gate_EDF, group_sizes_E, jnp.float32)
    up = gmm_ragged(x_sorted_MxD, w_up_EDF, group_sizes_E, jnp.float32)
    h = (jax.nn.silu(gate) * up).astype(x_sorted_MxD.dtype)
    return gmm_ragged(h, w_down_EFD, group_sizes_E, jnp.float32)
  if m == 0:
    return jnp.zeros((0, d), jnp.float32)
  tile = min(int(tile or default_tile(m, w_gate_EDF.shape[0])), m)
  return _swiglu_tiled(x_sorted_MxD, w_gate_EDF, w_up_EDF, w_down_EFD,
                       group_sizes_E.astype(jnp.int32), tile)


def gmm(lhs_MxK: jax.Array, rhs_ExKxN: jax.Array, group_sizes_E: jax.Array,
        preferred_element_type=None) -> jax.Array:
  """The XLA grouped matmul: `gmm_tiled` on CPU, `gmm_ragged` (`jax.lax.ragged_dot`) on
  accelerators. All give the same values."""
  if jax.default_backend() == "cpu":
    return gmm_tiled(lhs_MxK, rhs_ExKxN, group_sizes_E,
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
