"""Sharding the TrainState and the batch, and jitting the train step with NamedShardings.

Every `nnx.Variable` (params, the AdamW moments that mirror them, the ALF-LB `RouterBias`) carries
logical axis names in its `axes` metadata; `state_shardings` maps them through the rules table
(`moejax.parallel.mesh.DEFAULT_RULES` or `config.mesh.rules`) to `NamedSharding`s. A dimension the
mapped mesh axes do not divide (e.g. a router over E + MoE++ zero-computation experts) is
replicated instead. Plain arrays (step, rng, optimizer counts) are replicated.

Meshes may use jax's Explicit axis types (the `jax.make_mesh` default since jax 0.10) or Auto ones:
the step is compiled on an Auto view of the same devices (`auto_mesh`), where GSPMD propagates
shardings and `moejax.sharding.constrain` adds hints; explicit sharding-in-types would require an
`out_sharding` on every contraction of the model.

Per-process data becomes one global batch with `jax.make_array_from_process_local_data`
(each process feeds `batch_size / process_count` rows, in process order).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from moejax import sharding
from moejax.parallel import mesh as mesh_lib

BATCH_AXES = ("batch", "length")


def auto_mesh(mesh: Mesh) -> Mesh:
  """The same devices and axis names with Auto axis types (no-op for an Auto mesh)."""
  types = getattr(mesh, "axis_types", None)
  if types is not None and all(t == AxisType.Auto for t in types):
    return mesh
  return Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * len(mesh.axis_names))


def _is_var(x) -> bool:
  return isinstance(x, nnx.Variable)


def spec_for(axes, shape, mesh: Mesh, rules) -> P:
  """PartitionSpec of an array from its logical axes; mesh axes that do not divide a dim are dropped."""
  if axes is None or len(axes) != len(shape):
    return P()
  spec = sharding.logical_to_spec(tuple(axes), tuple(rules))
  sizes = dict(mesh.shape)
  out = []
  for dim, entry in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    targets = () if entry is None else ((entry,) if isinstance(entry, str) else tuple(entry))
    targets = tuple(a for a in targets if a in sizes)
    kept, prod = [], 1
    for a in targets:
      if dim % (prod * sizes[a]) == 0:
        kept.append(a)
        prod *= sizes[a]
    out.append(None if not kept else (kept[0] if len(kept) == 1 else tuple(kept)))
  return P(*out)


def state_shardings(state: Any, mesh: Mesh, rules=mesh_lib.DEFAULT_RULES) -> Any:
  """A tree of NamedShardings with the structure of `state` (any pytree holding nnx Variables)."""
  mesh = auto_mesh(mesh)
  replicated = NamedSharding(mesh, P())

  def one(x):
    if _is_var(x):
      meta = x.get_metadata() if hasattr(x, "get_metadata") else {}
      value = x.get_value() if hasattr(x, "get_value") else x.value
      named = NamedSharding(mesh, spec_for(meta.get("axes"), np.shape(value), mesh, rules))
      return jax.tree.map(lambda _: named, x)
    return replicated

  return jax.tree.map(one, state, is_leaf=_is_var)


def shard_state(state: Any, shardings: Any) -> Any:
  """Places (or reshards) every array of `state` per `shardings` (from `state_shardings`)."""
  return jax.device_put(state, shardings)


def abstract_state(state: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs carrying the target shardings: restoring a checkpoint onto them reshards."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s),
                      state, shardings)


def batch_sharding(mesh: Mesh, rules=mesh_lib.DEFAULT_RULES) -> NamedSharding:
  """[B, L] int batches: B split over the mesh axes of the `batch` rule."""
  mesh = auto_mesh(mesh)
  return NamedSharding(mesh, sharding.logical_to_spec(BATCH_AXES, tuple(rules)))


def global_batch(local_batch: Mapping[str, np.ndarray], mesh: Mesh,
                 rules=mesh_lib.DEFAULT_RULES) -> dict[str, jax.Array]:
  """One global batch from this process's rows (`jax.make_array_from_process_local_data`).

  Every process passes `batch_size / process_count` rows; the global batch stacks them in process
  order. A clear error names the array when the global rows do not split over the batch shards.
  """
  sh = batch_sharding(mesh, rules)
  shards = mesh_lib.batch_shards(auto_mesh(mesh), rules)
  out = {}
  for name, local in local_batch.items():
    local = np.asarray(local)
    global_shape = (local.shape[0] * jax.process_count(),) + local.shape[1:]
    if global_shape[0] % shards:
      raise ValueError(f"global_batch: {name!r} has {global_shape[0]} global rows "
                       f"({local.shape[0]} per process x {jax.process_count()} processes), not a "
                       f"multiple of the {shards} batch shards of the mesh {dict(mesh.shape)}")
    out[name] = jax.make_array_from_process_local_data(sh, local, global_shape)
  return out


def host_batch(batch: Mapping[str, np.ndarray], mesh: Mesh,
               rules=mesh_lib.DEFAULT_RULES) -> dict[str, jax.Array]:
  """A global batch that every process holds in full (e.g. fixed eval batches), split like training
  batches (`jax.make_array_from_callback`: each device takes its rows)."""
  sh = batch_sharding(mesh, rules)
  return {k: jax.make_array_from_callback(np.shape(v), sh, lambda idx, v=v: np.asarray(v)[idx])
          for k, v in batch.items()}


def process_rows(mesh: Mesh, global_rows: int, rules=mesh_lib.DEFAULT_RULES) -> slice:
  """The contiguous range of global batch rows whose shards live on this process's devices (what
  `global_batch` expects this process to pass, in order)."""
  sh = batch_sharding(mesh, rules)
  starts = sorted({idx[0].indices(global_rows)[:2]
                   for idx in sh.addressable_devices_indices_map((global_rows, 1)).values()})
  lo, hi = starts[0][0], starts[0][1]
  for a, b in starts[1:]:
    if a != hi:
      raise ValueError(f"process_rows: process {jax.process_index()} owns non-contiguous batch rows "
                       f"{starts}; order the mesh devices by process")
    hi = b
  return slice(lo, hi)


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Host values (numpy, identical on every process) as replicated global arrays."""
  sh = NamedSharding(auto_mesh(mesh), P())
  return jax.tree.map(lambda x: jax.make_array_from_callback(np.shape(x), sh,
                                                             lambda idx: np.asarray(x)[idx]), tree)


