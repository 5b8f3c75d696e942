"""Import Hugging Face MoE checkpoints as moejax run directories, and export them back.

    python -m moejax.convert.hf --hf_dir DIR --out RUN_DIR [--param_dtype bfloat16] [--max_seq_len N]
    python -m moejax.convert.hf --export --run_dir RUN_DIR --out HF_DIR [--step N]

Import reads `config.json` (mapped by `moejax.convert.mapping`; unsupported architectures or fields
raise `UnsupportedError` naming them) and the (sharded) `*.safetensors` tensor by tensor with
`safetensors.safe_open` (memory-mapped: each checkpoint tensor is read once, converted and cast to
`param_dtype`, so peak host memory is about the converted model plus one layer's largest tensor
group, never the checkpoint twice). It writes a run directory that `moejax.load`, the trainer
(`--config.train...` resume from step 0) and the eval worker read like a trained one:
`config.json` (experiment schema of `moejax.train.config_lib`), `checkpoints/<step>/model`,
`tokenizer.json` (copied and checked with `tokenizers`; also set as `data.tokenizer`) and
`hf_config.json` (the original, reused on export). Export writes `config.json` and
`model*.safetensors` (+ index when sharded) in the original per-expert layout that `transformers`
loads; import -> export -> import is bitwise.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
from typing import Any

import numpy as np

from moejax.convert import mapping
from moejax.convert.mapping import UnsupportedError

HF_CONFIG = "hf_config.json"
TOKENIZER = "tokenizer.json"
DEFAULT_SHARD_BYTES = 4 << 30


class TensorSource:
  """Name -> tensor over a directory of (sharded) safetensors; tensors are read one at a time."""

  def __init__(self, hf_dir: str):
    from safetensors import safe_open  # pylint: disable=import-outside-toplevel
    self._open = safe_open
    index = os.path.join(hf_dir, "model.safetensors.index.json")
    self.files: dict[str, str] = {}
    if os.path.isfile(index):
      with open(index, encoding="utf-8") as f:
        weight_map = json.load(f).get("weight_map")
      if not isinstance(weight_map, dict):
        raise ValueError(f"{index}: expected a 'weight_map' object of tensor name -> file")
      self.files = {k: os.path.join(hf_dir, v) for k, v in weight_map.items()}
    else:
      paths = sorted(glob.glob(os.path.join(hf_dir, "*.safetensors")))
      if not paths:
        raise FileNotFoundError(f"{hf_dir}: no *.safetensors files (PyTorch .bin checkpoints are not "
                                "supported; re-save with safe_serialization=True)")
      for path in paths:
        with safe_open(path, "numpy") as f:
          self.files.update({k: path for k in f.keys()})
    self._handles: dict[str, Any] = {}

  def names(self) -> set[str]:
    return set(self.files)

  def get(self, name: str) -> np.ndarray:
    if name not in self.files:
      raise KeyError(f"checkpoint has no tensor {name!r}")
    path = self.files[name]
    if path not in self._handles:
      if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: listed in the safetensors index but missing")
      self._handles[path] = self._open(path, "numpy")
    return self._handles[path].get_tensor(name)


def read_hf_config(hf_dir: str) -> dict:
  path = os.path.join(hf_dir, "config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{hf_dir}: no config.json (expected a Hugging Face model directory)")
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def _variables(model) -> dict[str, Any]:
  from flax import nnx  # pylint: disable=import-outside-toplevel
  return {".".join(str(k) for k in path): v for path, v in nnx.iter_graph(model)
          if isinstance(v, nnx.Variable)}


def convert_weights(hf: dict, source: TensorSource, cfg) -> Any:
  """A `Transformer(cfg)` holding the checkpoint's weights (built abstractly, filled tensor by tensor)."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from moejax.model.transformer import Transformer  # pylint: disable=import-outside-toplevel

  arch = mapping.architecture(hf)
  names = source.names()
  fused = any(n.endswith(".experts.gate_up_proj") for n in names)
  rules = mapping.weight_rules(cfg, arch, interleave=bool(hf.get("rope_interleave", True)),
                               fused_experts=fused)
  model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
  variables = _variables(model)
  used: set[str] = set()
  for rule in rules:
    missing = [n for n in rule.theirs if n not in names]
    if missing:
      raise UnsupportedError(f"checkpoint lacks tensor(s) {missing[:4]} needed for {rule.ours} "
                             f"(config.json and the weights disagree?)")
    outs = rule.load([source.get(n) for n in rule.theirs])
    for path, value in zip(rule.ours, outs):
      var = variables.pop(path, None)
      if var is None:
        raise RuntimeError(f"mapping error: moejax has no variable {path}")
      target = var.get_value()
      if tuple(value.shape) != tuple(target.shape):
        raise UnsupportedError(f"{rule.theirs[0]}: shape {value.shape} maps to {path} of shape "
                               f"{target.shape} implied by config.json")
      var.set_value(jnp.asarray(np.asarray(value).astype(target.dtype)))
    used.update(rule.theirs)
  extra = sorted(n for n in names - used if not mapping.ignorable(n, cfg.num_layers))
  if extra:
    raise UnsupportedError(f"checkpoint tensors with no moejax counterpart: {extra[:8]}"
                           f"{' ...' if len(extra) > 8 else ''}")
  if variables:
    raise UnsupportedError(f"moejax variables not filled by the checkpoint: {sorted(variables)[:8]}")
  return model


