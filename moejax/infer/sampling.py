"""Next-token selection: greedy, temperature, top-k and nucleus (top-p) sampling, as pure jnp.

Order of the filters follows the common warper chain (HF `generate`): logits are divided by the
temperature, then restricted to the `top_k` largest, then to the smallest set whose probability
(renormalised after top-k) reaches `top_p` (nucleus sampling, Holtzman et al., arXiv 1904.09751,
Sec. 3.1, Eq. 2). `temperature <= 0` means greedy (argmax; ties to the lowest id). All knobs are
traced scalars, so changing them never recompiles. Each row draws with its own key, so a request's
sample depends on (seed, request index, step) only, not on which requests share its batch.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """temperature 0 -> greedy; top_k 0 -> no top-k filter; top_p 1 -> no nucleus filter."""
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  seed: int = 0

  def __post_init__(self):
    if not self.temperature >= 0:
      raise ValueError(f"sampling.temperature={self.temperature!r}: expected a float >= 0")
    if not (isinstance(self.top_k, int) and self.top_k >= 0):
      raise ValueError(f"sampling.top_k={self.top_k!r}: expected an int >= 0 (0 = off)")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"sampling.top_p={self.top_p!r}: expected a float in (0, 1]")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0

  def as_arrays(self):
    """(temperature, top_k, top_p) as device scalars (traced, so no recompilation)."""
    return (jnp.asarray(self.temperature, jnp.float32), jnp.asarray(self.top_k, jnp.int32),
            jnp.asarray(self.top_p, jnp.float32))


def filter_logits(logits_BxV: jax.Array, temperature: jax.Array, top_k: jax.Array,
                  top_p: jax.Array) -> jax.Array:
  """Temperature-scaled logits with everything outside top-k / the top-p nucleus set to -inf.

  Ties at the k-th value are all kept (the filter is a threshold on the value).
  """
  v = logits_BxV.shape[-1]
  scaled_BxV = logits_BxV.astype(jnp.float32) / jnp.maximum(temperature, 1e-6)
  sorted_BxV = -jnp.sort(-scaled_BxV, axis=-1)                      # descending
  k = jnp.where(top_k > 0, jnp.minimum(top_k, v), v)
  kth_B = jnp.take(sorted_BxV, k - 1, axis=-1)
  in_topk_BxV = jnp.arange(v)[None, :] < k
  sorted_BxV = jnp.where(in_topk_BxV, sorted_BxV, -jnp.inf)
  probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)                  # renormalised after top-k
  mass_before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV
  keep_BxV = (mass_before_BxV < top_p) & in_topk_BxV
  keep_BxV = keep_BxV.at[:, 0].set(True)                           # always keep the argmax
  nucleus_min_B = jnp.min(jnp.where(keep_BxV, sorted_BxV, jnp.inf), axis=-1)
  threshold_B = jnp.maximum(kth_B, nucleus_min_B)
  return jnp.where(scaled_BxV >= threshold_B[:, None], scaled_BxV, -jnp.inf)


def row_keys(seed_key: jax.Array, step: jax.Array, row_ids_B: jax.Array) -> jax.Array:
  """One PRNG key per row: fold_in(fold_in(seed, step), request index)."""
  step_key = jax.random.fold_in(seed_key, step)
  return jax.vmap(lambda r: jax.random.fold_in(step_key, r))(row_ids_B)


def sample(logits_BxV: jax.Array, keys_B: jax.Array, temperature: jax.Array, top_k: jax.Array,
           top_p: jax.Array) -> jax.Array:
  """int32 [B] next tokens: argmax when temperature <= 0, else a draw from the filtered softmax.

  The knobs are traced, so the branches are `lax.cond`s: greedy decoding runs no sort or draw, and
  a draw with top_k 0 and top_p 1 (no filter) skips `filter_logits` and its vocabulary sort.
  """
  def draw(logits):
    scaled = logits.astype(jnp.float32) / jnp.maximum(temperature, 1e-6)
    filtered_BxV = jax.lax.cond((top_k > 0) | (top_p < 1.0),
                                lambda: filter_logits(logits, temperature, top_k, top_p),
                                lambda: scaled)
    return jax.vmap(jax.random.categorical)(keys_B, filtered_BxV).astype(jnp.int32)

  return jax.lax.cond(temperature <= 0,
                      lambda logits: jnp.argmax(logits, axis=-1).astype(jnp.int32), draw,
                      logits_BxV)
