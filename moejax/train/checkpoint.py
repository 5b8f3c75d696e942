"""Checkpoints of a run directory, with orbax, and `load()` of a trained or converted model.

Layout of a workdir:
  W/config.json                  the full experiment config (ConfigDict as JSON)
  W/checkpoints/<step>/model     params + model_state (ALF-LB biases): all `load()` needs
  W/checkpoints/<step>/train     optimizer state, step, RNG
  W/checkpoints/<step>/data      every process's data-iterator state (JSON, {"process_<i>": ...}),
                                 so each process resumes its own shard exactly
Orbax writes a step directory atomically (a temporary name renamed when finalised), so readers such as
the eval worker only ever see complete checkpoints via `all_steps()`.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx

from moejax.model.config import ConfigError

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"


def manager(workdir: str, *, keep: int = 3, async_save: bool = True,
            read_only: bool = False) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      max_to_keep=None if read_only else keep, save_interval_steps=0 if read_only else 1,
      create=not read_only, read_only=read_only, enable_async_checkpointing=async_save)
  return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR)),
                               options=options, item_names=("model", "train", "data"))


def save(mngr: ocp.CheckpointManager, step: int, state, data_state: dict | None) -> None:
  items = dict(
      model=ocp.args.StandardSave({"params": state.params, "model_state": state.model_state}),
      train=ocp.args.StandardSave({"opt_state": state.opt_state, "step": state.step,
                                   "rng": state.rng}),
      data=ocp.args.JsonSave(data_state or {}))
  mngr.save(step, args=ocp.args.Composite(**items), force=True)


def is_model_only(mngr: ocp.CheckpointManager, step: int) -> bool:
  """True for a checkpoint holding just the `model` item (an HF import, `save_model_only`)."""
  return not os.path.isdir(os.path.join(str(mngr.directory), str(step), "train"))


def restore(mngr: ocp.CheckpointManager, step: int, abstract_state) -> tuple[Any, dict]:
  """Restores a full TrainState (shapes/shardings from `abstract_state`) and the data state.

  A model-only checkpoint (an imported HF model) restores params and model state (ALF-LB biases)
  onto `abstract_state`, whose optimizer state, step and RNG are kept: training starts from the
  imported weights (fine-tuning) at `abstract_state`'s step, with fresh AdamW moments.
  """
  if is_model_only(mngr, step):
    model = mngr.restore(step, args=ocp.args.Composite(model=ocp.args.StandardRestore(
        {"params": jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state.params),
         "model_state": jax.tree.map(ocp.utils.to_shape_dtype_struct,
                                     abstract_state.model_state)})))["model"]
    return abstract_state._replace(params=model["params"], model_state=model["model_state"]), {}
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
  restored = mngr.restore(step, args=ocp.args.Composite(
      model=ocp.args.StandardRestore({"params": abstract.params,
                                      "model_state": abstract.model_state}),
      train=ocp.args.StandardRestore({"opt_state": abstract.opt_state, "step": abstract.step,
                                      "rng": abstract.rng}),
      data=ocp.args.JsonRestore()))
  m, t = restored["model"], restored["train"]
  state = type(abstract_state)(t["step"], m["params"], m["model_state"], t["opt_state"], t["rng"])
  return state, restored["data"] or {}


def init_from(path: str, state):
  """`state` with params and model state (ALF-LB biases) from the run or checkpoint at `path`.

  `path`: a run directory (latest checkpoint) or `W/checkpoints/<step>`, trained or imported
  (`moejax.convert`); only its `model` item is read, so the optimizer state, step and RNG of `state`
  are kept (fine-tuning starts at step 0 with fresh AdamW moments). The architecture must match.
  """
  where = f"train.init_from={path!r}"
  try:
    workdir, step = _resolve(path)
  except FileNotFoundError as e:
    raise FileNotFoundError(f"{where}: {e}") from None
  mngr = manager(workdir, read_only=True, async_save=False)
  step = mngr.latest_step() if step is None else step
  if step is None or step not in mngr.all_steps():
    raise FileNotFoundError(f"{where}: no finalised checkpoint{'' if step is None else f' {step}'} "
                            f"in {workdir}/{CHECKPOINT_DIR}")
  abstract = lambda tree: jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
  try:
    model = mngr.restore(step, args=ocp.args.Composite(model=ocp.args.StandardRestore(
        {"params": abstract(state.params), "model_state": abstract(state.model_state)})))["model"]
  except (ValueError, KeyError, TypeError) as e:
    raise ConfigError(f"{where}: its weights do not fit this config's model (set model/moe as in "
                     f"{workdir}/{CONFIG_FILE}, e.g. with configs/finetune.py): {e}") from None
  finally:
    mngr.close()
  return state._replace(params=model["params"], model_state=model["model_state"])


def save_model_only(workdir: str, step: int, params, model_state) -> None:
  """Writes a checkpoint with just the `model` item (used by the HF converter)."""
  mngr = manager(workdir, keep=1, async_save=False)
  mngr.save(step, args=ocp.args.Composite(model=ocp.args.StandardSave(
      {"params": params, "model_state": model_state})), force=True)
  mngr.wait_until_finished()
  mngr.close()


def _resolve(path: str) -> tuple[str, int | None]:
  """(workdir, step) from a workdir or a `<workdir>/checkpoints/<step>` directory."""
  path = os.path.abspath(path)
  if os.path.isfile(os.path.join(path, CONFIG_FILE)):
    return path, None
  parent, leaf = os.path.split(path)
  root = os.path.dirname(parent)
  if leaf.isdigit() and os.path.basename(parent) == CHECKPOINT_DIR and os.path.isfile(
      os.path.join(root, CONFIG_FILE)):
    return root, int(leaf)
  raise FileNotFoundError(
      f"{path}: expected a moejax run directory (with {CONFIG_FILE} and {CHECKPOINT_DIR}/) or a "
      f"checkpoint directory <workdir>/{CHECKPOINT_DIR}/<step>")


def load(path: str, step: int | None = None):
  """`model, config = load(W)`: the model of a run dir's latest (or given) checkpoint.

  `path` is a workdir or a checkpoint directory `W/checkpoints/<step>`; `config` is the run's
  ConfigDict. `model(tokens_BxL)` gives logits `[B, L, V]`.
  """
  from moejax.model.transformer import Transformer  # pylint: disable=g-import-not-at-top
  from moejax.train import config_lib  # pylint: disable=g-import-not-at-top

  workdir, path_step = _resolve(path)
  with open(os.path.join(workdir, CONFIG_FILE), encoding="utf-8") as f:
    config = config_lib.from_json(f.read())
  model_cfg = config_lib.model_config(config)
  run_tokenizer = os.path.join(workdir, "tokenizer.json")
  if not config.data.tokenizer and os.path.isfile(run_tokenizer):
    config.data.tokenizer = run_tokenizer   # so moejax.generate(model, config, ...) finds it.
  mngr = manager(workdir, read_only=True, async_save=False)
  step = step if step is not None else path_step
  step = step if step is not None else mngr.latest_step()
  if step is None:
    raise FileNotFoundError(f"{workdir}/{CHECKPOINT_DIR}: no finalised checkpoint to load")
  abstract_model = nnx.eval_shape(lambda: Transformer(model_cfg, rngs=nnx.Rngs(0)))
  graphdef, params, model_state = nnx.split(abstract_model, nnx.Param, ...)
  target = jax.tree.map(ocp.utils.to_shape_dtype_struct,
                        {"params": params, "model_state": model_state})
  restored = mngr.restore(step, args=ocp.args.Composite(model=ocp.args.StandardRestore(target)))
  mngr.close()
  model = nnx.merge(graphdef, restored["model"]["params"], restored["model"]["model_state"])
  return model, config