def experiment_config(cfg, tokenizer_path: str = ""):
  """The run's ConfigDict (config_lib schema) with model/moe sections taken from `cfg`."""
  from moejax.train import config_lib  # pylint: disable=import-outside-toplevel
  config = config_lib.default_config()
  for section in ("model", "moe"):
    for key in config[section]:
      value = getattr(cfg, key)
      if key == "balance":  # the experiment config spells it comma-separated.
        value = ",".join(value) or "none"
      config[section][key] = value
  config.train.seq_len = min(config.train.seq_len, cfg.max_seq_len)
  config.data.tokenizer = tokenizer_path
  config_lib.model_config(config)  # round-trips to the same ModelConfig (validated).
  return config


def import_hf(hf_dir: str, out_dir: str, *, param_dtype: str | None = None,
              compute_dtype: str | None = None, max_seq_len: int | None = None, step: int = 0):
  """Converts `hf_dir` into the run directory `out_dir`; returns the `ModelConfig`."""
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from moejax.train import checkpoint, config_lib  # pylint: disable=import-outside-toplevel

  hf = read_hf_config(hf_dir)
  cfg = mapping.to_model_config(hf, param_dtype=param_dtype, compute_dtype=compute_dtype,
                                max_seq_len=max_seq_len)
  model = convert_weights(hf, TensorSource(hf_dir), cfg)
  os.makedirs(out_dir, exist_ok=True)
  tok_path = ""
  src_tok = os.path.join(hf_dir, TOKENIZER)
  if os.path.isfile(src_tok):
    from tokenizers import Tokenizer  # pylint: disable=import-outside-toplevel
    try:
      Tokenizer.from_file(src_tok)
    except Exception as e:  # tokenizers raises a bare Exception on bad JSON.
      raise ValueError(f"{src_tok}: not a valid tokenizers JSON file ({e})") from None
    tok_path = os.path.abspath(os.path.join(out_dir, TOKENIZER))
    shutil.copyfile(src_tok, tok_path)
  with open(os.path.join(out_dir, HF_CONFIG), "w", encoding="utf-8") as f:
    json.dump(hf, f, indent=2, sort_keys=True)
  _, params, model_state = nnx.split(model, nnx.Param, ...)
  checkpoint.save_model_only(out_dir, step, params, model_state)
  with open(os.path.join(out_dir, checkpoint.CONFIG_FILE), "w", encoding="utf-8") as f:
    f.write(config_lib.to_json(experiment_config(cfg, tok_path)))
  return cfg


