"""The device mesh from `config.mesh`, and the logical-axis rules table.

`config.mesh` gives the sizes of the four mesh axes `data`, `fsdp`, `expert`, `tensor` (one of them
may be -1: "the rest of the devices"). Model code names only logical axes (`moejax.sharding`);
`DEFAULT_RULES` maps them to mesh axes, MaxText/flax-lm1b style (`logical_axis_rules`):

  batch  -> (data, fsdp, expert)  every axis that is not `tensor` splits the batch; the expert axis
                                  acts as data parallelism outside the MoE layers (MaxText EP-as-DP),
                                  so its shards hold different tokens for the all-to-all to exchange
  embed  -> fsdp                  parameters FSDP/ZeRO-3-sharded on d_model, gathered for compute
  mlp, heads, kv_heads, vocab -> tensor   (Megatron-style column/row splits)
  expert -> expert                routed experts split over the expert axis
  length, head_dim -> replicated

A mesh axis is used at most once per array (`sharding.logical_to_spec`), so an activation
`(batch, length, embed)` is sharded on batch only. `config.mesh.rules`, when the config has it,
replaces the table (a list of `(logical, mesh axis or tuple or None)` pairs).
"""

from __future__ import annotations

import logging
import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

from moejax.model.config import ConfigError

MESH_AXES = ("data", "fsdp", "expert", "tensor")
BATCH_AXES = ("data", "fsdp", "expert")

DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp", "expert")),
    ("length", None),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("vocab", "tensor"),
    ("expert", "expert"),
)


def mesh_shape(sizes: Mapping[str, int], num_devices: int) -> dict[str, int]:
  """Resolves `{data, fsdp, expert, tensor}` sizes (at most one -1) against `num_devices`.

  Missing axes default to 1. Raises ConfigError naming `mesh.<axis>` when a size is not a positive
  int or -1, when more than one axis is -1, or when the product does not equal the device count.
  """
  unknown = sorted(set(sizes) - set(MESH_AXES) - {"rules"})
  if unknown:
    raise ConfigError(f"mesh: unknown axes {unknown}; expected a subset of {MESH_AXES}")
  shape = {}
  for axis in MESH_AXES:
    size = sizes.get(axis, 1)
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or (size != -1 and size < 1):
      raise ConfigError(f"mesh.{axis}={size!r}: expected a positive int or -1 (the rest of the devices)")
    shape[axis] = int(size)
  rest = [a for a in MESH_AXES if shape[a] == -1]
  if len(rest) > 1:
    raise ConfigError(f"mesh: only one axis may be -1, got {rest}")
  fixed = math.prod(s for s in shape.values() if s != -1)
  if rest:
    if num_devices % fixed:
      raise ConfigError(
          f"mesh.{rest[0]}=-1: the other axes {_fmt(shape)} use {fixed} devices, which does not "
          f"divide the {num_devices} available devices")
    shape[rest[0]] = num_devices // fixed
  elif fixed != num_devices:
    raise ConfigError(
        f"mesh: {_fmt(shape)} needs {fixed} devices but {num_devices} are available; make the "
        f"product of the axis sizes equal the device count, or set one axis to -1")
  return shape


def _fmt(shape: Mapping[str, int]) -> str:
  return " x ".join(f"{a}={s}" for a, s in shape.items() if s != -1) or "(none)"


