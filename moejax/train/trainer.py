"""`train_and_evaluate(config, workdir)`: the one training loop of moejax.

Builds data, model, optimizer and checkpoint manager from the config; auto-resumes from the latest
checkpoint in `workdir`; logs scalars to TensorBoard (`W/tb`) and `W/metrics.jsonl`; validates every
`train.eval_every` steps (val_loss, max_vio_global); saves every `train.checkpoint_every` steps, at
the end, and on SIGTERM/SIGINT. A non-finite loss stops the run with an error naming the step range
and never overwrites the last good checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from tqdm import tqdm

from moejax import summary
from moejax.data import DataConfig, build_tokenizer, make_eval_batches, make_train_iterator
from moejax.model import balance
from moejax.model.transformer import Transformer
from moejax.parallel import mesh as mesh_lib, train_sharding
from moejax.train import checkpoint, config_lib, perf
from moejax.train.step import TrainState, make_eval_step, make_optimizer, make_train_step


class NonFiniteLossError(FloatingPointError):
  pass


@contextlib.contextmanager
def _stop_on_signals():
  """Turns SIGTERM/SIGINT into a flag the loop checks (it saves, then exits cleanly)."""
  flag = {"stop": None}
  previous = {}

  def handler(signum, frame):
    del frame
    flag["stop"] = signal.Signals(signum).name

  for sig in (signal.SIGTERM, signal.SIGINT):
    try:
      previous[sig] = signal.signal(sig, handler)
    except ValueError:  # not the main thread: no handlers.
      pass
  try:
    yield flag
  finally:
    for sig, old in previous.items():
      signal.signal(sig, old)


def _data_config(config: ml_collections.ConfigDict, seed: int) -> DataConfig:
  return DataConfig(source=config.data.source, text_field=config.data.text_field,
                    tokenizer=config.data.tokenizer, vocab_size=config.model.vocab_size,
                    max_files=config.data.max_files, val_fraction=config.data.val_fraction,
                    seed=seed)


def _build_tokenizer_once(data_cfg: DataConfig, workdir: str):
  """Process 0 trains (or loads) the tokenizer into the workdir; the others wait, then load it."""
  if jax.process_count() == 1:
    return build_tokenizer(data_cfg, workdir)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  if jax.process_index() == 0:
    tokenizer = build_tokenizer(data_cfg, workdir)
  multihost_utils.sync_global_devices("moejax_tokenizer_ready")
  return tokenizer if jax.process_index() == 0 else build_tokenizer(data_cfg, workdir)


def _all_data_states(own_state: dict) -> dict[str, dict]:
  """Every process's data-iterator state, so each resumes its own shard: {"process_<i>": state}."""
  if jax.process_count() == 1:
    return {"process_0": own_state}
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  encoded = json.dumps(own_state).encode()
  length = int(np.max(multihost_utils.process_allgather(np.array([len(encoded)], np.int32))))
  padded = np.zeros((length,), np.uint8)
  padded[:len(encoded)] = np.frombuffer(encoded, np.uint8)
  gathered = np.asarray(multihost_utils.process_allgather(padded)).reshape(jax.process_count(), -1)
  return {f"process_{i}": json.loads(bytes(row).rstrip(b"\x00").decode())
          for i, row in enumerate(gathered)}


def evaluate(eval_step, params, model_state, batches) -> dict[str, Any]:
  """val_loss over the fixed held-out batches and MaxVio_global (ALF-LB Eq. 4, whole val set)."""
  loss_sum, n_tokens, load_LxE = 0.0, 0.0, None
  for batch in batches:
    s, n, load = eval_step(params, model_state, batch)
    loss_sum += float(s)
    n_tokens += float(n)
    load = np.asarray(load, np.float64)
    load_LxE = load if load_LxE is None else load_LxE + load
  out: dict[str, Any] = {"val_loss": loss_sum / max(n_tokens, 1.0)}
  if load_LxE is not None and load_LxE.size:
    vio = np.array([float(balance.max_violation(jnp.asarray(l))) for l in load_LxE])
    out["max_vio_global"] = float(vio.mean())
    for i, v in enumerate(vio):
      out[f"max_vio_global/layer_{i}"] = float(v)
    out["_load_LxE"] = load_LxE
  return out


