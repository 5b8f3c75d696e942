"""Backbone building blocks: RMSNorm, token embedding, SwiGLU MLP and rotary position embedding.

Pure math (`rms_norm`, `swiglu`, `apply_rope`) is kept separate from the Flax NNX modules that own
the parameters. Parameters carry logical axis names in the `axes=` metadata key (resolved to mesh
axes by `moejax.sharding`), are stored in `cfg.param_dtype` and cast to `cfg.compute_dtype` for use.

References:
  RMSNorm: Zhang & Sennrich, arXiv 1910.07467, Eq. 4 (no re-centring, learned gain).
  SwiGLU: Shazeer, arXiv 2002.05202, Eq. 6 (FFN_SwiGLU = (Swish(x W) * x V) W2).
  RoPE: Su et al., arXiv 2104.09864, Eq. 34, in the "rotate-half" layout of HF Llama/Mixtral/Qwen3
    (dimension i is paired with i + Dh/2, not with its neighbour), so HF checkpoints import as-is.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from moejax.model.config import ModelConfig


def dtype_of(name: str) -> jnp.dtype:
  """'bfloat16' -> jnp.bfloat16 (names validated by ModelConfig)."""
  return jnp.dtype(name)


def normal_param(rngs: nnx.Rngs, shape: Sequence[int], axes: tuple[str, ...], cfg: ModelConfig,
                 std: float | None = None, dtype: str | None = None) -> nnx.Param:
  """A normal(0, std) initialised parameter with logical axis names (std defaults to cfg.init_std)."""
  if len(shape) != len(axes):
    raise ValueError(f"parameter shape {tuple(shape)} and axes {axes} must have the same rank")
  std = cfg.init_std if std is None else std
  dt = dtype_of(dtype or cfg.param_dtype)
  value = std * jax.random.normal(rngs.params(), tuple(shape), jnp.float32)
  return nnx.Param(value.astype(dt), axes=axes)


# ----------------------------------------------------------------------------------------------
# Pure functions.
# ----------------------------------------------------------------------------------------------

def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
  """y = x / sqrt(mean(x^2) + eps) * scale over the last axis; statistics in fp32 (arXiv 1910.07467 Eq. 4).

  Returns fp32; the caller casts to its compute dtype.
  """
  x32 = x.astype(jnp.float32)
  ms = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
  return x32 * jax.lax.rsqrt(ms + eps) * scale.astype(jnp.float32)


def swiglu(x_BxLxD: jax.Array, w_gate_DxF: jax.Array, w_up_DxF: jax.Array,
           w_down_FxD: jax.Array) -> jax.Array:
  """(silu(x W_gate) * x W_up) W_down (arXiv 2002.05202 Eq. 6); all operands in one dtype."""
  gate = jnp.einsum("...d,df->...f", x_BxLxD, w_gate_DxF)
  up = jnp.einsum("...d,df->...f", x_BxLxD, w_up_DxF)
  return jnp.einsum("...f,fd->...d", jax.nn.silu(gate) * up, w_down_FxD)


def rope_angles(positions_BxL: jax.Array, head_dim: int, theta: float) -> jax.Array:
  """Rotation angles [B, L, Dh/2]: position * theta^(-2i/Dh), i = 0..Dh/2-1 (arXiv 2104.09864 Eq. 15)."""
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  return positions_BxL.astype(jnp.float32)[..., None] * inv_freq


def apply_rope(x_BxLxHxDh: jax.Array, positions_BxL: jax.Array, theta: float) -> jax.Array:
  """Rotary embedding, rotate-half convention (HF Llama `apply_rotary_pos_emb`).

  out = x * cos(a) + rotate_half(x) * sin(a), rotate_half([x1, x2]) = [-x2, x1], with the angle of
  dimension i and i + Dh/2 both equal to pos * theta^(-2i/Dh). Computed in fp32, returned in x.dtype.
  """
  if x_BxLxHxDh.ndim != 4:
    raise ValueError(f"apply_rope: expected x of shape [B, L, H, Dh], got {x_BxLxHxDh.shape}")
  head_dim = x_BxLxHxDh.shape[-1]
  if head_dim % 2:
    raise ValueError(f"apply_rope: head dim must be even, got {head_dim}")
  if positions_BxL.shape != x_BxLxHxDh.shape[:2]:
    raise ValueError(f"apply_rope: positions shape {positions_BxL.shape} != x's [B, L] "
                     f"{x_BxLxHxDh.shape[:2]}")
  angles = rope_angles(positions_BxL, head_dim, theta)              # [B, L, Dh/2]
  angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]  # [B, L, 1, Dh]
  x = x_BxLxHxDh.astype(jnp.float32)
  x1, x2 = jnp.split(x, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  out = x * jnp.cos(angles) + rotated * jnp.sin(angles)
  return out.astype(x_BxLxHxDh.dtype)


# ----------------------------------------------------------------------------------------------
# Modules.
# ----------------------------------------------------------------------------------------------

class RMSNorm(nnx.Module):
  """RMSNorm over the last axis (size `dim`) with a learned gain initialised to 1.

  `axis_name` is the logical name of the normalised axis ("embed" for the residual stream,
  "head_dim" for QK-norm).
  """

  def __init__(self, dim: int, cfg: ModelConfig, *, rngs: nnx.Rngs, axis_name: str = "embed"):
    del rngs  # deterministic init; kept for a uniform constructor signature.
    self.eps = cfg.norm_eps
    self.compute_dtype = dtype_of(cfg.compute_dtype)
    self.scale = nnx.Param(jnp.ones((dim,), dtype_of(cfg.param_dtype)), axes=(axis_name,))

  def __call__(self, x: jax.Array) -> jax.Array:
    if x.shape[-1] != self.scale.shape[0]:
      raise ValueError(f"RMSNorm: last axis of input is {x.shape[-1]}, expected {self.scale.shape[0]}")
    return rms_norm(x, self.scale[...], self.eps).astype(self.compute_dtype)


class Embed(nnx.Module):
  """Token embedding table `embedding_VxD` (axes ("vocab", "embed")); `attend` is the tied LM head."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.compute_dtype = dtype_of(cfg.compute_dtype)
    self.embedding_VxD = normal_param(rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), cfg)

  def __call__(self, tokens_BxL: jax.Array) -> jax.Array:
    if not jnp.issubdtype(tokens_BxL.dtype, jnp.integer):
      raise TypeError(f"Embed: tokens must be integers, got dtype {tokens_BxL.dtype}")
    table = self.embedding_VxD[...]
    return jnp.take(table, tokens_BxL, axis=0).astype(self.compute_dtype)

  def attend(self, x_BxLxD: jax.Array) -> jax.Array:
    """Logits x E^T in fp32 (accumulated in fp32 from compute-dtype operands)."""
    table = self.embedding_VxD[...].astype(self.compute_dtype)
    return jnp.einsum("bld,vd->blv", x_BxLxD.astype(self.compute_dtype), table,
                      preferred_element_type=jnp.float32)


class MLP(nnx.Module):
  """SwiGLU feed-forward block d_model -> hidden -> d_model (arXiv 2002.05202 Eq. 6)."""

  def __init__(self, d_model: int, hidden: int, cfg: ModelConfig, *, rngs: nnx.Rngs):
    if d_model <= 0 or hidden <= 0:
      raise ValueError(f"MLP: d_model and hidden must be positive, got {d_model}, {hidden}")
    self.compute_dtype = dtype_of(cfg.compute_dtype)
    self.w_gate_DxF = normal_param(rngs, (d_model, hidden), ("embed", "mlp"), cfg)
    self.w_up_DxF = normal_param(rngs, (d_model, hidden), ("embed", "mlp"), cfg)
    self.w_down_FxD = normal_param(rngs, (hidden, d_model), ("mlp", "embed"), cfg)

  def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
    dt = self.compute_dtype
    return swiglu(x_BxLxD.astype(dt), self.w_gate_DxF[...].astype(dt),
                  self.w_up_DxF[...].astype(dt), self.w_down_FxD[...].astype(dt))
