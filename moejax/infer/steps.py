"""The jitted device functions of `moejax.infer.Engine`: prefill, one decode step, a decode loop.

All three take the model as (graphdef, state) — `jax.jit` of the split state with the graphdef
static, so a call does no nnx graph traversal — and donate the KV cache (argument 2), which the
forward updates in place.

  prefill  the left-padded prompt bucket through the model, filling the cache; samples token 0.
  decode   one token per row through the cache (the host loop: per-token latencies, stop strings
           checked on the host after every token).
  loop     up to `chunk` decode steps in one `jax.lax.while_loop` on the device: it stops early when
           every row is done (EOS, or inactive from the start); stop *strings* are checked on the
           host between chunks. Token for token the same computation as `decode` repeated.

`TRACES[kind]` counts traces (a Python side effect runs once per trace).
"""

from __future__ import annotations

import collections

import jax
import jax.numpy as jnp
from flax import nnx

from moejax.infer import sampling

TRACES: collections.Counter = collections.Counter()


def _experts_used(aux, num_experts: int) -> jax.Array:
  """[num_moe_layers] int32: FFN experts that got at least one token this step (0 layers if dense)."""
  if "tokens_per_expert" not in aux:
    return jnp.zeros((0,), jnp.int32)
  load_LxE = aux["tokens_per_expert"][:, :num_experts]
  return jnp.sum(load_LxE > 0, axis=-1).astype(jnp.int32)


def prefill_fn(graphdef, state, cache, tokens_BxL, segment_ids_BxL, positions_BxL, seed_key,
               row_ids_B, temperature, top_k, top_p):
  """Returns (token_B int32 sampled at step 0, cache)."""
  TRACES["prefill"] += 1
  model = nnx.merge(graphdef, state)
  h_BxLxD, _, cache = model.forward_hidden(tokens_BxL, positions_BxL=positions_BxL,
                                          segment_ids_BxL=segment_ids_BxL, cache=cache)
  # Rows are left-padded: the last position is every row's last prompt token; only its logits
  # are needed (the LM head over all L positions would be most of a short prompt's FLOPs).
  logits_Bx1xV = model.logits(h_BxLxD[:, -1:])
  keys_B = sampling.row_keys(seed_key, jnp.zeros((), jnp.int32), row_ids_B)
  next_B = sampling.sample(logits_Bx1xV[:, 0], keys_B, temperature, top_k, top_p)
  return next_B, cache


def _step(model, cache, tokens_B, positions_B, active_B, step, seed_key, row_ids_B, temperature,
          top_k, top_p):
  """Feeds tokens_B at positions_B (inactive rows as padding, segment 0); samples the next token."""
  logits_Bx1xV, aux, cache = model.forward(
      tokens_B[:, None], positions_BxL=positions_B[:, None],
      segment_ids_BxL=active_B.astype(jnp.int32)[:, None], cache=cache)
  keys_B = sampling.row_keys(seed_key, step, row_ids_B)
  next_B = sampling.sample(logits_Bx1xV[:, 0], keys_B, temperature, top_k, top_p)
  return next_B, cache, _experts_used(aux, model.cfg.num_experts)


def decode_fn(graphdef, state, cache, tokens_B, positions_B, active_B, step, seed_key, row_ids_B,
              temperature, top_k, top_p):
  """One decode step. Returns (next_B, cache, experts_L)."""
  TRACES["decode"] += 1
  return _step(nnx.merge(graphdef, state), cache, tokens_B, positions_B, active_B, step, seed_key,
               row_ids_B, temperature, top_k, top_p)


def loop_fn(graphdef, state, cache, tokens_B, positions_B, active_B, first_step, num_steps,
            seed_key, row_ids_B, temperature, top_k, top_p, eos_ids_N, ignore_eos, buffer_BxC):
  """Up to C = buffer_BxC.shape[1] decode steps first_step, first_step+1, ... in a while loop.

  Step i feeds the previous token of every row (rows with active_B False as padding), samples the
  next one into column i of the buffer, and retires rows that sampled an id in eos_ids_N (unless
  ignore_eos); the loop ends after `num_steps` (<= C) steps or when no row is active.
  Returns (tokens_BxC, steps_done, experts_CxL, cache, last_B, positions_B, active_B): columns
  >= steps_done of tokens_BxC are unused.
  """
  TRACES["loop"] += 1
  model = nnx.merge(graphdef, state)
  chunk = buffer_BxC.shape[1]
  layers = len(model.cfg.moe_layers) if model.cfg.num_experts else 0

  def cond(carry):
    i, active = carry[0], carry[5]
    return (i < jnp.minimum(num_steps, chunk)) & jnp.any(active)

  def body(carry):
    i, cache, tokens, positions, out_BxC, active, experts_CxL = carry
    nxt, cache, experts_L = _step(model, cache, tokens, positions, active, first_step + i,
                                  seed_key, row_ids_B, temperature, top_k, top_p)
    out_BxC = jax.lax.dynamic_update_slice(out_BxC, nxt[:, None], (0, i))
    experts_CxL = jax.lax.dynamic_update_slice(experts_CxL, experts_L[None], (i, 0))
    ended = jnp.any(nxt[:, None] == eos_ids_N[None, :], axis=-1) & ~ignore_eos
    return i + 1, cache, nxt, positions + 1, out_BxC, active & ~ended, experts_CxL

  init = (jnp.zeros((), jnp.int32), cache, tokens_B, positions_B, buffer_BxC, active_B,
          jnp.zeros((chunk, layers), jnp.int32))
  i, cache, last, positions, out_BxC, active, experts_CxL = jax.lax.while_loop(cond, body, init)
  return out_BxC, i, experts_CxL, cache, last, positions, active


JITTED = {"prefill": jax.jit(prefill_fn, static_argnums=0, donate_argnums=2),
          "decode": jax.jit(decode_fn, static_argnums=0, donate_argnums=2),
          "loop": jax.jit(loop_fn, static_argnums=0, donate_argnums=2)}