def make_mesh(sizes: Mapping[str, int], devices: Sequence[Any] | None = None, *,
              explicit: bool = False) -> Mesh:
  """A 4-axis mesh (data, fsdp, expert, tensor) over `devices` (default: all devices).

  Axis types are Auto (GSPMD propagation; what the train step compiles with) unless `explicit`,
  which gives jax's sharding-in-types Explicit axes (the `jax.make_mesh` default since jax 0.10);
  `train_sharding` accepts both.
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(sizes, len(devices))
  axis_type = AxisType.Explicit if explicit else AxisType.Auto
  return jax.make_mesh(tuple(shape[a] for a in MESH_AXES), MESH_AXES,
                       axis_types=(axis_type,) * len(MESH_AXES), devices=devices)


def axis_size(mesh: Mesh, axis: str) -> int:
  return int(dict(mesh.shape).get(axis, 1))


def check_model_fits(mesh: Mesh, num_experts: int, batch_size: int | None = None,
                     rules=None) -> None:
  """Clear errors before compiling: experts divisible by the expert axis, batch by its shards."""
  ep = axis_size(mesh, "expert")
  if num_experts and num_experts % ep:
    raise ConfigError(
        f"moe.num_experts={num_experts}: expected a multiple of the expert mesh axis "
        f"(mesh.expert={ep}); every expert shard must own the same number of experts")
  if batch_size is not None:
    shards = batch_shards(mesh, rules)
    if batch_size % shards:
      raise ConfigError(
          f"train.batch_size={batch_size}: expected a multiple of the {shards} batch shards "
          f"({' x '.join(f'{a}={axis_size(mesh, a)}' for a in batch_axes(rules))})")


def batch_shards(mesh: Mesh, rules=None) -> int:
  """How many ways the batch is split: product of the mesh axes `batch` maps to."""
  table = dict(DEFAULT_RULES if rules is None else rules)
  target = table.get("batch")
  axes = () if target is None else ((target,) if isinstance(target, str) else tuple(target))
  return math.prod(axis_size(mesh, a) for a in axes)


def batch_axes(rules=None) -> tuple[str, ...]:
  """Mesh axes that split the batch (the `batch` rule)."""
  target = dict(DEFAULT_RULES if rules is None else rules).get("batch")
  return () if target is None else ((target,) if isinstance(target, str) else tuple(target))


def rules_from_config(mesh_cfg: Mapping[str, Any] | None) -> tuple[tuple[str, Any], ...]:
  """`config.mesh.rules` as a tuple of pairs (validated), or DEFAULT_RULES when the key is absent."""
  if mesh_cfg is None or "rules" not in mesh_cfg or mesh_cfg["rules"] is None:
    return DEFAULT_RULES
  raw = mesh_cfg["rules"]
  if len(raw) > 16:
    raise ConfigError(f"mesh.rules: {len(raw)} entries; keep the table short (<= 16 rules)")
  out = []
  for entry in raw:
    if len(entry) != 2 or not isinstance(entry[0], str):
      raise ConfigError(f"mesh.rules: entry {entry!r}: expected (logical name, mesh axes)")
    name, target = entry
    targets = () if target is None else ((target,) if isinstance(target, str) else tuple(target))
    bad = [t for t in targets if t not in MESH_AXES]
    if bad:
      raise ConfigError(f"mesh.rules: {name!r} maps to unknown mesh axes {bad}; expected {MESH_AXES}")
    out.append((name, None if not targets else (targets[0] if len(targets) == 1 else targets)))
  return tuple(out)


def from_config(config, num_experts: int | None = None, batch_size: int | None = None,
                devices: Sequence[Any] | None = None):
  """(mesh, rules) from an experiment ConfigDict; checks experts and batch against the mesh.

  The default mesh (data=-1, every other axis 1) in a single process whose batch does not split
  over all devices (e.g. batch 2 on 8 simulated CPU devices) uses the first gcd(batch, devices)
  devices, with a warning; any mesh the config sets explicitly must match the device count.
  """
  mesh_cfg = dict(config.mesh)
  sizes = {a: mesh_cfg.get(a, 1) for a in MESH_AXES}
  devices = list(jax.devices() if devices is None else devices)
  rules = rules_from_config(mesh_cfg)
  default = sizes == {"data": -1, "fsdp": 1, "expert": 1, "tensor": 1}
  if (default and batch_size and batch_size % len(devices) and jax.process_count() == 1
      and batch_axes(rules)[:1] == ("data",)):
    n = math.gcd(batch_size, len(devices))
    logging.warning("train.batch_size=%d does not split over %d devices: the default mesh uses the "
                    "first %d (set config.mesh to choose)", batch_size, len(devices), n)
    devices = devices[:n]
  mesh = make_mesh(sizes, devices)
  if num_experts is not None:
    check_model_fits(mesh, num_experts, batch_size, rules)
  return mesh, rules