def _to_device(batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
  return {k: jnp.asarray(v) for k, v in batch.items()}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       max_steps_this_run: int | None = None,
                       progress: bool = True) -> dict[str, Any]:
  """Trains per `config` in `workdir` (resuming if it holds checkpoints); returns final metrics.

  `max_steps_this_run` stops (after saving) once that many steps ran in this invocation, e.g. for
  preemption-sized chunks; the next call resumes exactly.
  """
  model_cfg = config_lib.validate(config)
  os.makedirs(workdir, exist_ok=True)
  is_chief = jax.process_index() == 0
  config_path = os.path.join(workdir, checkpoint.CONFIG_FILE)
  if is_chief:
    with open(config_path + ".tmp", "w", encoding="utf-8") as f:
      f.write(config_lib.to_json(config))
    os.replace(config_path + ".tmp", config_path)

  t = config.train
  mesh, rules = mesh_lib.from_config(config, model_cfg.num_experts, t.batch_size)
  data_cfg = _data_config(config, t.seed)
  tokenizer = _build_tokenizer_once(data_cfg, workdir)
  train_iter = make_train_iterator(data_cfg, tokenizer, batch_size=t.batch_size, seq_len=t.seq_len,
                                   seed=t.seed, process_index=jax.process_index(),
                                   process_count=jax.process_count())
  val_batches = [train_sharding.host_batch(b, mesh, rules) for b in make_eval_batches(
      data_cfg, tokenizer, batch_size=t.batch_size, seq_len=t.seq_len, num_batches=t.eval_batches)]

  model = Transformer(model_cfg, rngs=nnx.Rngs(t.seed))
  graphdef, params, model_state = nnx.split(model, nnx.Param, ...)
  del model
  tx, schedule = make_optimizer(config.opt, t.num_steps)
  state = TrainState(jnp.zeros((), jnp.int32), params, model_state, tx.init(params),
                     jax.random.key_data(jax.random.key(t.seed)))
  state_sh = train_sharding.state_shardings(state, mesh, rules)
  state = train_sharding.shard_state(state, state_sh)   # restore() below reshards onto this mesh.

  mngr = checkpoint.manager(workdir, keep=t.keep_checkpoints)
  latest = mngr.latest_step()
  if latest is not None:
    state, data_states = checkpoint.restore(mngr, latest, state)
    own = data_states.get(f"process_{jax.process_index()}")
    if own is None and data_states:
      raise ValueError(f"{workdir}/checkpoints/{latest}: no data-iterator state for process "
                       f"{jax.process_index()} (saved by {len(data_states)} processes; the data "
                       f"pipeline resumes only with the same process count)")
    if own:
      train_iter.set_state(own)
  elif t.init_from:
    state = checkpoint.init_from(t.init_from, state)

  train_step = train_sharding.jit_train_step(make_train_step(graphdef, tx, model_cfg, schedule),
                                             mesh, rules, state_sh)
  eval_step = train_sharding.jit_eval_step(make_eval_step(graphdef), mesh, rules, state_sh.params,
                                           state_sh.model_state)
  writer = (summary.MetricWriter(os.path.join(workdir, "tb"), os.path.join(workdir, "metrics.jsonl"))
            if is_chief else summary.NullWriter())
  start_step = int(state.step)
  if start_step == 0:
    writer.hparams(_hparams(config))
  flops_per_token = perf.flops_per_token(model_cfg, t.seq_len)
  peak = perf.peak_flops_per_device(t.peak_tflops)

  last_good_step, last_metrics, final = start_step, {}, {}
  window_start, window_tokens = time.perf_counter(), 0
  bar = tqdm(total=t.num_steps, initial=start_step, disable=not (progress and is_chief),
             desc=os.path.basename(os.path.normpath(workdir)), dynamic_ncols=True)
  with _stop_on_signals() as stop:
    step = start_step
    while step < t.num_steps:
      batch = train_sharding.global_batch(next(train_iter), mesh, rules)
      state, metrics = train_step(state, batch)
      step += 1
      window_tokens += t.batch_size * t.seq_len
      bar.update(1)
      at_log = step % t.log_every == 0 or step == t.num_steps
      at_eval = step % t.eval_every == 0 or step == t.num_steps
      at_ckpt = step % t.checkpoint_every == 0 or step == t.num_steps
      ran = step - start_step
      chunk_done = max_steps_this_run is not None and ran >= max_steps_this_run
      if at_log or at_eval or at_ckpt or stop["stop"] or chunk_done:
        loss = float(metrics["loss"])
        if not np.isfinite(loss):
          mngr.wait_until_finished()
          raise NonFiniteLossError(
              f"non-finite loss {loss} at a step in ({last_good_step}, {step}]; the last good "
              f"checkpoint (step {mngr.latest_step()}) in {workdir}/checkpoints is intact")
        last_good_step = step
      if at_log:
        elapsed = time.perf_counter() - window_start
        tokens_per_sec = window_tokens / max(elapsed, 1e-9)
        scalars = {k: float(v) for k, v in metrics.items() if np.ndim(v) == 0}
        scalars.update(tokens_per_sec=tokens_per_sec,
                       step_time_s=elapsed / max(window_tokens / (t.batch_size * t.seq_len), 1),
                       mfu=tokens_per_sec * flops_per_token / (peak * jax.device_count()))
        writer.scalars(step, scalars)
        if "tokens_per_expert" in metrics:
          writer.image(step, "expert_load/train", summary.load_heatmap(metrics["tokens_per_expert"]))
        bar.set_postfix(loss=f"{scalars['loss']:.3f}")
        last_metrics = scalars
        window_start, window_tokens = time.perf_counter(), 0
      if at_eval:
        result = evaluate(eval_step, state.params, state.model_state, val_batches)
        load = result.pop("_load_LxE", None)
        writer.scalars(step, result)
        if load is not None:
          writer.image(step, "expert_load/val", summary.load_heatmap(load))
        final.update(result)
      if at_ckpt or stop["stop"] or chunk_done:
        checkpoint.save(mngr, step, state, _all_data_states(train_iter.get_state()))
      if stop["stop"] or chunk_done:
        break
  bar.close()
  mngr.wait_until_finished()
  mngr.close()
  writer.flush()
  writer.close()
  final.update({k: v for k, v in last_metrics.items()})
  final["step"] = step
  final["stopped_by"] = stop["stop"]
  return final


def _hparams(config: ml_collections.ConfigDict) -> dict[str, Any]:
  keep = ("model.num_layers", "model.d_model", "moe.num_experts", "moe.top_k", "moe.balance",
          "moe.score_fn", "moe.dispatch", "moe.bias_update_rate", "moe.aux_loss_coef",
          "opt.lr", "train.batch_size", "train.seq_len", "train.num_steps")
  out = {}
  for dotted in keep:
    section, key = dotted.split(".")
    out[dotted] = config[section][key]
  return out
