"""Grouped matmul (GMM) in Pallas: rows of `lhs` sorted by expert, one weight matrix per expert.

out[r] = lhs[r] @ rhs[g(r)] for r < sum(group_sizes), zeros below (same contract as
`moejax.kernels.xla.gmm` / `jax.lax.ragged_dot`). This is the expert FFN of dropless MoE
(MegaBlocks, arXiv 2211.15841, Sec. 5: block-sparse / grouped GEMM), scheduled the megablox way:
the output is tiled over (M, N) with a K loop, and an M-tile that straddles group boundaries is
visited once per group it holds, with the rows of the other groups masked to zero.

GPU (Triton): each program owns one (M-tile, N-tile) of the output and walks the groups that
intersect its M-tile, read from a per-tile schedule (`first_group_Mt`, `last_group_Mt`, computed
with jnp from group_sizes) and the group offsets; every visit is a masked K loop accumulating in
fp32. Programs write disjoint tiles, so no atomics and no output pre-zeroing are needed.
`tgmm` (the weight gradient, [E, K, N]) gives each program one (expert, K-tile, N-tile) and walks
the M-tiles of that expert. On TPU the same operation goes to jax's Mosaic megablox kernels; on CPU
the Triton-style kernels run with `interpret=True`.

Backward (`jax.custom_vjp`): dlhs = gmm(dout, rhs^T) (rhs read transposed in the kernel, never
materialised), drhs = tgmm(lhs, dout).
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from moejax.kernels import autotune, target

Tiles = tuple[int, int, int]  # (tm, tk, tn)


def _backend() -> str:
  return target.backend()


def _resolve_interpret(interpret: Optional[bool]) -> bool:
  return _backend() == "cpu" if interpret is None else bool(interpret)


def _compiler_params(interpret: bool, num_warps: int = 4, num_stages: int = 3):
  if interpret or _backend() != "gpu":
    return None
  from jax.experimental.pallas import triton as plgpu  # pylint: disable=g-import-not-at-top
  params_cls = getattr(plgpu, "CompilerParams", None) or getattr(plgpu, "TritonCompilerParams")
  return params_cls(num_warps=num_warps, num_stages=num_stages)


def group_offsets(group_sizes_E: jax.Array) -> jax.Array:
  """[E+1] int32 row offsets: group e holds rows [offsets[e], offsets[e+1])."""
  ends_E = jnp.cumsum(group_sizes_E.astype(jnp.int32))
  return jnp.concatenate([jnp.zeros((1,), jnp.int32), ends_E]).astype(jnp.int32)


def tile_schedule(group_sizes_E: jax.Array, m: int, tm: int) -> tuple[jax.Array, jax.Array]:
  """Per M-tile visit range: tile i must visit groups first[i]..last[i] (inclusive).

  A tile with no row below sum(group_sizes) gets last = first - 1 (no visit: its rows stay zero).
  Empty groups inside the range cost nothing (their K loop has zero trips).
  """
  ends_E = jnp.cumsum(group_sizes_E.astype(jnp.int32))
  total = ends_E[-1]
  tile_start_Mt = jnp.arange(0, m, tm, dtype=jnp.int32)
  tile_last_row_Mt = jnp.minimum(tile_start_Mt + tm, total) - 1
  first_Mt = jnp.searchsorted(ends_E, tile_start_Mt, side="right").astype(jnp.int32)
  last_Mt = jnp.searchsorted(ends_E, tile_last_row_Mt, side="right").astype(jnp.int32)
  last_Mt = jnp.where(tile_start_Mt < total, last_Mt, first_Mt - 1)
  return first_Mt, last_Mt


def _dot(x, w, transpose_w: bool):
  dims = (((1,), (1,)), ((), ())) if transpose_w else (((1,), (0,)), ((), ()))
  return jax.lax.dot_general(x, w, dims, preferred_element_type=jnp.float32)


def _gmm_kernel(offsets_ref, first_ref, last_ref, lhs_ref, rhs_ref, out_ref, *, tm, tk, tn, nk,
                transpose_rhs):
  i, j = pl.program_id(0), pl.program_id(1)
  rows_Tm1 = i * tm + jax.lax.broadcasted_iota(jnp.int32, (tm, 1), 0)

  def group_visit(g, acc_TmxTn):
    start, end = offsets_ref[g], offsets_ref[g + 1]
    in_group_Tm1 = (rows_Tm1 >= start) & (rows_Tm1 < end)
    trips = jnp.where(end > start, nk, 0)

    def k_step(kk, acc):
      x = lhs_ref[:, pl.ds(kk * tk, tk)]
      x = jnp.where(in_group_Tm1, x, jnp.zeros_like(x))
      if transpose_rhs:
        w = rhs_ref[g, pl.ds(j * tn, tn), pl.ds(kk * tk, tk)]
      else:
        w = rhs_ref[g, pl.ds(kk * tk, tk), pl.ds(j * tn, tn)]
      return acc + _dot(x, w, transpose_rhs)

    return jax.lax.fori_loop(0, trips, k_step, acc_TmxTn)

  acc = jax.lax.fori_loop(first_ref[i], last_ref[i] + 1, group_visit,
                          jnp.zeros((tm, tn), jnp.float32))
  out_ref[...] = acc.astype(out_ref.dtype)


def _gmm_call(lhs_MxK, rhs, group_sizes_E, tiles: Tiles, transpose_rhs: bool, interpret: bool,
              out_dtype):
  """Aligned-shape GMM: M % tm == K % tk == N % tn == 0. rhs is [E,K,N] ([E,N,K] if transposed)."""
  tm, tk, tn = tiles
  m, k = lhs_MxK.shape
  n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  first_Mt, last_Mt = tile_schedule(group_sizes_E, m, tm)
  kernel = functools.partial(_gmm_kernel, tm=tm, tk=tk, tn=tn, nk=k // tk,
                             transpose_rhs=transpose_rhs)
  whole = pl.BlockSpec()
  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((m, n), out_dtype),
      grid=(m // tm, n // tn),
      in_specs=[whole, whole, whole, pl.BlockSpec((tm, k), lambda i, j: (i, 0)), whole],
      out_specs=pl.BlockSpec((tm, tn), lambda i, j: (i, j)),
      interpret=interpret,
      compiler_params=_compiler_params(interpret),
      name="moejax_gmm",
  )(group_offsets(group_sizes_E), first_Mt, last_Mt, lhs_MxK, rhs)


def _tgmm_kernel(offsets_ref, lhs_ref, dout_ref, out_ref, *, tm, tk, tn):
  e, a, b = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  start, end = offsets_ref[e], offsets_ref[e + 1]
  first_tile = start // tm
  stop_tile = jnp.where(end > start, (end + tm - 1) // tm, first_tile)

  def m_step(mi, acc_TkxTn):
    rows_Tm1 = mi * tm + jax.lax.broadcasted_iota(jnp.int32, (tm, 1), 0)
    in_group_Tm1 = (rows_Tm1 >= start) & (rows_Tm1 < end)
    x = lhs_ref[pl.ds(mi * tm, tm), :]
    x = jnp.where(in_group_Tm1, x, jnp.zeros_like(x))
    y = dout_ref[pl.ds(mi * tm, tm), :]
    return acc_TkxTn + jax.lax.dot_general(x, y, (((0,), (0,)), ((), ())),
                                           preferred_element_type=jnp.float32)

  del a, b  # the K and N tiles come in through the BlockSpecs
  acc = jax.lax.fori_loop(first_tile, stop_tile, m_step, jnp.zeros((tk, tn), jnp.float32))
  out_ref[...] = acc.astype(out_ref.dtype)


def _tgmm_call(lhs_MxK, dout_MxN, group_sizes_E, tiles: Tiles, interpret: bool, out_dtype):
  """Per-group lhs^T @ dout -> [E, K, N] (zeros for empty groups). Aligned shapes only."""
  tm, tk, tn = tiles
  m, k = lhs_MxK.shape
  n = dout_MxN.shape[1]
  e = group_sizes_E.shape[0]
  kernel = functools.partial(_tgmm_kernel, tm=tm, tk=tk, tn=tn)
  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((e, k, n), out_dtype),
      grid=(e, k // tk, n // tn),
      in_specs=[pl.BlockSpec(), pl.BlockSpec((m, tk), lambda g, a, b: (0, a)),
                pl.BlockSpec((m, tn), lambda g, a, b: (0, b))],
      out_specs=pl.BlockSpec((None, tk, tn), lambda g, a, b: (g, a, b)),
      interpret=interpret,
      compiler_params=_compiler_params(interpret),
      name="moejax_tgmm",
  )(group_offsets(group_sizes_E), lhs_MxK, dout_MxN)


def tgmm(lhs_MxK: jax.Array, dout_MxN: jax.Array, group_sizes_E: jax.Array, *,
         tiles: Optional[Tiles] = None, interpret: Optional[bool] = None) -> jax.Array:
  """Transposed GMM: out[e] = lhs[rows of e]^T @ dout[rows of e], [E, K, N], fp32 accumulation."""
  interpret = _resolve_interpret(interpret)
  m, k = lhs_MxK.shape
  n = dout_MxN.shape[1]
  tiles = tiles or autotune.default_tiles(m, k, n, lhs_MxK.dtype, interpret)
  lhs_p, dout_p = _pad_to(lhs_MxK, (tiles[0], tiles[1])), _pad_to(dout_MxN, (tiles[0], tiles[2]))
  out = _tgmm_call(lhs_p, dout_p, group_sizes_E.astype(jnp.int32), tiles, interpret,
                   jnp.result_type(lhs_MxK, dout_MxN))
  return out[:, :k, :n]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _gmm_aligned(lhs_MxK, rhs_ExKxN, group_sizes_E, tiles, interpret, out_dtype):
  return _gmm_call(lhs_MxK, rhs_ExKxN, group_sizes_E, tiles, False, interpret, out_dtype)


def _gmm_aligned_fwd(lhs_MxK, rhs_ExKxN, group_sizes_E, tiles, interpret, out_dtype):
  out = _gmm_aligned(lhs_MxK, rhs_ExKxN, group_sizes_E, tiles, interpret, out_dtype)
  return out, (lhs_MxK, rhs_ExKxN, group_sizes_E)


def _gmm_aligned_bwd(tiles, interpret, out_dtype, res, dout_MxN):
  del out_dtype
  lhs_MxK, rhs_ExKxN, group_sizes_E = res
  tm, tk, tn = tiles
  dout_MxN = dout_MxN.astype(lhs_MxK.dtype)
  dlhs = _gmm_call(dout_MxN, rhs_ExKxN, group_sizes_E, (tm, tn, tk), True, interpret, lhs_MxK.dtype)
  drhs = _tgmm_call(lhs_MxK, dout_MxN, group_sizes_E, tiles, interpret, rhs_ExKxN.dtype)
  return dlhs, drhs, None


_gmm_aligned.defvjp(_gmm_aligned_fwd, _gmm_aligned_bwd)


def _pad_to(x, multiples):
  pads = [(0, (-d) % mult) for d, mult in zip(x.shape[-len(multiples):], multiples)]
  pads = [(0, 0)] * (x.ndim - len(multiples)) + pads
  return jnp.pad(x, pads) if any(p for _, p in pads) else x


def _check_args(lhs_MxK, rhs_ExKxN, group_sizes_E):
  if lhs_MxK.ndim != 2:
    raise ValueError(f"gmm: lhs_MxK must be 2-D [M, K], got shape {lhs_MxK.shape}")
  if rhs_ExKxN.ndim != 3 or rhs_ExKxN.shape[1] != lhs_MxK.shape[1]:
    raise ValueError(f"gmm: rhs_ExKxN must be [E, K={lhs_MxK.shape[1]}, N], got {rhs_ExKxN.shape}")
  if group_sizes_E.shape != (rhs_ExKxN.shape[0],):
    raise ValueError(f"gmm: group_sizes_E must be [E={rhs_ExKxN.shape[0]}], got "
                     f"{group_sizes_E.shape}")
  if not jnp.issubdtype(group_sizes_E.dtype, jnp.integer):
    raise ValueError(f"gmm: group_sizes_E must be integer, got {group_sizes_E.dtype}")


def gmm(lhs_MxK: jax.Array, rhs_ExKxN: jax.Array, group_sizes_E: jax.Array,
        preferred_element_type=None, *, tiles: Optional[Tiles] = None,
        interpret: Optional[bool] = None) -> jax.Array:
  """Grouped matmul [M,K] x [E,K,N] -> [M,N]; rows past sum(group_sizes) are zero.

  Args:
    tiles: (tm, tk, tn) powers of two; None -> `autotune.gmm_tiles` (measured once per device
      kind, shapes and dtype on GPU; a fixed default under interpret mode).
    interpret: run the Pallas interpreter; None -> True on CPU only.
  Shapes that the tiles do not divide are zero-padded (M: the padded rows belong to no group).
  """
  _check_args(lhs_MxK, rhs_ExKxN, group_sizes_E)
  compute_dtype = jnp.result_type(lhs_MxK, rhs_ExKxN)
  out_dtype = jnp.dtype(preferred_element_type or compute_dtype)
  lhs_MxK, rhs_ExKxN = lhs_MxK.astype(compute_dtype), rhs_ExKxN.astype(compute_dtype)
  group_sizes_E = group_sizes_E.astype(jnp.int32)
  interpret = _resolve_interpret(interpret)
  m, k = lhs_MxK.shape
  n = rhs_ExKxN.shape[2]
  if not interpret and _backend() == "tpu":
    return _gmm_tpu(lhs_MxK, rhs_ExKxN, group_sizes_E, tiles, out_dtype)
  if tiles is None:
    tiles = autotune.gmm_tiles(m, k, n, rhs_ExKxN.shape[0], compute_dtype, interpret,
                               run=functools.partial(_timed_gmm, interpret=interpret))
  tm, tk, tn = tiles
  lhs_p = _pad_to(lhs_MxK, (tm, tk))
  rhs_p = _pad_to(rhs_ExKxN, (tk, tn))
  out = _gmm_aligned(lhs_p, rhs_p, group_sizes_E, tuple(tiles), interpret, out_dtype)
  return out[:m, :n]


def _timed_gmm(lhs_MxK, rhs_ExKxN, group_sizes_E, tiles, *, interpret):
  """Forward + backward of one tile choice (what autotune times)."""
  def loss(lhs, rhs):
    return _gmm_aligned(lhs, rhs, group_sizes_E, tiles, interpret, lhs.dtype).sum(
        dtype=jnp.float32)
  return jax.grad(loss, argnums=(0, 1))(lhs_MxK, rhs_ExKxN)


def _gmm_tpu(lhs_MxK, rhs_ExKxN, group_sizes_E, tiles, out_dtype):
  """TPU: jax's Mosaic megablox kernel (its own custom VJP); rows past the groups are zeroed."""
  from jax.experimental.pallas.ops.tpu import megablox  # pylint: disable=g-import-not-at-top
  m, k = lhs_MxK.shape
  n = rhs_ExKxN.shape[2]
  tiles = tiles or (min(512, m), min(1024, k), min(1024, n))
  lhs_p = _pad_to(lhs_MxK, (tiles[0], 1))
  out = megablox.gmm(lhs_p, rhs_ExKxN, group_sizes_E, out_dtype, tuple(tiles))[:m]
  rows_M1 = jnp.arange(m, dtype=jnp.int32)[:, None]
  return jnp.where(rows_M1 < group_sizes_E.sum(), out, jnp.zeros((), out.dtype))
