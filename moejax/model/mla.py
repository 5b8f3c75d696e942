"""Multi-head latent attention (MLA) with a latent KV cache.

DeepSeek-V2 (arXiv 2405.04434, Sec. 2.1.2-2.1.3, Eqs. 9-19) / DeepSeek-V3 (arXiv 2412.19437,
Sec. 2.1.1, Eqs. 1-11). For token t with hidden state h_t:

  c^KV_t = RMSNorm(W^DKV h_t)                       (Eq. 1; the latent, rank d_c = kv_lora_rank)
  k^C_{t,i} = W^UK_i c^KV_t,  v^C_{t,i} = W^UV_i c^KV_t                    (Eqs. 2, 5)
  k^R_t = RoPE(W^KR h_t)                             (Eq. 3; one RoPE key shared by all heads)
  c^Q_t = RMSNorm(W^DQ h_t),  q^C_{t,i} = W^UQ_i c^Q_t,  q^R_{t,i} = RoPE(W^QR_i c^Q_t)   (Eqs. 6-8)
  o_{t,i} = sum_j softmax_j([q^C; q^R]_{t,i} . [k^C; k^R]_{j,i} / sqrt(d_h + d_h^R)) v^C_{j,i}  (Eq. 10)
  u_t = W^O [o_{t,1}; ...; o_{t,H}]                  (Eq. 11)

With `q_lora_rank == 0` the query is a full-rank projection of h_t (DeepSeek-V2-Lite). RoPE uses the
rotate-half layout of `layers.apply_rope`; checkpoints with DeepSeek's interleaved RoPE pairs are
permuted once at import (`moejax.convert`), which leaves q.k unchanged.

KV cache: the `attention.KVCache` semantics (slots, segment ids, index) with `k[layer]` holding the
normalised latent c^KV [B, S, 1, d_c] and `v[layer]` the rotated shared key k^R [B, S, 1, d_h^R]
(`KVCache.create` sizes them for `cfg.attention == "mla"`), i.e. (d_c + d_h^R) numbers per token
and layer instead of 2 H Dh. Multi-token calls expand the latent into per-head keys/values; one-token
decode steps use the absorbed form (W^UK folded into the query and W^UV applied after the
attention-weighted sum of latents, V2 Sec. 2.1.2), so a step never materialises per-head keys.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moejax.model.attention import (KVCache, attention_mask, causal_blocks, causal_chunks,
                                    masked_softmax)
from moejax.model.config import ModelConfig
from moejax.model.layers import RMSNorm, apply_rope, dtype_of, normal_param

# The latent RMSNorms use a fixed eps (DeepSeek's reference `RMSNorm(q_lora_rank)` default, kept by
# HF `DeepseekV3RMSNorm`), not the residual stream's `rms_norm_eps`.
MLA_NORM_EPS = 1e-6


# ----------------------------------------------------------------------------------------------
# Pure functions.
# ----------------------------------------------------------------------------------------------

def _masked_softmax(scores_BxHxLxS: jax.Array, mask_BxLxS: jax.Array) -> jax.Array:
  """softmax over S in fp32 with masked entries (and fully masked rows) giving probability 0."""
  return masked_softmax(scores_BxHxLxS, mask_BxLxS)


def mla_expanded(q_nope_BxLxHxDn, q_rope_BxLxHxDr, c_kv_BxSxR, k_rope_BxSxDr, w_uk_RxHxDn,
                 w_uv_RxHxDv, mask_BxLxS, scale: float, chunks: int = 1) -> jax.Array:
  """MLA (V3 Eqs. 2-10) with per-head keys/values expanded from the latent; returns [B, L, H, Dv].

  Computed head-major ([B, H, L, .]); `chunks` > 1 applies `causal_blocks` (self-attention
  without a cache only).
  """
  dt = q_nope_BxLxHxDn.dtype
  k_nope = jnp.einsum("bsr,rhn->bhsn", c_kv_BxSxR.astype(dt), w_uk_RxHxDn)
  v = jnp.einsum("bsr,rhv->bhsv", c_kv_BxSxR.astype(dt), w_uv_RxHxDv)
  q_nope, q_rope = q_nope_BxLxHxDn.transpose(0, 2, 1, 3), q_rope_BxLxHxDr.transpose(0, 2, 1, 3)

  def core(qs, kvs, mask):
    (qn, qr), (kn, kr, vv) = qs, kvs
    scores = (jnp.einsum("bhln,bhsn->bhls", qn, kn, preferred_element_type=jnp.float32)
              + jnp.einsum("bhld,bsd->bhls", qr, kr.astype(dt),
                           preferred_element_type=jnp.float32)) * scale
    probs = _masked_softmax(scores, mask)
    return jnp.einsum("bhls,bhsv->bhlv", probs.astype(dt), vv, preferred_element_type=jnp.float32)

  out = causal_blocks(core, [q_nope, q_rope], [k_nope, k_rope_BxSxDr, v], mask_BxLxS, chunks)
  return out.transpose(0, 2, 1, 3).astype(dt)


def mla_absorbed(q_nope_BxLxHxDn, q_rope_BxLxHxDr, c_kv_BxSxR, k_rope_BxSxDr, w_uk_RxHxDn,
                 w_uv_RxHxDv, mask_BxLxS, scale: float) -> jax.Array:
  """The same attention with W^UK absorbed into the query and W^UV applied after the weighted sum
  of latents (V2 arXiv 2405.04434 Sec. 2.1.2): q^C.k^C = (W^UK^T q^C).c^KV. Returns [B, L, H, Dv]."""
  dt = q_nope_BxLxHxDn.dtype
  q_lat = jnp.einsum("blhn,rhn->blhr", q_nope_BxLxHxDn, w_uk_RxHxDn)
  scores = (jnp.einsum("blhr,bsr->bhls", q_lat, c_kv_BxSxR.astype(dt),
                       preferred_element_type=jnp.float32)
            + jnp.einsum("blhd,bsd->bhls", q_rope_BxLxHxDr, k_rope_BxSxDr.astype(dt),
                         preferred_element_type=jnp.float32)) * scale
  probs = _masked_softmax(scores, mask_BxLxS)
  o_lat = jnp.einsum("bhls,bsr->blhr", probs.astype(dt), c_kv_BxSxR.astype(dt))
  out = jnp.einsum("blhr,rhv->blhv", o_lat, w_uv_RxHxDv, preferred_element_type=jnp.float32)
  return out.astype(dt)


# ----------------------------------------------------------------------------------------------
# Module.
# ----------------------------------------------------------------------------------------------

class MLAttention(nnx.Module):
  """DeepSeek-V2/V3 multi-head latent attention; same call contract as `attention.Attention`.

  Params: `wq_a_DxQ`, `q_a_norm`, `wq_b_QxHxDq` (or `wq_DxHxDq` when q_lora_rank == 0),
  `wkv_a_DxR`, `kv_a_norm`, `wk_rope_DxDr`, `wk_b_RxHxDn`, `wv_b_RxHxDv`, `wo_HxDvxD`
  (Dq = Dn + Dr = qk_nope_head_dim + qk_rope_head_dim, R = kv_lora_rank, Q = q_lora_rank).
  """

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    if cfg.attention != "mla":
      raise ValueError(f"MLAttention: model.attention={cfg.attention!r}: expected 'mla'")
    d, h = cfg.d_model, cfg.num_heads
    dn, dr, dv, r, rq = (cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim,
                         cfg.kv_lora_rank, cfg.q_lora_rank)
    self.dn = dn
    self.scale = (dn + dr) ** -0.5
    self.rope_theta = cfg.rope_theta
    self.compute_dtype = dtype_of(cfg.compute_dtype)
    norm_cfg = cfg.replace(norm_eps=MLA_NORM_EPS)
    if rq:
      self.wq_a_DxQ = normal_param(rngs, (d, rq), ("embed", None), cfg)
      self.q_a_norm = RMSNorm(rq, norm_cfg, rngs=rngs, axis_name=None)
      self.wq_b_QxHxDq = normal_param(rngs, (rq, h, dn + dr), (None, "heads", "head_dim"), cfg)
      self.wq_DxHxDq = None
    else:
      self.wq_a_DxQ = self.q_a_norm = self.wq_b_QxHxDq = None
      self.wq_DxHxDq = normal_param(rngs, (d, h, dn + dr), ("embed", "heads", "head_dim"), cfg)
    self.wkv_a_DxR = normal_param(rngs, (d, r), ("embed", None), cfg)
    self.kv_a_norm = RMSNorm(r, norm_cfg, rngs=rngs, axis_name=None)
    self.wk_rope_DxDr = normal_param(rngs, (d, dr), ("embed", None), cfg)
    self.wk_b_RxHxDn = normal_param(rngs, (r, h, dn), (None, "heads", "head_dim"), cfg)
    self.wv_b_RxHxDv = normal_param(rngs, (r, h, dv), (None, "heads", "head_dim"), cfg)
    self.wo_HxDvxD = normal_param(rngs, (h, dv, d), ("heads", "head_dim", "embed"), cfg)

  def __call__(self, x_BxLxD: jax.Array, positions_BxL: jax.Array, segment_ids_BxL: jax.Array, *,
               cache: KVCache | None = None, layer: int = 0):
    """Returns (y_BxLxD, (c_kv_BxSx1xR, k_rope_BxSx1xDr) or None); see `Attention.__call__`."""
    dt = self.compute_dtype
    x = x_BxLxD.astype(dt)
    if self.wq_DxHxDq is not None:
      q = jnp.einsum("bld,dhk->blhk", x, self.wq_DxHxDq[...].astype(dt))
    else:
      c_q = self.q_a_norm(jnp.einsum("bld,dq->blq", x, self.wq_a_DxQ[...].astype(dt)))
      q = jnp.einsum("blq,qhk->blhk", c_q.astype(dt), self.wq_b_QxHxDq[...].astype(dt))
    q_nope, q_rope = q[..., :self.dn], q[..., self.dn:]
    q_rope = apply_rope(q_rope, positions_BxL, self.rope_theta)
    c_kv = self.kv_a_norm(jnp.einsum("bld,dr->blr", x, self.wkv_a_DxR[...].astype(dt))).astype(dt)
    k_rope = jnp.einsum("bld,dk->blk", x, self.wk_rope_DxDr[...].astype(dt))
    k_rope = apply_rope(k_rope[:, :, None, :], positions_BxL, self.rope_theta)  # [B, L, 1, Dr]

    segment_ids_BxL = segment_ids_BxL.astype(jnp.int32)
    length = x.shape[1]
    if cache is None:
      q_slot_L = jnp.arange(length, dtype=jnp.int32)
      c_all, kr_all, kv_segment_BxS, new_kv = c_kv[:, :, None, :], k_rope, segment_ids_BxL, None
    else:
      if not 0 <= layer < len(cache.k):
        raise ValueError(f"MLAttention: layer={layer} but the cache holds {len(cache.k)} layers")
      if cache.k[layer].shape[-1] != c_kv.shape[-1] or cache.v[layer].shape[-1] != k_rope.shape[-1]:
        raise ValueError(f"MLAttention: cache slots of width {cache.k[layer].shape[-1]}/"
                         f"{cache.v[layer].shape[-1]}, expected kv_lora_rank={c_kv.shape[-1]}/"
                         f"qk_rope_head_dim={k_rope.shape[-1]} (create it with an MLA config)")
      if length > cache.max_len:
        raise ValueError(f"MLAttention: {length} new tokens exceed the cache's {cache.max_len} slots")
      start = (0, cache.index, 0, 0)
      c_all = jax.lax.dynamic_update_slice(cache.k[layer], c_kv[:, :, None, :].astype(
          cache.k[layer].dtype), start)
      kr_all = jax.lax.dynamic_update_slice(cache.v[layer], k_rope.astype(cache.v[layer].dtype),
                                            start)
      kv_segment_BxS = cache.write_segments(segment_ids_BxL)
      q_slot_L = cache.index + jnp.arange(length, dtype=jnp.int32)
      new_kv = (c_all, kr_all)

    mask = attention_mask(segment_ids_BxL, kv_segment_BxS, q_slot_L)
    args = (q_nope, q_rope, c_all[:, :, 0, :], kr_all[:, :, 0, :],
            self.wk_b_RxHxDn[...].astype(dt), self.wv_b_RxHxDv[...].astype(dt), mask, self.scale)
    if cache is not None and length == 1:
      out = mla_absorbed(*args)
    else:
      out = mla_expanded(*args, chunks=causal_chunks(length) if cache is None else 1)
    y = jnp.einsum("blhv,hvd->bld", out, self.wo_HxDvxD[...].astype(dt))
    return y, new_kv
