"""Import Hugging Face MoE checkpoints as moejax run directories, and export them back.

    python -m moejax.convert.hf --hf_dir DIR --out RUN_DIR [--param_dtype bfloat16] [--max_seq_len N]
    python -m moejax.convert.hf --export --run_dir RUN_DIR --out HF_DIR [--step N]

Import reads `config.json` (mapped by `moejax.convert.mapping`; unsupported architectures or fields
raise `UnsupportedError` naming them; missing, extra or wrongly sized tensors are found from the
safetensors headers before anything is written, a same-size tensor of the wrong shape when its
variable is written) and writes a run directory that `moejax.load`, the trainer
(`--config.train...` resume from step 0) and the eval worker read like a trained one:
`config.json` (experiment schema of `moejax.train.config_lib`), `checkpoints/<step>/model`,
`tokenizer.json` (copied and checked with `tokenizers`; also set as `data.tokenizer`) and
`hf_config.json` (the original, reused on export). Export writes `config.json` and
`model*.safetensors` (+ index when sharded) in the original per-expert layout that `transformers`
loads; import -> export -> import is bitwise.

Memory: both directions stream (`moejax.convert.streaming`); nothing holds the whole model. Import
produces one moejax variable at a time -- reads the HF tensors of its mapping rule (the file opened
for that read only), rearranges them, casts to `param_dtype` -- and orbax writes it (small variables
batched up to the largest one's size) before the next is produced. Peak extra host memory is about
3-4x the largest variable (one layer's stacked experts `[E, D, F]`: its HF tensors, the stacked copy,
the write buffers) plus ~35 KB of orbax bookkeeping per variable, whatever the number of layers.
Export reads one layer at a time from the checkpoint and holds at most one safetensors shard
(`--max_shard_gb`) of HF tensors: peak about one layer plus one shard. Measured by
`tests/convert/test_streaming_memory.py` (6-layer OLMoE, 311 MB fp32, 51 MB layers, 16.8 MB per
stacked-expert variable; RSS with glibc's mmap threshold fixed at 1 MiB -- its default per-thread
free lists keep another ~1-2 layers): import ~60-75 MB, export ~115-120 MB with 20 MB shards, where
holding the model took 684 MB and 950 MB.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
from typing import Any, Callable

import numpy as np

from moejax.convert import mapping
from moejax.convert.mapping import UnsupportedError

HF_CONFIG = "hf_config.json"
TOKENIZER = "tokenizer.json"
DEFAULT_SHARD_BYTES = 4 << 30


class TensorSource:
  """Name -> tensor over a directory of (sharded) safetensors. Shapes come from the headers; `get`
  opens the files it needs for that one read only, so no mapping of the checkpoint stays resident."""

  def __init__(self, hf_dir: str):
    from safetensors import safe_open  # pylint: disable=import-outside-toplevel
    self._open = safe_open
    index = os.path.join(hf_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
      with open(index, encoding="utf-8") as f:
        weight_map = json.load(f).get("weight_map")
      if not isinstance(weight_map, dict):
        raise ValueError(f"{index}: expected a 'weight_map' object of tensor name -> file")
      paths = sorted({os.path.join(hf_dir, v) for v in weight_map.values()})
    else:
      weight_map = None
      paths = sorted(glob.glob(os.path.join(hf_dir, "*.safetensors")))
      if not paths:
        raise FileNotFoundError(f"{hf_dir}: no *.safetensors files (PyTorch .bin checkpoints are not "
                                "supported; re-save with safe_serialization=True)")
    self.files: dict[str, str] = {}
    self.shapes: dict[str, tuple[int, ...]] = {}
    for path in paths:
      if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: listed in the safetensors index but missing")
      with safe_open(path, "numpy") as f:
        for name in f.keys():
          if weight_map is None or weight_map.get(name) is not None:
            self.files[name] = path
            self.shapes[name] = tuple(f.get_slice(name).get_shape())
    if weight_map is not None:
      absent = sorted(set(weight_map) - set(self.files))
      if absent:
        raise FileNotFoundError(f"{index}: tensors {absent[:4]} are not in the files it names")

  def names(self) -> set[str]:
    return set(self.files)

  def get_many(self, names) -> list[np.ndarray]:
    """The tensors `names` (copies; each file is opened once per call and closed after)."""
    missing = [n for n in names if n not in self.files]
    if missing:
      raise KeyError(f"checkpoint has no tensor(s) {missing[:4]}")
    out: dict[str, np.ndarray] = {}
    for path in sorted({self.files[n] for n in names}):
      with self._open(path, "numpy") as f:
        out.update({n: f.get_tensor(n) for n in names if self.files[n] == path})
    return [out[n] for n in names]

  def get(self, name: str) -> np.ndarray:
    return self.get_many([name])[0]


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


def abstract_state(cfg) -> tuple[dict, dict[str, tuple[str, ...]]]:
  """`{"params", "model_state"}` of an abstract `Transformer(cfg)` (the tree the checkpoint's `model`
  item holds, leaves `ShapeDtypeStruct`), and each variable's dotted nnx path -> key path there."""
  import jax  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from moejax.model.transformer import Transformer  # pylint: disable=import-outside-toplevel
  model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
  _, params, model_state = nnx.split(model, nnx.Param, ...)
  tree = {"params": params, "model_state": model_state}
  keys = {}
  for keypath, _ in jax.tree_util.tree_flatten_with_path(tree)[0]:
    path = tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in keypath)
    keys[".".join(path[1:-1] if path[-1] == "value" else path[1:])] = path
  return tree, keys


