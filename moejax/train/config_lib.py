"""The experiment config: one `ml_collections.ConfigDict` schema, validated up front.

Every key an experiment may set is declared in `default_config()`; configs in `configs/*.py` start from
it and change values, and `lock_config` (via `config_flags`) rejects typos. `validate(config)` runs
before anything is compiled and raises `ConfigError` naming the field. The model only ever sees the
typed `ModelConfig` built by `model_config(config)`: ConfigDict stays at the edge.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
from types import ModuleType
from typing import Any

import ml_collections

from moejax.model.config import ConfigError, ModelConfig

# Section `model` holds the backbone fields of ModelConfig, section `moe` the MoE/router fields.
_MOE_FIELDS = (
    "num_experts", "top_k", "expert_ff_dim", "num_shared_experts", "num_dense_layers", "moe_every",
    "score_fn", "renormalize", "routed_scaling_factor", "n_groups", "topk_groups", "router_jitter",
    "expert_dropout", "balance", "aux_loss_coef", "seq_aux_loss_coef", "z_loss_coef",
    "bias_update_rate", "bias_update_rule", "dispatch", "capacity_factor", "impl",
    "num_zero_experts", "num_copy_experts", "num_const_experts", "moepp_tau", "moepp_loss_coef",
    "gating_residual")


def default_config() -> ml_collections.ConfigDict:
  """The full schema with defaults sized for a 2-core CPU (a few minutes of training)."""
  c = ml_collections.ConfigDict()
  defaults = ModelConfig()
  c.model = ml_collections.ConfigDict(
      {f.name: getattr(defaults, f.name) for f in dataclasses.fields(ModelConfig)
       if f.name not in _MOE_FIELDS})
  c.model.vocab_size = 2048
  c.model.max_seq_len = 1024
  c.model.compute_dtype = "float32"   # CPU default; use bfloat16 on GPU/TPU.
  moe = {name: getattr(defaults, name) for name in _MOE_FIELDS}
  moe["balance"] = "aux_loss"         # comma-separated subset of moejax.model.config.BALANCE_METHODS.
  c.moe = ml_collections.ConfigDict(moe)          # comma-separated subset of moejax.model.config.BALANCE_METHODS.
  c.moe.num_experts = 8
  c.moe.top_k = 2
  c.moe.expert_ff_dim = 128

  c.train = ml_collections.ConfigDict(dict(
      num_steps=200,          # optimizer steps.
      batch_size=16,          # global batch, sequences.
      seq_len=128,            # tokens per sequence.
      eval_every=100,         # validation (val_loss, max_vio_global) every N steps and at the end.
      eval_batches=8,         # fixed held-out batches for validation.
      checkpoint_every=100,   # save every N steps (and on SIGTERM/SIGINT and at the end).
      keep_checkpoints=3,
      log_every=10,           # training scalars every N steps.
      seed=0,
      peak_tflops=0.0,        # per-device peak for MFU; 0 -> table by device kind, else measured.
      init_from="",           # run dir or W/checkpoints/<step>: start from its weights (fine-tune).
  ))
  c.opt = ml_collections.ConfigDict(dict(
      lr=3e-3, warmup_steps=20, min_lr_ratio=0.1, weight_decay=0.1, b1=0.9, b2=0.95, eps=1e-8,
      grad_clip=1.0))
  c.data = ml_collections.ConfigDict(dict(
      source="stdlib",        # "stdlib" or comma-separated globs of .py/.txt/.jsonl/.array_record.
      text_field="text",      # field of .jsonl / JSON ArrayRecord rows.
      tokenizer="",           # path to a tokenizer.json; "" -> train byte-level BPE (cached in workdir).
      max_files=0,            # > 0 keeps the first N documents (small runs, tests).
      val_fraction=0.02,
  ))
  # Mesh axis sizes (-1 = the rest of the devices) and the logical-axis rules table:
  # None -> moejax.parallel.mesh.DEFAULT_RULES, else a list of (logical name, mesh axes) pairs.
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, expert=1, tensor=1))
  c.mesh.rules = ml_collections.FieldReference(None, field_type=object)
  return c


def model_config(config: ml_collections.ConfigDict) -> ModelConfig:
  """Typed, validated `ModelConfig` from the `model` and `moe` sections."""
  fields = dict(config.model.to_dict())
  fields.update(config.moe.to_dict())
  names = {f.name for f in dataclasses.fields(ModelConfig)}
  unknown = sorted(set(fields) - names)
  if unknown:
    raise ConfigError(f"model/moe: unknown fields {unknown}")
  try:
    return ModelConfig(**fields)
  except ConfigError as e:
    # ModelConfig names fields `model.x`; in the experiment config MoE fields live under `moe.`.
    message = str(e)
    field = message.split("=", 1)[0].removeprefix("model.")
    if field in _MOE_FIELDS:
      message = "moe." + message.removeprefix("model.")
    raise ConfigError(message) from None


def _check(cond: bool, field: str, expected: str, value: Any) -> None:
  if not cond:
    raise ConfigError(f"{field}={value!r}: expected {expected}")


def validate(config: ml_collections.ConfigDict) -> ModelConfig:
  """Checks every section; returns the ModelConfig. Raises ConfigError naming the field."""
  for section in ("model", "moe", "train", "opt", "data", "mesh"):
    _check(section in config, section, "a config section (start from default_config())", None)
  t = config.train
  for name in ("num_steps", "batch_size", "seq_len", "eval_every", "eval_batches",
               "checkpoint_every", "keep_checkpoints", "log_every"):
    value = t[name]
    _check(isinstance(value, int) and not isinstance(value, bool) and value > 0, f"train.{name}",
           "a positive int", value)
  _check(isinstance(t.seed, int), "train.seed", "an int", t.seed)
  _check(isinstance(t.get("init_from", ""), str), "train.init_from",
         "a run directory or checkpoint directory path ('' = random init)", t.get("init_from"))
  _check(t.seq_len <= config.model.max_seq_len, "train.seq_len",
         f"<= model.max_seq_len={config.model.max_seq_len}", t.seq_len)
  o = config.opt
  _check(o.lr > 0, "opt.lr", "a float > 0", o.lr)
  _check(0 <= o.warmup_steps, "opt.warmup_steps", "an int >= 0", o.warmup_steps)
  _check(0 <= o.min_lr_ratio <= 1, "opt.min_lr_ratio", "a float in [0, 1]", o.min_lr_ratio)
  _check(o.weight_decay >= 0, "opt.weight_decay", "a float >= 0", o.weight_decay)
  _check(0 <= o.b1 < 1 and 0 <= o.b2 < 1, "opt.b1/opt.b2", "floats in [0, 1)", (o.b1, o.b2))
  _check(o.grad_clip >= 0, "opt.grad_clip", "a float >= 0 (0 disables clipping)", o.grad_clip)
  for axis in ("data", "fsdp", "expert", "tensor"):
    size = config.mesh[axis]
    _check(isinstance(size, int) and (size == -1 or size >= 1), f"mesh.{axis}",
           "a positive int or -1 (the rest of the devices)", size)
  _check(0 < config.data.val_fraction < 1, "data.val_fraction", "a float in (0, 1)",
         config.data.val_fraction)
  return model_config(config)


def to_json(config: ml_collections.ConfigDict) -> str:
  return json.dumps(config.to_dict(), indent=2, sort_keys=True)


def from_json(text: str) -> ml_collections.ConfigDict:
  """Inverse of `to_json`, merged onto the current schema (so old run dirs keep loading)."""
  loaded = json.loads(text)
  config = default_config()
  for section, values in loaded.items():
    if section not in config:
      config[section] = ml_collections.ConfigDict(values)
      continue
    for key, value in values.items():
      if key in config[section] and isinstance(config[section][key], tuple):
        value = tuple(value)
      config[section][key] = value
  return config


def load_config_module(path: str) -> ModuleType:
  """The Python module of a config file (`configs/alf_lb.py`), executed; missing files raise."""
  if not os.path.isfile(path):
    raise ConfigError(f"config file {path!r}: no such file")
  name = "moejax_config_" + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load_config_file(path_and_arg: str) -> ml_collections.ConfigDict:
  """`"configs/alf_lb.py:smoke"` -> that file's `get_config("smoke")` (`get_config()` without ':').

  The same `path[:arg]` spelling as `--config=` of `python -m moejax.train` (ml_collections
  config_flags), for programs that build configs without absl flags (the demo, tests, benchmarks).
  """
  path, colon, arg = path_and_arg.partition(":")
  module = load_config_module(path)
  if not callable(getattr(module, "get_config", None)):
    raise ConfigError(f"config file {path!r}: defines no get_config()")
  return module.get_config(arg) if colon else module.get_config()


def flat_overrides(config: ml_collections.ConfigDict, overrides: dict[str, Any]) -> None:
  """Applies {"opt.lr": 1e-3, "moe.top_k": 4} in place; unknown keys raise ConfigError."""
  for dotted, value in overrides.items():
    section, _, key = dotted.partition(".")
    if section not in config or key not in config[section]:
      raise ConfigError(f"{dotted}: no such config field")
    config[section][key] = value


def parse_arg(arg: str | None, **defaults: Any) -> dict[str, Any]:
  """`"smoke,top_k=4"` -> {"smoke": True, "top_k": 4} typed by `defaults`; unknown names raise.

  Structural variants of a config file go in the `:arg` string
  (`--config=configs/alf_lb.py:smoke`), leaf values in `--config.a.b=v` overrides.
  """
  out = dict(defaults)
  for item in (arg or "").split(","):
    item = item.strip()
    if not item:
      continue
    name, eq, raw = item.partition("=")
    if name not in defaults:
      raise ConfigError(f"config arg {name!r}: expected one of {sorted(defaults)}")
    kind = type(defaults[name])
    if kind is bool:
      if eq and raw not in ("true", "false", "True", "False", "1", "0"):
        raise ConfigError(f"config arg {name}={raw!r}: expected true/false")
      out[name] = (not eq) or raw in ("true", "True", "1")
    else:
      out[name] = kind(raw)
  return out


def shrink_for_smoke(config: ml_collections.ConfigDict) -> None:
  """Tiny model, batch and run: every config must train 2 steps on CPU in seconds (CI)."""
  config.model.update(d_model=32, num_layers=2, num_heads=2, ff_dim=64, vocab_size=512)
  config.moe.expert_ff_dim = min(config.moe.expert_ff_dim or 32, 32)
  config.train.update(num_steps=2, batch_size=2, seq_len=32, eval_every=2, eval_batches=1,
                      checkpoint_every=2, log_every=1)
  config.data.max_files = 40
