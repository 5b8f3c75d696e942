"""Decoder-only (MoE) transformer: pre-norm blocks, tied or untied LM head, KV-cache decoding.

Block i computes  h = x + Attn(RMSNorm(x));  x' = h + FFN(RMSNorm(h)),  where FFN is a dense SwiGLU
`MLP(d_model, ff_dim)` or, when `cfg.is_moe_layer(i)`, `moejax.model.moe.MoELayer` (imported only
when a model has MoE layers, so dense models need nothing from moe.py). MoE layers receive the
previous MoE layer's router logits (MoE++ gating residual, arXiv 2410.07348 Eq. 6) and the token
mask `segment_ids != 0`. Pre-norm residual layout as in GPT-2/Llama (Xiong et al., arXiv 2002.04745).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moejax import sharding
from moejax.model.attention import Attention, KVCache
from moejax.model.config import ModelConfig
from moejax.model.layers import MLP, Embed, RMSNorm, dtype_of, normal_param

RESIDUAL_AXES = ("batch", "length", "embed")


class Block(nnx.Module):
  """One pre-norm transformer layer; `ffn` is an MLP or an MoELayer (`is_moe`)."""

  def __init__(self, cfg: ModelConfig, layer: int, *, rngs: nnx.Rngs):
    self.layer = layer
    self.is_moe = cfg.is_moe_layer(layer)
    self.attn_norm = RMSNorm(cfg.d_model, cfg, rngs=rngs)
    if cfg.attention == "mla":
      from moejax.model.mla import MLAttention  # pylint: disable=import-outside-toplevel
      self.attn = MLAttention(cfg, rngs=rngs)
    else:
      self.attn = Attention(cfg, rngs=rngs)
    self.ffn_norm = RMSNorm(cfg.d_model, cfg, rngs=rngs)
    if self.is_moe:
      from moejax.model.moe import MoELayer  # pylint: disable=import-outside-toplevel
      self.ffn = MoELayer(cfg, rngs=rngs)
    else:
      self.ffn = MLP(cfg.d_model, cfg.ff_dim, cfg, rngs=rngs)

  def __call__(self, x_BxLxD, positions_BxL, segment_ids_BxL, *, cache=None, prev_logits=None,
               deterministic=True, rngs=None):
    """Returns (x_BxLxD, new_kv, aux or None, router_logits_BxLxE or None)."""
    a, new_kv = self.attn(self.attn_norm(x_BxLxD), positions_BxL, segment_ids_BxL,
                          cache=cache, layer=self.layer)
    x = sharding.constrain(x_BxLxD + a.astype(x_BxLxD.dtype), RESIDUAL_AXES)
    h = self.ffn_norm(x)
    aux = logits = None
    if self.is_moe:
      y, aux, logits = self.ffn(h, prev_logits_BxLxE=prev_logits, token_mask_BxL=segment_ids_BxL != 0,
                                deterministic=deterministic, rngs=rngs)
    else:
      y = self.ffn(h)
    x = sharding.constrain(x + y.astype(x.dtype), RESIDUAL_AXES)
    return x, new_kv, aux, logits


class Transformer(nnx.Module):
  """Decoder-only LM. `model(tokens_BxL) -> logits_BxLxV` (fp32); see `forward` for the full API."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    if not isinstance(cfg, ModelConfig):
      raise TypeError(f"Transformer: cfg must be a ModelConfig, got {type(cfg).__name__}")
    self.cfg = cfg
    self.embed = Embed(cfg, rngs=rngs)
    self.blocks = nnx.List([Block(cfg, i, rngs=rngs) for i in range(cfg.num_layers)])
    self.final_norm = RMSNorm(cfg.d_model, cfg, rngs=rngs)
    if cfg.tie_embeddings:
      self.lm_head_DxV = None
    else:
      self.lm_head_DxV = normal_param(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), cfg)

  def init_cache(self, batch: int, max_len: int, dtype=None) -> KVCache:
    """An empty cache (all slots segment 0, index 0) in cfg.compute_dtype unless `dtype` is given."""
    if max_len > self.cfg.max_seq_len:
      raise ValueError(f"init_cache: max_len={max_len} exceeds model.max_seq_len={self.cfg.max_seq_len}")
    return KVCache.create(self.cfg, batch, max_len, dtype)

  def __call__(self, tokens_BxL: jax.Array) -> jax.Array:
    return self.forward(tokens_BxL)[0]

  def forward(self, tokens_BxL: jax.Array, *, positions_BxL: jax.Array | None = None,
              segment_ids_BxL: jax.Array | None = None, cache: KVCache | None = None,
              deterministic: bool = True, rngs: nnx.Rngs | None = None):
    """Returns (logits_BxLxV fp32, aux, cache); `forward_hidden` followed by `logits`."""
    h_BxLxD, aux, cache = self.forward_hidden(tokens_BxL, positions_BxL=positions_BxL,
                                              segment_ids_BxL=segment_ids_BxL, cache=cache,
                                              deterministic=deterministic, rngs=rngs)
    return self.logits(h_BxLxD), aux, cache

  def head_weight_DxV(self) -> jax.Array:
    """The LM head as [d_model, vocab] in the compute dtype (the embedding table^T when tied)."""
    if self.lm_head_DxV is None:
      return self.embed.embedding_VxD[...].astype(self.embed.compute_dtype).T
    return self.lm_head_DxV[...].astype(dtype_of(self.cfg.compute_dtype))

  def logits(self, h_BxLxD: jax.Array) -> jax.Array:
    """LM-head logits [B, L, V] in fp32 of final hidden states from `forward_hidden`."""
    w = self.head_weight_DxV()
    logits_BxLxV = jnp.einsum("bld,dv->blv", h_BxLxD.astype(w.dtype), w,
                              preferred_element_type=jnp.float32)
    return sharding.constrain(logits_BxLxV, ("batch", "length", "vocab"))

  def forward_hidden(self, tokens_BxL: jax.Array, *, positions_BxL: jax.Array | None = None,
                     segment_ids_BxL: jax.Array | None = None, cache: KVCache | None = None,
                     deterministic: bool = True, rngs: nnx.Rngs | None = None):
    """Returns (final-normed hidden states h_BxLxD, aux, cache): everything but the LM head
    (`logits(h)`; the trainer's fused loss, `moejax.model.lm_loss`, applies the head itself).

    positions default to arange(L) (+ cache.index when decoding); segment ids default to ones
    (0 = padding: attends to nothing, ignored by MoE statistics). `aux[name]` stacks the MoE
    layers' values on a leading axis (empty dict for a dense model). With a cache, the L tokens are
    written at slots index..index+L-1 and the returned cache has index + L.
    """
    cfg = self.cfg
    if tokens_BxL.ndim != 2:
      raise ValueError(f"Transformer.forward: tokens must be [B, L], got shape {tokens_BxL.shape}")
    b, l = tokens_BxL.shape
    for name, arr in (("positions_BxL", positions_BxL), ("segment_ids_BxL", segment_ids_BxL)):
      if arr is not None and arr.shape != (b, l):
        raise ValueError(f"Transformer.forward: {name} has shape {arr.shape}, expected {(b, l)}")
    if cache is not None:
      if cache.segment_ids_BxS.shape[0] != b or len(cache.k) != cfg.num_layers:
        raise ValueError(f"Transformer.forward: cache is for batch {cache.segment_ids_BxS.shape[0]} "
                         f"and {len(cache.k)} layers, got batch {b} and {cfg.num_layers} layers")
    if segment_ids_BxL is None:
      segment_ids_BxL = jnp.ones((b, l), jnp.int32)
    if positions_BxL is None:
      offset = 0 if cache is None else cache.index
      positions_BxL = jnp.broadcast_to(offset + jnp.arange(l, dtype=jnp.int32), (b, l))
    segment_ids_BxL = segment_ids_BxL.astype(jnp.int32)

    x = sharding.constrain(self.embed(tokens_BxL), RESIDUAL_AXES)
    new_k, new_v, auxes = [], [], []
    prev_logits = None
    for block in self.blocks:
      x, new_kv, aux, logits = block(x, positions_BxL, segment_ids_BxL, cache=cache,
                                     prev_logits=prev_logits, deterministic=deterministic, rngs=rngs)
      if new_kv is not None:
        new_k.append(new_kv[0])
        new_v.append(new_kv[1])
      if aux is not None:
        auxes.append(aux)
        prev_logits = logits

    x = self.final_norm(x)

    aux_stacked = {k: jnp.stack([a[k] for a in auxes]) for k in auxes[0]} if auxes else {}
    if cache is not None:
      cache = cache.replace(k=tuple(new_k), v=tuple(new_v),
                            segment_ids_BxS=cache.write_segments(segment_ids_BxL),
                            index=cache.index + l, fresh=False)
    return x, aux_stacked, cache
