"""The functional train and eval steps: loss, AdamW update, then the ALF-LB bias update.

State is a plain pytree `TrainState(step, params, model_state, opt_state, rng)` where `params` are the
model's `nnx.Param`s (the only thing the optimizer sees) and `model_state` is everything else the
model holds, in particular the ALF-LB `RouterBias` of every MoE layer (no gradient, not in the
optimizer state; arXiv 2408.15664 Algorithm 1 updates it after the optimizer step from the expert
loads of the whole global batch).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from moejax.model import balance, lm_loss
from moejax.model.config import ModelConfig


class TrainState(NamedTuple):
  step: jax.Array
  params: Any
  model_state: Any
  opt_state: Any
  rng: jax.Array


def make_optimizer(opt_cfg, num_steps: int) -> optax.GradientTransformation:
  """AdamW with linear warmup + cosine decay, global-norm clipping, no decay on norms/biases."""
  warmup = min(int(opt_cfg.warmup_steps), max(num_steps - 1, 0))
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=opt_cfg.lr, warmup_steps=warmup,
      decay_steps=max(num_steps, warmup + 1), end_value=opt_cfg.lr * opt_cfg.min_lr_ratio)

  def decay_mask(params):
    # Matrices (ndim >= 2) decay; norm scales and vectors do not.
    return jax.tree.map(lambda p: p.ndim >= 2, params)

  chain = []
  if opt_cfg.grad_clip > 0:
    chain.append(optax.clip_by_global_norm(opt_cfg.grad_clip))
  chain.append(optax.adamw(schedule, b1=opt_cfg.b1, b2=opt_cfg.b2, eps=opt_cfg.eps,
                           weight_decay=opt_cfg.weight_decay, mask=decay_mask))
  return optax.chain(*chain), schedule


def moe_layers(model: nnx.Module) -> list[nnx.Module]:
  """The model's MoE layers in layer order (the order of the stacked `aux` arrays)."""
  from moejax.model.moe import MoELayer  # pylint: disable=g-import-not-at-top

  def sort_key(path):
    return tuple((0, p, "") if isinstance(p, int) else (1, 0, str(p)) for p in path)

  found = [(path, m) for path, m in nnx.iter_graph(model) if isinstance(m, MoELayer)]
  return [m for _, m in sorted(found, key=lambda pm: sort_key(pm[0]))]


def token_loss(logits_BxLxV: jax.Array, tokens_BxL: jax.Array, segment_ids_BxL: jax.Array):
  """Next-token cross entropy of [B, L, V] logits, masked where the next token is padding or another
  document (the plain form of what the train/eval steps compute with `lm_loss.fused_lm_loss`).

  Returns (sum of losses, number of predicted tokens).
  """
  logits = logits_BxLxV[:, :-1].astype(jnp.float32)
  targets = tokens_BxL[:, 1:]
  mask = (segment_ids_BxL[:, 1:] == segment_ids_BxL[:, :-1]) & (segment_ids_BxL[:, :-1] != 0)
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  mask = mask.astype(jnp.float32)
  return jnp.sum(losses * mask), jnp.sum(mask)


def _forward_loss(graphdef, params, model_state, batch, *, deterministic: bool, rng=None):
  """(sum of next-token losses, number of predicted tokens, aux): the model's hidden states and the
  LM head through `lm_loss.fused_lm_loss` (no [B, L, V] logits; equal to `token_loss` on them)."""
  model = nnx.merge(graphdef, params, model_state)
  rngs = None if rng is None else nnx.Rngs(rng)
  h_BxLxD, aux, _ = model.forward_hidden(batch["tokens"], positions_BxL=batch["positions"],
                                         segment_ids_BxL=batch["segment_ids"],
                                         deterministic=deterministic, rngs=rngs)
  targets_BxL, mask_BxL = lm_loss.next_token_targets(batch["tokens"], batch["segment_ids"])
  loss_sum = lm_loss.fused_lm_loss(h_BxLxD, model.head_weight_DxV(), targets_BxL, mask_BxL)
  return loss_sum, jnp.sum(mask_BxL), aux


def make_train_step(graphdef, tx: optax.GradientTransformation, cfg: ModelConfig,
                    schedule: Callable) -> Callable:
  """Returns `train_step(state, batch) -> (state, metrics)` (to be jitted with donation)."""
  use_alf_lb = cfg.num_experts > 0 and cfg.uses("alf_lb")

  def loss_fn(params, model_state, batch, rng):
    loss_sum, n_tokens, aux = _forward_loss(graphdef, params, model_state, batch,
                                            deterministic=False, rng=rng)
    ce = loss_sum / jnp.maximum(n_tokens, 1.0)
    balance_loss = jnp.sum(aux["balance_loss"]) if aux else jnp.zeros((), jnp.float32)
    return ce + balance_loss, (ce, aux)

  def train_step(state: TrainState, batch):
    step_rng = jax.random.fold_in(state.rng, state.step)
    grads, (ce, aux) = jax.grad(loss_fn, has_aux=True)(state.params, state.model_state, batch,
                                                       step_rng)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    model_state = state.model_state
    if use_alf_lb:
      # Algorithm 1: after the optimizer step, from this step's loads over the global batch.
      model = nnx.merge(graphdef, params, model_state)
      for layer, load_E in zip(moe_layers(model), aux["tokens_per_expert"]):
        layer.router_bias_E[...] = balance.update_bias(layer.router_bias_E[...], load_E, cfg.bias_update_rate,
                                               cfg.bias_update_rule)
      _, _, model_state = nnx.split(model, nnx.Param, ...)
    metrics = {"loss": ce, "grad_norm": optax.tree.norm(grads), "lr": schedule(state.step)}
    if aux:
      metrics.update(moe_metrics(aux))
    new_state = TrainState(state.step + 1, params, model_state, opt_state, state.rng)
    return new_state, metrics

  return train_step


def moe_metrics(aux: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """Scalars logged from the stacked per-layer aux dict (means over MoE layers, plus per layer)."""
  out = {
      "aux_loss": jnp.mean(aux["aux_loss"]),
      "seq_aux_loss": jnp.mean(aux["seq_aux_loss"]),
      "z_loss": jnp.mean(aux["z_loss"]),
      "moepp_loss": jnp.mean(aux["moepp_loss"]),
      "balance_loss": jnp.sum(aux["balance_loss"]),
      "max_vio_batch": jnp.mean(aux["max_vio"]),
      "dropped_fraction": jnp.mean(aux["dropped_fraction"]),
      "router_entropy": jnp.mean(aux["router_entropy"]),
      "tokens_per_expert": aux["tokens_per_expert"],
  }
  for i in range(aux["max_vio"].shape[0]):
    out[f"max_vio_batch/layer_{i}"] = aux["max_vio"][i]
  return out


def make_eval_step(graphdef) -> Callable:
  """Returns `eval_step(params, model_state, batch) -> (loss_sum, n_tokens, tokens_per_expert_LxE)`."""

  def eval_step(params, model_state, batch):
    loss_sum, n_tokens, aux = _forward_loss(graphdef, params, model_state, batch,
                                            deterministic=True)
    load = aux["tokens_per_expert"] if aux else jnp.zeros((0, 0), jnp.float32)
    return loss_sum, n_tokens, load

  return eval_step
