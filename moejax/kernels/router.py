"""Fused MoE router in Pallas: scores, biased top-k, gates and the balance statistics in one pass.

For each tile of tokens the kernel reads the router logits once and produces
  * scores s = softmax(logits) or sigmoid(logits) (fp32; DeepSeek-V3 arXiv 2412.19437 Eq. 15),
  * expert_idx = top-k of s + b (the ALF-LB bias, arXiv 2408.15664 Eq. 3 / V3 Eq. 16), as K rounds
    of row-max + mask; equal values break toward the lower expert index,
  * gates from the *unbiased* scores, renormalised over the K picks (V3 Eq. 13, +1e-20) when asked,
    times `routed_scaling_factor`,
  * per-tile partial sums of the expert counts (the ALF-LB load c_i) and of the scores (T * P_i of
    the Switch aux loss, arXiv 2101.03961 Eq. 4-6); XLA adds the per-tile partials.
The backward (`jax.custom_vjp`) recomputes gates, scores and score sums in plain XLA from the logits
and the kernel's expert_idx, so d(logits) is the same computation as the reference router's.
Group-limited routing (V3 node-limited, `n_groups > 0`) does not use the kernel: it runs the same
tile math as one XLA computation over all tokens.

GPU lowers through Triton (power-of-two blocks: E and K are padded to powers of two, padded experts
can never be picked); CPU runs the kernel with `interpret=True`. TPU also runs the generic kernel.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from moejax.kernels import target

RENORM_EPS = 1e-20
SCORE_FUNCTIONS = ("softmax", "sigmoid")
_NEG = -jnp.inf


def _scores(x_TxE, score_fn: str):
  if score_fn == "softmax":
    z = x_TxE - jnp.max(x_TxE, axis=1, keepdims=True)
    p = jnp.exp(z)
    return p / jnp.sum(p, axis=1, keepdims=True)
  return 1.0 / (1.0 + jnp.exp(-x_TxE))


def _group_mask(sel_TxE, n_groups: int, topk_groups: int):
  """V3 group-limited selection: keep the `topk_groups` groups with the largest top-2 sums."""
  t, e = sel_TxE.shape
  per = e // n_groups
  grouped = sel_TxE.reshape(t, n_groups, per)
  top1 = jnp.max(grouped, axis=-1, keepdims=True)
  iota_P = jax.lax.broadcasted_iota(jnp.int32, grouped.shape, 2)
  first = jnp.min(jnp.where(grouped == top1, iota_P, per), axis=-1, keepdims=True)
  top2 = jnp.max(jnp.where(iota_P == first, _NEG, grouped), axis=-1, keepdims=True)
  score_TxG = (top1 + (top2 if per > 1 else 0.0))[..., 0]
  iota_G = jax.lax.broadcasted_iota(jnp.int32, score_TxG.shape, 1)
  keep_TxG = jnp.zeros(score_TxG.shape, bool)
  for _ in range(topk_groups):
    best = jnp.max(score_TxG, axis=1, keepdims=True)
    pick = jnp.min(jnp.where(score_TxG == best, iota_G, n_groups), axis=1, keepdims=True)
    keep_TxG = keep_TxG | (iota_G == pick)
    score_TxG = jnp.where(iota_G == pick, _NEG, score_TxG)
  return jnp.where(keep_TxG[..., None], grouped, _NEG).reshape(t, e)


def route_tile(x_TxE, bias_1xE, valid_Tx1, *, k: int, kp: int, score_fn: str, renormalize: bool,
               scale: float, n_groups: int = 0, topk_groups: int = 0):
  """Router math on one tile (used inside the kernel and as the XLA fallback).

  Returns (idx_TxKp int32, gates_TxKp, scores_TxE, counts_1xE, score_sums_1xE); columns >= k of
  the [T, Kp] outputs are padding.
  """
  s_TxE = _scores(x_TxE.astype(jnp.float32), score_fn)
  sel_TxE = s_TxE + bias_1xE
  if n_groups:
    sel_TxE = _group_mask(sel_TxE, n_groups, topk_groups)
  t, e = s_TxE.shape
  iota_E = jax.lax.broadcasted_iota(jnp.int32, (t, e), 1)
  iota_K = jax.lax.broadcasted_iota(jnp.int32, (t, kp), 1)
  idx_TxK = jnp.zeros((t, kp), jnp.int32)
  gates_TxK = jnp.zeros((t, kp), jnp.float32)
  picked_TxE = jnp.zeros((t, e), jnp.float32)
  for j in range(k):
    best_Tx1 = jnp.max(sel_TxE, axis=1, keepdims=True)
    pick_Tx1 = jnp.min(jnp.where(sel_TxE == best_Tx1, iota_E, e), axis=1, keepdims=True)
    hit_TxE = iota_E == pick_Tx1
    gate_Tx1 = jnp.sum(jnp.where(hit_TxE, s_TxE, 0.0), axis=1, keepdims=True)
    idx_TxK = jnp.where(iota_K == j, pick_Tx1, idx_TxK)
    gates_TxK = jnp.where(iota_K == j, gate_Tx1, gates_TxK)
    picked_TxE = picked_TxE + hit_TxE.astype(jnp.float32)
    sel_TxE = jnp.where(hit_TxE, _NEG, sel_TxE)
  if renormalize:
    gates_TxK = gates_TxK / (jnp.sum(gates_TxK, axis=1, keepdims=True) + RENORM_EPS)
  gates_TxK = gates_TxK * scale
  counts_1xE = jnp.sum(picked_TxE * valid_Tx1, axis=0, keepdims=True)
  sums_1xE = jnp.sum(s_TxE * valid_Tx1, axis=0, keepdims=True)
  return idx_TxK, gates_TxK, s_TxE, counts_1xE, sums_1xE


def _router_kernel(logits_ref, bias_ref, valid_ref, idx_ref, gates_ref, scores_ref, counts_ref,
                   sums_ref, **kw):
  idx, gates, scores, counts, sums = route_tile(logits_ref[...], bias_ref[...], valid_ref[...], **kw)
  idx_ref[...] = idx
  gates_ref[...] = gates
  scores_ref[...] = scores
  counts_ref[...] = counts
  sums_ref[...] = sums


def _next_pow2(x: int) -> int:
  return 1 << max(0, (x - 1).bit_length())


def _kernel_route(logits_TxE, bias_E, valid_T, *, top_k, score_fn, renormalize, scale, block_t,
                  interpret):
  t, e = logits_TxE.shape
  ep, kp = _next_pow2(e), _next_pow2(top_k)
  tt = min(block_t, _next_pow2(t))
  tp = -(-t // tt) * tt
  nt = tp // tt
  logits = jnp.pad(logits_TxE.astype(jnp.float32), ((0, tp - t), (0, ep - e)), constant_values=_NEG)
  logits = logits.at[t:, :].set(0.0)  # padded tokens: finite logits (they are masked out below)
  bias = jnp.pad(bias_E.astype(jnp.float32), (0, ep - e), constant_values=_NEG)[None, :]
  valid = jnp.pad(valid_T.astype(jnp.float32), (0, tp - t))[:, None]
  kernel = functools.partial(_router_kernel, k=top_k, kp=kp, score_fn=score_fn,
                             renormalize=renormalize, scale=float(scale))
  compiler_params = None
  if not interpret and target.backend() == "gpu":
    from jax.experimental.pallas import triton as plgpu  # pylint: disable=g-import-not-at-top
    params_cls = getattr(plgpu, "CompilerParams", None) or getattr(plgpu, "TritonCompilerParams")
    compiler_params = params_cls(num_warps=4, num_stages=1)
  rows = lambda width: pl.BlockSpec((tt, width), lambda i: (i, 0))
  # Per-tile partial sums as [nt, 1, Ep] with a squeezed leading block dim: the block's last two
  # dims then equal the array's, as Mosaic (TPU) requires of blocks not divisible by (8, 128).
  per_tile = pl.BlockSpec((None, 1, ep), lambda i: (i, 0, 0))
  idx, gates, scores, counts, sums = pl.pallas_call(
      kernel,
      out_shape=(jax.ShapeDtypeStruct((tp, kp), jnp.int32),
                 jax.ShapeDtypeStruct((tp, kp), jnp.float32),
                 jax.ShapeDtypeStruct((tp, ep), jnp.float32),
                 jax.ShapeDtypeStruct((nt, 1, ep), jnp.float32),
                 jax.ShapeDtypeStruct((nt, 1, ep), jnp.float32)),
      grid=(nt,),
      in_specs=[rows(ep), pl.BlockSpec((1, ep), lambda i: (0, 0)), rows(1)],
      out_specs=(rows(kp), rows(kp), rows(ep), per_tile, per_tile),
      interpret=interpret,
      compiler_params=compiler_params,
      name="moejax_router",
  )(logits, bias, valid)
  return (idx[:t, :top_k], gates[:t, :top_k], scores[:t, :e], counts.sum((0, 1))[:e], sums.sum((0, 1))[:e])


def _xla_gates(logits_TxE, idx_TxK, valid_T, score_fn, renormalize, scale):
  """Differentiable part of routing for fixed picks (the custom VJP recomputes this in XLA)."""
  s_TxE = _scores(logits_TxE.astype(jnp.float32), score_fn)
  gates_TxK = jnp.take_along_axis(s_TxE, idx_TxK, axis=-1)
  if renormalize:
    gates_TxK = gates_TxK / (gates_TxK.sum(axis=-1, keepdims=True) + RENORM_EPS)
  gates_TxK = gates_TxK * jnp.asarray(scale, jnp.float32)
  return gates_TxK, s_TxE, jnp.sum(s_TxE * valid_T[:, None], axis=0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6, 7, 8))
def _fused(logits_TxE, bias_E, valid_T, top_k, score_fn, renormalize, scale, block_t, interpret):
  return _kernel_route(logits_TxE, bias_E, valid_T, top_k=top_k, score_fn=score_fn,
                       renormalize=renormalize, scale=scale, block_t=block_t, interpret=interpret)


def _fused_fwd(logits_TxE, bias_E, valid_T, *static):
  out = _fused(logits_TxE, bias_E, valid_T, *static)
  return out, (logits_TxE, bias_E, valid_T, out[0])


def _fused_bwd(top_k, score_fn, renormalize, scale, block_t, interpret, res, cts):
  del top_k, block_t, interpret
  logits_TxE, bias_E, valid_T, idx_TxK = res
  _, d_gates, d_scores, _, d_sums = cts
  _, vjp = jax.vjp(lambda x: _xla_gates(x, idx_TxK, valid_T, score_fn, renormalize, scale),
                   logits_TxE)
  (d_logits,) = vjp((d_gates, d_scores, d_sums))
  return d_logits.astype(logits_TxE.dtype), jnp.zeros_like(bias_E), jnp.zeros_like(valid_T)


_fused.defvjp(_fused_fwd, _fused_bwd)


def fused_route(logits_TxE: jax.Array, bias_E: Optional[jax.Array] = None, *, top_k: int,
                score_fn: str, renormalize: bool, routed_scaling_factor: float = 1.0,
                token_mask_T: Optional[jax.Array] = None, n_groups: int = 0,
                topk_groups: int = 0, block_t: int = 64, interpret: Optional[bool] = None):
  """Fused router. Returns (expert_idx_TxK int32, gates_TxK fp32, scores_TxE fp32,
  tokens_per_expert_E fp32, score_sums_E fp32).

  Matches `moejax.model.routing.route` (expert_idx, gates, scores) and gives
  tokens_per_expert_E = number of (token, choice) picks of each expert and score_sums_E =
  sum_t s_{i,t}, both over the tokens where `token_mask_T` is true (all tokens when None).
  `bias_E` (ALF-LB) only affects the selection and gets a zero gradient.
  `n_groups > 0` (group-limited routing) runs in XLA, not in the kernel.
  """
  if logits_TxE.ndim != 2:
    raise ValueError(f"fused_route: logits_TxE must be [T, E], got shape {logits_TxE.shape}")
  t, e = logits_TxE.shape
  if score_fn not in SCORE_FUNCTIONS:
    raise ValueError(f"fused_route: score_fn={score_fn!r}: expected one of {SCORE_FUNCTIONS}")
  if not isinstance(top_k, int) or not 1 <= top_k <= e:
    raise ValueError(f"fused_route: top_k={top_k!r}: expected an int between 1 and E={e}")
  bias_E = jnp.zeros((e,), jnp.float32) if bias_E is None else jnp.asarray(bias_E, jnp.float32)
  if bias_E.shape != (e,):
    raise ValueError(f"fused_route: bias_E must have shape ({e},), got {bias_E.shape}")
  bias_E = jax.lax.stop_gradient(bias_E)
  valid_T = (jnp.ones((t,), jnp.float32) if token_mask_T is None
             else jnp.asarray(token_mask_T).reshape(t).astype(jnp.float32))
  if n_groups or topk_groups:
    if n_groups <= 0 or e % n_groups or not 1 <= topk_groups <= n_groups:
      raise ValueError(f"fused_route: n_groups={n_groups}, topk_groups={topk_groups}: expected a "
                       f"divisor of E={e} and 1 <= topk_groups <= n_groups")
    idx, _, _, counts, _ = route_tile(
        jax.lax.stop_gradient(logits_TxE), bias_E[None, :], valid_T[:, None], k=top_k, kp=top_k,
        score_fn=score_fn, renormalize=renormalize, scale=routed_scaling_factor,
        n_groups=n_groups, topk_groups=topk_groups)
    gates, scores, sums = _xla_gates(logits_TxE, idx, valid_T, score_fn, renormalize,
                                     routed_scaling_factor)
    return idx, gates, scores, counts[0], sums
  if interpret is None:
    interpret = target.backend() == "cpu"
  return _fused(logits_TxE, bias_E, valid_T, top_k, score_fn, bool(renormalize),
                float(routed_scaling_factor), int(block_t), bool(interpret))