class _RuleOutputs:
  """Runs a rule's `load` when its first output is asked for and hands its outputs out one by one;
  a rule is held only until all its outputs were taken (rules with several: fused gate/up, MLA)."""

  def __init__(self, source: TensorSource):
    self._source = source
    self._held: dict[int, list] = {}

  def take(self, index: int, rule: mapping.Rule, k: int, shape, dtype) -> np.ndarray:
    if index not in self._held:
      self._held[index] = list(rule.load(self._source.get_many(rule.theirs)))
    outs = self._held[index]
    value, outs[k] = outs[k], None
    if all(o is None for o in outs):
      del self._held[index]
    if tuple(value.shape) != tuple(shape):
      raise UnsupportedError(f"{rule.theirs[0]}: shape {self._source.shapes[rule.theirs[0]]} maps "
                             f"to {rule.ours[k]} of shape {value.shape}, but config.json implies "
                             f"{tuple(shape)}")
    return np.ascontiguousarray(value, dtype=dtype)


def plan_weights(hf: dict, source: TensorSource, cfg) -> Any:
  """The checkpoint's `model` tree for `Transformer(cfg)` with `streaming.LazyArray` leaves, each
  producing one variable from the checkpoint when written. Checks names and sizes against the
  safetensors headers first (nothing is read here)."""
  import jax  # pylint: disable=import-outside-toplevel
  from moejax.convert.streaming import LazyArray  # pylint: disable=import-outside-toplevel

  arch = mapping.architecture(hf)
  names = source.names()
  fused = any(n.endswith(".experts.gate_up_proj") for n in names)
  rules = mapping.weight_rules(cfg, arch, interleave=bool(hf.get("rope_interleave", True)),
                               fused_experts=fused)
  tree, keys = abstract_state(cfg)
  targets = {path: leaf for path, leaf in zip(keys, jax.tree.leaves(tree))}
  outputs = _RuleOutputs(source)
  leaves: dict[str, LazyArray] = {}
  used: set[str] = set()
  for index, rule in enumerate(rules):
    missing = [n for n in rule.theirs if n not in names]
    if missing:
      raise UnsupportedError(f"checkpoint lacks tensor(s) {missing[:4]} needed for {rule.ours} "
                             f"(config.json and the weights disagree?)")
    unknown = [p for p in rule.ours if p not in targets]
    if unknown:
      raise RuntimeError(f"mapping error: moejax has no variable(s) {unknown}")
    theirs = sum(int(np.prod(source.shapes[n])) for n in rule.theirs)
    ours = sum(int(np.prod(targets[p].shape)) for p in rule.ours)
    if theirs != ours:
      shapes = [source.shapes[n] for n in rule.theirs[:2]]
      raise UnsupportedError(f"{rule.theirs[0]}: shape(s) {shapes}{' ...' * (len(rule.theirs) > 2)} "
                             f"map to {rule.ours} of shape(s) "
                             f"{[targets[p].shape for p in rule.ours]} implied by config.json")
    for k, path in enumerate(rule.ours):
      shape, dtype = targets[path].shape, targets[path].dtype
      leaves[path] = LazyArray(shape, dtype, lambda i=index, r=rule, k=k, s=shape, d=dtype:
                               outputs.take(i, r, k, s, d))
    used.update(rule.theirs)
  extra = sorted(n for n in names - used if not mapping.ignorable(n, cfg.num_layers))
  if extra:
    raise UnsupportedError(f"checkpoint tensors with no moejax counterpart: {extra[:8]}"
                           f"{' ...' if len(extra) > 8 else ''}")
  unfilled = sorted(set(targets) - set(leaves))
  if unfilled:
    raise UnsupportedError(f"moejax variables not filled by the checkpoint: {unfilled[:8]}")
  return jax.tree.unflatten(jax.tree.structure(tree), [leaves[p] for p in keys])


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
  """Converts `hf_dir` into the run directory `out_dir`, streaming; returns the `ModelConfig`."""
  from moejax.convert import streaming  # pylint: disable=import-outside-toplevel
  from moejax.train import checkpoint, config_lib  # pylint: disable=import-outside-toplevel

  hf = read_hf_config(hf_dir)
  cfg = mapping.to_model_config(hf, param_dtype=param_dtype, compute_dtype=compute_dtype,
                                max_seq_len=max_seq_len)
  tree = plan_weights(hf, TensorSource(hf_dir), cfg)
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
  streaming.save_model_item(out_dir, step, tree)
  with open(os.path.join(out_dir, checkpoint.CONFIG_FILE), "w", encoding="utf-8") as f:
    f.write(config_lib.to_json(experiment_config(cfg, tok_path)))
  return cfg