def with_rules(fn: Callable, mesh: Mesh, rules) -> Callable:
  """`fn` traced under `sharding.use_rules(mesh, rules)` (activation constraints, the EP path)."""
  mesh = auto_mesh(mesh)

  def wrapped(*args, **kwargs):
    with sharding.use_rules(mesh, rules):
      return fn(*args, **kwargs)

  return wrapped


def jit_train_step(train_step: Callable, mesh: Mesh, rules, state_sh: Any,
                   donate: bool = True) -> Callable:
  """`train_step(state, batch) -> (state, metrics)` jitted: state in/out per `state_sh`, batch split
  over the batch axes, metrics replicated (readable on every process)."""
  mesh = auto_mesh(mesh)
  return jax.jit(with_rules(train_step, mesh, rules),
                 in_shardings=(state_sh, batch_sharding(mesh, rules)),
                 out_shardings=(state_sh, NamedSharding(mesh, P())),
                 donate_argnums=(0,) if donate else ())


def jit_eval_step(eval_step: Callable, mesh: Mesh, rules, params_sh: Any,
                  model_state_sh: Any) -> Callable:
  """`eval_step(params, model_state, batch)` jitted with the same shardings; outputs replicated."""
  mesh = auto_mesh(mesh)
  return jax.jit(with_rules(eval_step, mesh, rules),
                 in_shardings=(params_sh, model_state_sh, batch_sharding(mesh, rules)),
                 out_shardings=NamedSharding(mesh, P()))
