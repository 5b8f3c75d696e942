"""Causal grouped-query self-attention with document (segment) masking and a slot-ordered KV cache.

Masking rule (design.md): a query attends to a key iff the key's cache slot is <= the query's slot and
both carry the same *nonzero* segment id. Segment id 0 marks padding / empty slots; a query of
segment 0 attends to nothing and its output is exactly 0 (no NaN). Packed documents therefore never
see each other, and left-padded rows in a decode batch ignore their padding.

References:
  Scaled dot-product attention: Vaswani et al., arXiv 1706.03762, Eq. 1.
  Grouped-query attention: Ainslie et al., arXiv 2305.13245 (query head h uses kv head h // (H/G),
    the `repeat_kv` layout of HF Llama/Mixtral/Qwen3).
  QK-norm: RMSNorm on q and k before RoPE, per head as Qwen3 (`qk_norm_scope="head"`) or over all
    heads jointly as OLMoE, arXiv 2409.02060 (`qk_norm_scope="all"`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx, struct

from moejax import sharding
from moejax.model.config import ModelConfig
from moejax.model.layers import RMSNorm, apply_rope, dtype_of, normal_param


@struct.dataclass
class KVCache:
  """Per-layer keys/values in slot order plus the segment id of every slot.

  k, v: tuples (one entry per layer) of [B, G, S, Dh] (head-major, the layout the attention
  matmuls read without a transpose; MLA: [B, S, 1, R] latents and [B, S, 1, Dr] RoPE keys);
  segment_ids_BxS: int32, 0 = empty/padding; index: int32 scalar, the next slot to write (shared
  by all rows). fresh (static): nothing written yet (as `create` makes it). A forward pass on a
  fresh cache is a prefill: its tokens attend only among themselves, with causal block skipping,
  exactly as without a cache (every other slot is empty); the cache it returns is not fresh.
  """
  k: tuple[jax.Array, ...]
  v: tuple[jax.Array, ...]
  segment_ids_BxS: jax.Array
  index: jax.Array
  fresh: bool = struct.field(pytree_node=False, default=False)

  @classmethod
  def create(cls, cfg: ModelConfig, batch: int, max_len: int, dtype=None) -> "KVCache":
    if batch <= 0 or max_len <= 0:
      raise ValueError(f"KVCache.create: batch and max_len must be positive, got {batch}, {max_len}")
    dt = dtype_of(cfg.compute_dtype) if dtype is None else jnp.dtype(dtype)
    shape = v_shape = (batch, cfg.kv_heads, max_len, cfg.head_size)
    if cfg.attention == "mla":  # MLA caches its latent c_kv in `k` and the shared RoPE key in `v`.
      shape, v_shape = (batch, max_len, 1, cfg.kv_lora_rank), (batch, max_len, 1, cfg.qk_rope_head_dim)
    zeros = tuple(jnp.zeros(shape, dt) for _ in range(cfg.num_layers))
    return cls(k=zeros, v=tuple(jnp.zeros(v_shape, dt) for _ in range(cfg.num_layers)),
               segment_ids_BxS=jnp.zeros((batch, max_len), jnp.int32),
               index=jnp.zeros((), jnp.int32), fresh=True)

  @property
  def max_len(self) -> int:
    return self.segment_ids_BxS.shape[1]

  def write_segments(self, segment_ids_BxL: jax.Array) -> jax.Array:
    """Slot segment ids after writing the L new ones at `index` (does not advance the index)."""
    return jax.lax.dynamic_update_slice(self.segment_ids_BxS, segment_ids_BxL.astype(jnp.int32),
                                        (0, self.index))


# ----------------------------------------------------------------------------------------------
# Pure functions.
# ----------------------------------------------------------------------------------------------

def attention_mask(q_segment_BxL: jax.Array, kv_segment_BxS: jax.Array,
                   q_slot_L: jax.Array) -> jax.Array:
  """Boolean [B, L, S]: key slot <= query slot, same segment, and the query's segment nonzero."""
  kv_slot_S = jnp.arange(kv_segment_BxS.shape[1], dtype=jnp.int32)
  causal_LxS = kv_slot_S[None, :] <= q_slot_L[:, None]
  same_BxLxS = q_segment_BxL[:, :, None] == kv_segment_BxS[:, None, :]
  return causal_LxS[None] & same_BxLxS & (q_segment_BxL != 0)[:, :, None]