def _layer_groups(rules: list) -> list[list]:
  """Consecutive rules of one layer (`blocks.<i>`) together; every other rule alone."""
  groups: list[list] = []
  last = None
  for rule in rules:
    parts = rule.ours[0].split(".")
    key = ".".join(parts[:2]) if parts[0] == "blocks" else None
    if key is None or key != last:
      groups.append([])
    groups[-1].append(rule)
    last = key
  return groups


def _export(cfg, read: Callable[[list[str]], dict[str, np.ndarray]], variable_paths: set[str],
            out_dir: str, *, hf_base: dict | None, tokenizer_path: str, max_shard_bytes: int) -> dict:
  """Writes the HF checkpoint of a model whose variables `read(paths)` returns, one layer at a time."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from moejax.convert.streaming import ShardWriter  # pylint: disable=import-outside-toplevel
  arch = mapping.infer_architecture(cfg)
  if hf_base and mapping.architecture(hf_base) != arch:
    hf_base = None
  hf = mapping.to_hf_config(cfg, arch, hf_base)
  rules = mapping.weight_rules(cfg, arch, interleave=bool(hf.get("rope_interleave", True)))
  mapped = {p for rule in rules for p in rule.ours}
  if mapped - variable_paths:
    raise RuntimeError(f"mapping error: moejax has no variable(s) {sorted(mapped - variable_paths)}")
  if variable_paths - mapped:
    raise UnsupportedError(f"export: moejax variables with no HF counterpart: "
                           f"{sorted(variable_paths - mapped)[:8]}")
  param_dtype = jnp.dtype(cfg.param_dtype)  # the fp32 router goes back to the checkpoint dtype.
  os.makedirs(out_dir, exist_ok=True)
  shards = ShardWriter(out_dir, max_shard_bytes)
  for group in _layer_groups(rules):
    ours = read([p for rule in group for p in rule.ours])
    for rule in group:
      for name, value in zip(rule.theirs, rule.save([ours.pop(p) for p in rule.ours])):
        bias = name.endswith("e_score_correction_bias")  # fp32 in DeepSeek-V3 checkpoints.
        shards.add(name, value.astype(np.float32 if bias else param_dtype, order="C"))
  shards.close()
  with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as f:
    json.dump(hf, f, indent=2, sort_keys=True)
  if tokenizer_path and os.path.isfile(tokenizer_path):
    shutil.copyfile(tokenizer_path, os.path.join(out_dir, TOKENIZER))
  return hf


def export_hf(model, out_dir: str, *, hf_base: dict | None = None, tokenizer_path: str = "",
              max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> dict:
  """Writes `model` (a moejax Transformer) as an HF checkpoint; returns the HF config dict."""
  variables = _variables(model)
  return _export(model.cfg, lambda paths: {p: np.asarray(variables[p].get_value()) for p in paths},
                 set(variables), out_dir, hf_base=hf_base, tokenizer_path=tokenizer_path,
                 max_shard_bytes=max_shard_bytes)


def export_run(run_dir: str, out_dir: str, *, step: int | None = None,
               max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> dict:
  """Exports the latest (or given) checkpoint of a moejax run directory (or of a checkpoint
  directory `W/checkpoints/<step>`) to an HF directory, reading it one layer at a time."""
  from moejax.convert.streaming import ModelItemReader  # pylint: disable=import-outside-toplevel
  from moejax.train import checkpoint, config_lib  # pylint: disable=import-outside-toplevel
  workdir, path_step = checkpoint._resolve(run_dir)  # pylint: disable=protected-access
  with open(os.path.join(workdir, checkpoint.CONFIG_FILE), encoding="utf-8") as f:
    cfg = config_lib.model_config(config_lib.from_json(f.read()))
  base = None
  if os.path.isfile(os.path.join(workdir, HF_CONFIG)):
    with open(os.path.join(workdir, HF_CONFIG), encoding="utf-8") as f:
      base = json.load(f)
  _, keys = abstract_state(cfg)
  reader = ModelItemReader(workdir, step if step is not None else path_step)
  try:
    return _export(cfg, lambda paths: dict(zip(paths, reader.read([keys[p] for p in paths]))),
                   set(keys), out_dir, hf_base=base, tokenizer_path=os.path.join(workdir, TOKENIZER),
                   max_shard_bytes=max_shard_bytes)
  finally:
    reader.close()


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