def _save_shards(tensors: dict[str, np.ndarray], out_dir: str, max_shard_bytes: int) -> list[str]:
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  shards: list[dict[str, np.ndarray]] = [{}]
  size = 0
  for name, value in tensors.items():
    if shards[-1] and size + value.nbytes > max_shard_bytes:
      shards.append({})
      size = 0
    shards[-1][name] = np.ascontiguousarray(value)
    size += value.nbytes
  if len(shards) == 1:
    save_file(shards[0], os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    return ["model.safetensors"]
  files, weight_map = [], {}
  for i, shard in enumerate(shards):
    fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    save_file(shard, os.path.join(out_dir, fname), metadata={"format": "pt"})
    weight_map.update({k: fname for k in shard})
    files.append(fname)
  total = sum(v.nbytes for v in tensors.values())
  with open(os.path.join(out_dir, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
  return files


def export_hf(model, out_dir: str, *, hf_base: dict | None = None, tokenizer_path: str = "",
              max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> dict:
  """Writes `model` (a moejax Transformer) as an HF checkpoint; returns the HF config dict."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  cfg = model.cfg
  arch = mapping.infer_architecture(cfg)
  if hf_base and mapping.architecture(hf_base) != arch:
    hf_base = None
  hf = mapping.to_hf_config(cfg, arch, hf_base)
  variables = _variables(model)
  rules = mapping.weight_rules(cfg, arch, interleave=bool(hf.get("rope_interleave", True)))
  param_dtype = jnp.dtype(cfg.param_dtype)  # the fp32 router goes back to the checkpoint dtype.
  tensors: dict[str, np.ndarray] = {}
  for rule in rules:
    ours = [np.asarray(variables.pop(p).get_value()) for p in rule.ours]
    for name, value in zip(rule.theirs, rule.save(ours)):
      bias = name.endswith("e_score_correction_bias")  # fp32 in DeepSeek-V3 checkpoints.
      tensors[name] = value.astype(np.float32 if bias else param_dtype)
  if variables:
    raise UnsupportedError(f"export: moejax variables with no HF counterpart: {sorted(variables)[:8]}")
  os.makedirs(out_dir, exist_ok=True)
  _save_shards(tensors, out_dir, max_shard_bytes)
  with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as f:
    json.dump(hf, f, indent=2, sort_keys=True)
  if tokenizer_path and os.path.isfile(tokenizer_path):
    shutil.copyfile(tokenizer_path, os.path.join(out_dir, TOKENIZER))
  return hf


def export_run(run_dir: str, out_dir: str, *, step: int | None = None,
               max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> dict:
  """Exports the latest (or given) checkpoint of a moejax run directory to an HF directory."""
  from moejax.train.checkpoint import load  # pylint: disable=import-outside-toplevel
  model, _ = load(run_dir, step)
  base = None
  if os.path.isfile(os.path.join(run_dir, HF_CONFIG)):
    with open(os.path.join(run_dir, HF_CONFIG), encoding="utf-8") as f:
      base = json.load(f)
  return export_hf(model, out_dir, hf_base=base, tokenizer_path=os.path.join(run_dir, TOKENIZER),
                   max_shard_bytes=max_shard_bytes)


def main(argv: list[str] | None = None) -> None:
  ap = argparse.ArgumentParser(prog="python -m moejax.convert.hf", description=__doc__.split("\n")[0])
  ap.add_argument("--hf_dir", help="HF model directory to import (config.json + *.safetensors)")
  ap.add_argument("--out", required=True, help="output run directory (import) or HF directory (export)")
  ap.add_argument("--export", action="store_true", help="export --run_dir to an HF directory")
  ap.add_argument("--run_dir", help="moejax run directory to export")
  ap.add_argument("--step", type=int, default=None, help="checkpoint step (import: 0; export: latest)")
  ap.add_argument("--param_dtype", choices=sorted(mapping.DTYPES), default=None,
                  help="stored parameter dtype (default: the checkpoint's dtype)")
  ap.add_argument("--compute_dtype", choices=sorted(mapping.DTYPES), default=None)
  ap.add_argument("--max_seq_len", type=int, default=None,
                  help="KV-cache bound (default: max_position_embeddings)")
  ap.add_argument("--max_shard_gb", type=float, default=DEFAULT_SHARD_BYTES / 2**30)
  args = ap.parse_args(argv)
  if args.export:
    if not args.run_dir:
      ap.error("--export needs --run_dir")
    hf = export_run(args.run_dir, args.out, step=args.step,
                    max_shard_bytes=int(args.max_shard_gb * 2**30))
    print(f"exported {args.run_dir} -> {args.out} ({hf['architectures'][0]})")
    return
  if not args.hf_dir:
    ap.error("import needs --hf_dir (or pass --export --run_dir)")
  cfg = import_hf(args.hf_dir, args.out, param_dtype=args.param_dtype,
                  compute_dtype=args.compute_dtype, max_seq_len=args.max_seq_len,
                  step=args.step or 0)
  print(f"imported {args.hf_dir} -> {args.out}: {cfg.num_layers} layers, {cfg.num_experts} experts, "
        f"top-{cfg.top_k}, {cfg.attention}, params {cfg.param_dtype}")


if __name__ == "__main__":
  main()