def masked_softmax(scores_BxHxLxS: jax.Array, mask_BxLxS: jax.Array) -> jax.Array:
  """softmax over S in fp32; masked entries, and every entry of a row with no allowed key, get 0.

  scores may carry extra head axes between B and L ([B, ..., L, S]). The mask enters as an additive
  bias (0 or the fp32 minimum, so exp underflows to exactly 0 for masked keys of a row that has an
  allowed key) and one row-validity select, instead of a select before and after the softmax.
  """
  extra = scores_BxHxLxS.ndim - 3
  mask = mask_BxLxS.reshape(mask_BxLxS.shape[:1] + (1,) * extra + mask_BxLxS.shape[1:])
  bias = jnp.where(mask, 0.0, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores_BxHxLxS.astype(jnp.float32) + bias, axis=-1)
  return jnp.where(jnp.any(mask, axis=-1, keepdims=True), probs, 0.0)


def causal_chunks(length: int) -> int:
  """Query chunks for `causal_blocks`: up to 4 of >= 128 tokens that divide L (1: no chunking).

  Each block costs slices of q, k, v and of the mask; on XLA CPU 2 chunks measured fastest at
  L = 256 and 4 at L = 1024 (forward + backward of one attention layer).
  """
  n = min(4, length // 128)
  while n > 1 and length % n:
    n -= 1
  return max(n, 1)


def causal_blocks(core, q_parts, kv_parts, mask_BxLxS: jax.Array, chunks: int) -> jax.Array:
  """core(q_parts, kv_parts, mask) with the L queries cut into `chunks` blocks, block i attending
  only to keys [0, (i+1) L/chunks): causal block skipping, (chunks+1)/(2 chunks) of the work.

  Valid when query i sits in key slot i (self-attention without a cache): the skipped keys are
  later slots, masked for every query of the block, so they would get probability exactly 0.
  q_parts / kv_parts are head-major arrays with L / S on axis -2; returns core's outputs (L on
  axis -2) concatenated on that axis.
  """
  if chunks <= 1:
    return core(q_parts, kv_parts, mask_BxLxS)
  c = mask_BxLxS.shape[1] // chunks
  outs = [core([q[..., i * c:(i + 1) * c, :] for q in q_parts],
               [kv[..., :(i + 1) * c, :] for kv in kv_parts],
               mask_BxLxS[:, i * c:(i + 1) * c, :(i + 1) * c]) for i in range(chunks)]
  return jnp.concatenate(outs, axis=-2)


def attention_core(q_BxGxRxLxDh: jax.Array, k_BxGxSxDh: jax.Array, v_BxGxSxDh: jax.Array,
                   mask_BxLxS: jax.Array) -> jax.Array:
  """softmax(q k^T / sqrt(Dh)) v on head-major operands (query head (g, r) uses kv head g).

  Returns [B, G, R, L, Dh] fp32. Batch-leading layouts keep XLA's batched matmuls free of
  transposes (about 2x faster on CPU, forward and backward, than contracting [B, L, H, Dh]).
  """
  dh = q_BxGxRxLxDh.shape[-1]
  dt = q_BxGxRxLxDh.dtype
  scores = jnp.einsum("bgrld,bgsd->bgrls", q_BxGxRxLxDh, k_BxGxSxDh.astype(dt),
                      preferred_element_type=jnp.float32) * (dh ** -0.5)
  probs = masked_softmax(scores, mask_BxLxS)
  return jnp.einsum("bgrls,bgsd->bgrld", probs.astype(dt), v_BxGxSxDh.astype(dt),
                    preferred_element_type=jnp.float32)


def dot_product_attention(q_BxLxHxDh: jax.Array, k_BxSxGxDh: jax.Array, v_BxSxGxDh: jax.Array,
                          mask_BxLxS: jax.Array, chunks: int = 1) -> jax.Array:
  """softmax(q k^T / sqrt(Dh)) v with GQA head grouping (arXiv 1706.03762 Eq. 1, 2305.13245).

  Scores and softmax in fp32 (`masked_softmax`); fully masked query rows return 0. `chunks` > 1
  applies `causal_blocks` (only for self-attention without a cache). Output in q's dtype.
  """
  b, l, h, dh = q_BxLxHxDh.shape
  g = k_BxSxGxDh.shape[2]
  if h % g:
    raise ValueError(f"attention: {h} query heads not divisible by {g} kv heads")
  q_t = q_BxLxHxDh.reshape(b, l, g, h // g, dh).transpose(0, 2, 3, 1, 4)   # [B, G, R, L, Dh]
  k_t, v_t = k_BxSxGxDh.transpose(0, 2, 1, 3), v_BxSxGxDh.transpose(0, 2, 1, 3)  # [B, G, S, Dh]
  return head_major_attention(q_t, k_t, v_t, mask_BxLxS, chunks).astype(q_BxLxHxDh.dtype)


def head_major_attention(q_BxGxRxLxDh: jax.Array, k_BxGxSxDh: jax.Array, v_BxGxSxDh: jax.Array,
                         mask_BxLxS: jax.Array, chunks: int = 1) -> jax.Array:
  """`attention_core` under `causal_blocks`, returned token-major: [B, L, H = G*R, Dh] fp32."""
  b, g, r, l, dh = q_BxGxRxLxDh.shape
  out = causal_blocks(lambda qs, kvs, m: attention_core(*qs, *kvs, m), [q_BxGxRxLxDh],
                      [k_BxGxSxDh, v_BxGxSxDh], mask_BxLxS, chunks)
  return out.transpose(0, 3, 1, 2, 4).reshape(b, l, g * r, dh)


# ----------------------------------------------------------------------------------------------
# Module.
# ----------------------------------------------------------------------------------------------

class Attention(nnx.Module):
  """Multi-head / grouped-query causal self-attention with RoPE and optional QK-norm."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    d, h, g, dh = cfg.d_model, cfg.num_heads, cfg.kv_heads, cfg.head_size
    self.rope_theta = cfg.rope_theta
    self.compute_dtype = dtype_of(cfg.compute_dtype)
    self.wq_DxHxDh = normal_param(rngs, (d, h, dh), ("embed", "heads", "head_dim"), cfg)
    self.wk_DxGxDh = normal_param(rngs, (d, g, dh), ("embed", "kv_heads", "head_dim"), cfg)
    self.wv_DxGxDh = normal_param(rngs, (d, g, dh), ("embed", "kv_heads", "head_dim"), cfg)
    self.wo_HxDhxD = normal_param(rngs, (h, dh, d), ("heads", "head_dim", "embed"), cfg)
    self.qk_norm_all = cfg.qk_norm_scope == "all"  # OLMoE: one RMSNorm over all H*Dh (G*Dh) dims.
    if cfg.qk_norm and self.qk_norm_all:
      self.q_norm = RMSNorm(h * dh, cfg, rngs=rngs, axis_name=None)
      self.k_norm = RMSNorm(g * dh, cfg, rngs=rngs, axis_name=None)
    elif cfg.qk_norm:
      self.q_norm = RMSNorm(dh, cfg, rngs=rngs, axis_name="head_dim")
      self.k_norm = RMSNorm(dh, cfg, rngs=rngs, axis_name="head_dim")
    else:
      self.q_norm = self.k_norm = None

  def __call__(self, x_BxLxD: jax.Array, positions_BxL: jax.Array, segment_ids_BxL: jax.Array, *,
               cache: KVCache | None = None, layer: int = 0):
    """Returns (y_BxLxD, (k_BxGxSxDh, v_BxGxSxDh) or None).

    Without a cache, or with a fresh one (prefill), the L tokens attend among themselves (slots
    0..L-1; `causal_blocks` skips the key blocks after each query block). With a cache, the new
    keys and values of layer `layer` are written at slots cache.index .. cache.index+L-1 and the
    queries attend over all S slots; the updated (k, v) of this layer is returned for the caller
    to store (with a fresh cache too). The caller keeps
    index + L <= S (dynamic_update_slice would clamp the write otherwise).
    """
    dt = self.compute_dtype
    x = x_BxLxD.astype(dt)
    b, length, _ = x.shape
    h, g = self.wq_DxHxDh.shape[1], self.wk_DxGxDh.shape[1]
    q = jnp.einsum("bld,dhk->blhk", x, self.wq_DxHxDh[...].astype(dt))
    k = jnp.einsum("bld,dgk->blgk", x, self.wk_DxGxDh[...].astype(dt))
    v = jnp.einsum("bld,dgk->blgk", x, self.wv_DxGxDh[...].astype(dt))
    if self.q_norm is not None and self.qk_norm_all:
      q = self.q_norm(q.reshape(*q.shape[:2], -1)).reshape(q.shape)
      k = self.k_norm(k.reshape(*k.shape[:2], -1)).reshape(k.shape)
    elif self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    q = apply_rope(q, positions_BxL, self.rope_theta)
    k = apply_rope(k, positions_BxL, self.rope_theta)
    q = sharding.constrain(q, ("batch", "length", "heads", "head_dim"))
    k = sharding.constrain(k, ("batch", "length", "kv_heads", "head_dim"))
    v = sharding.constrain(v, ("batch", "length", "kv_heads", "head_dim"))
    # Head-major for the attention matmuls (and the cache): [B, G, R, L, Dh], [B, G, L, Dh].
    q_t = q.reshape(b, length, g, h // g, -1).transpose(0, 2, 3, 1, 4)
    k_t, v_t = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)

    segment_ids_BxL = segment_ids_BxL.astype(jnp.int32)
    new_kv = None
    if cache is not None:
      if not 0 <= layer < len(cache.k):
        raise ValueError(f"Attention: layer={layer} but the cache holds {len(cache.k)} layers")
      if length > cache.max_len:
        raise ValueError(f"Attention: {length} new tokens exceed the cache's {cache.max_len} slots")
      start = (0, 0, cache.index, 0)   # a fresh cache has index 0
      new_kv = (jax.lax.dynamic_update_slice(cache.k[layer], k_t.astype(cache.k[layer].dtype), start),
                jax.lax.dynamic_update_slice(cache.v[layer], v_t.astype(cache.v[layer].dtype), start))
    if cache is None or cache.fresh:   # the L new tokens attend among themselves (slots 0..L-1).
      q_slot_L = jnp.arange(length, dtype=jnp.int32)
      k_all, v_all, kv_segment_BxS, chunks = k_t, v_t, segment_ids_BxL, causal_chunks(length)
    else:
      q_slot_L = cache.index + jnp.arange(length, dtype=jnp.int32)
      (k_all, v_all), kv_segment_BxS, chunks = new_kv, cache.write_segments(segment_ids_BxL), 1

    mask = attention_mask(segment_ids_BxL, kv_segment_BxS, q_slot_L)
    out_BxLxHxDh = head_major_attention(q_t, k_all, v_all, mask, chunks).astype(dt)
    y = jnp.einsum("blhk,hkd->bld", out_BxLxHxDh, self.wo_HxDhxD[...].astype(dt))
    return y, new_kv
