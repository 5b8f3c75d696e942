"""Shared tiny setup for the parallel tests: a 2-layer, 8-expert model and a fixed random batch."""
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from moejax.model.config import ModelConfig
from moejax.model.transformer import Transformer
from moejax.train import config_lib
from moejax.train.step import TrainState, make_optimizer, make_train_step

BATCH, LENGTH, VOCAB = 8, 16, 64


def tiny_cfg(**kw) -> ModelConfig:
  base = dict(vocab_size=VOCAB, d_model=32, num_layers=2, num_heads=2, ff_dim=64, max_seq_len=64,
              num_experts=8, top_k=2, expert_ff_dim=16, balance=("aux_loss", "z_loss", "alf_lb"),
              bias_update_rate=1e-2, compute_dtype="float32")
  base.update(kw)
  return ModelConfig(**base)


def opt_cfg():
  o = config_lib.default_config().opt
  o.warmup_steps, o.eps = 0, 1e-6   # eps 1e-6: Adam does not amplify fp32 noise in ~0 gradients.
  return o


def fixed_batch(seed: int = 0) -> dict:
  """Random tokens, two documents per row and a padded tail (segment id 0) in the last rows."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(1, VOCAB, (BATCH, LENGTH)).astype(np.int32)
  segs = np.ones((BATCH, LENGTH), np.int32)
  segs[:, LENGTH // 2:] = 2
  segs[-2:, -3:] = 0
  pos = np.where(segs == 2, np.arange(LENGTH) - LENGTH // 2, np.arange(LENGTH)).astype(np.int32)
  return {"tokens": tokens, "segment_ids": segs, "positions": pos}


class GradsState(NamedTuple):
  grads: Any


def record_grads() -> optax.GradientTransformation:
  """Identity transform that keeps the last raw gradients in the optimizer state (opt_state[0]):
  the gradient check then needs no second compiled program."""
  return optax.GradientTransformation(
      lambda params: GradsState(jax.tree.map(jnp.zeros_like, params)),
      lambda updates, state, params=None: (updates, GradsState(updates)))


def init_state(cfg: ModelConfig, steps: int = 3):
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  graphdef, params, model_state = nnx.split(model, nnx.Param, ...)
  tx, schedule = make_optimizer(opt_cfg(), steps)
  tx = optax.chain(record_grads(), tx)
  state = TrainState(jnp.zeros((), jnp.int32), params, model_state, tx.init(params),
                     jax.random.key_data(jax.random.key(0)))
  return graphdef, tx, schedule, state


def to_numpy(tree):
  return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


def run_single(cfg: ModelConfig, batch: dict, steps: int = 3):
  """Reference: `steps` train steps on one device; (losses, state, last step's grads, dropped)."""
  graphdef, tx, schedule, state = init_state(cfg, steps)
  step = jax.jit(make_train_step(graphdef, tx, cfg, schedule))
  dev_batch = {k: jnp.asarray(v) for k, v in batch.items()}
  losses, dropped = [], []
  for _ in range(steps):
    state, metrics = step(state, dev_batch)
    losses.append(float(metrics["loss"]))
    dropped.append(float(metrics["dropped_fraction"]))
  return np.array(losses), to_numpy(state), to_numpy(state.opt_state[0].grads), np.array(dropped)


_COMPILED = {}


def sharded_setup(cfg: ModelConfig, mesh, rules, steps: int = 3):
  """(graphdef, fresh state, state shardings, jitted step), cached per mesh and config."""
  from moejax.parallel import train_sharding as ts
  key = (cfg, tuple(mesh.shape.items()), tuple(d.id for d in mesh.devices.flat), tuple(rules), steps)
  if key not in _COMPILED:
    graphdef, tx, schedule, state = init_state(cfg, steps)
    state_sh = ts.state_shardings(state, mesh, rules)
    step = ts.jit_train_step(make_train_step(graphdef, tx, cfg, schedule), mesh, rules, state_sh,
                             donate=False)
    _COMPILED[key] = (graphdef, state, state_sh, step)
  return _COMPILED[key]


def run_sharded(cfg: ModelConfig, batch: dict, mesh, rules, steps: int = 3, state=None):
  """The same on `mesh` via moejax.parallel.train_sharding; `state` (any sharding) to continue.

  Each process feeds its own rows of `batch` (`train_sharding.process_rows`).
  Returns (losses, final state, raw gradients of the last step, dropped fractions).
  """
  from moejax.parallel import train_sharding as ts
  _, fresh, state_sh, step = sharded_setup(cfg, mesh, rules)
  state = ts.shard_state(fresh if state is None else state, state_sh)
  rows = ts.process_rows(mesh, batch["tokens"].shape[0], rules)
  g_batch = ts.global_batch({k: v[rows] for k, v in batch.items()}, mesh, rules)
  losses, dropped = [], []
  for _ in range(steps):
    state, metrics = step(state, g_batch)
    losses.append(float(metrics["loss"]))
    dropped.append(float(metrics["dropped_fraction"]))
  return np.array(losses), state, state.opt_state[0].grads, np.array(dropped)
