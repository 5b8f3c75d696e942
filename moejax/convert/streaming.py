"""Streaming I/O for `moejax.convert.hf`: host memory bounded by one layer, not by the model.

* `save_model_item(workdir, step, tree)` writes `checkpoints/<step>/model` as
  `moejax.train.checkpoint.save_model_only` does (same orbax PyTree handler options, OCDBT store,
  `jax.Array` value metadata, `_sharding` and array metadata, step metadata naming
  `StandardCheckpointHandler`), so `moejax.load`, the trainer and the eval worker restore it
  unchanged -- but from a tree of `LazyArray` leaves, each produced (read from the HF checkpoint,
  rearranged, cast) only when orbax reaches it. Leaves are written in batches of at most the largest
  leaf's size, each batch on disk before the next is produced.
* `ModelItemReader` restores chosen leaves of that item as numpy arrays (orbax partial restore).
* `ShardWriter` writes safetensors shards one at a time (`model.safetensors`, or
  `model-0000i-of-0000n.safetensors` + index), holding at most one shard's tensors.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts

MODEL_ITEM = "model"


class LazyArray:
  """A checkpoint leaf of `shape`/`dtype` whose value `produce()` computes when it is written."""

  def __init__(self, shape: tuple[int, ...], dtype: Any, produce: Callable[[], np.ndarray]):
    self.shape, self.dtype, self.produce = tuple(shape), np.dtype(dtype), produce

  @property
  def nbytes(self) -> int:
    return int(np.prod(self.shape)) * self.dtype.itemsize

  def __repr__(self) -> str:
    return f"LazyArray({self.shape}, {self.dtype})"


class _StreamingArrayHandler(ocp.type_handlers.TypeHandler):
  """Writes `LazyArray` leaves with orbax's registered `jax.Array` handler, so they are stored and
  described exactly like `jax.Array`s, a few at a time: leaves are produced and put on the default
  device (as `jnp.asarray` would) until the next would take the batch past the largest leaf's size;
  the batch is written and awaited, then dropped. Batching small leaves (norms, attention) together
  keeps the number of OCDBT commits (~30 ms each) near the number of large leaves."""

  def __init__(self):
    self.arrays = ocp.type_handlers.get_type_handler(jax.Array)

  def typestr(self) -> str:
    return self.arrays.typestr()

  async def metadata(self, infos):
    return await self.arrays.metadata(infos)

  async def deserialize(self, infos, args=None):
    return await self.arrays.deserialize(infos, args)

  async def _write(self, batch: list) -> None:
    arrays, infos, args = (list(x) for x in zip(*batch))
    for commit in await self.arrays.serialize(arrays, infos, args):
      commit.result()  # runs in its own thread; blocks until the batch is on disk.
    batch.clear()

  async def serialize(self, values, infos, args=None):
    if not values:
      return []
    args = args or [ocp.type_handlers.SaveArgs()] * len(values)
    # orbax's context keeps up to 100 MB of OCDBT B-tree nodes cached, and every batch commits a
    # B-tree version: with that cache the peak grew with the layer count (24 layers: +35 MB).
    context = ts.Context({**infos[0].ts_context.spec.to_json(),
                          "cache_pool#ocdbt": {"total_bytes_limit": 0}})
    infos = [info.replace(ts_context=context) for info in infos]
    budget = max(v.nbytes for v in values)
    batch: list = []
    batch_bytes = 0
    for value, info, arg in zip(values, infos, args):
      if batch and batch_bytes + value.nbytes > budget:
        await self._write(batch)
        batch_bytes = 0
      host = value.produce()
      if host.shape != value.shape or host.dtype != value.dtype:
        raise AssertionError(f"{info.name}: produced {host.shape} {host.dtype}, "
                             f"expected {value.shape} {value.dtype}")
      batch.append((jax.device_put(host), info, arg))
      batch_bytes += value.nbytes
      del host
    if batch:
      await self._write(batch)
    return []


class _ModelItemHandler(ocp.PyTreeCheckpointHandler):
  """PyTree handler that also accepts `LazyArray` leaves; recorded in the step metadata under the
  name of `StandardCheckpointHandler`, which wraps the same PyTree handler with the same options."""

  def __init__(self):
    lazy = _StreamingArrayHandler()  # jax.Array's handler too: its metadata store is the item's.
    registry = ocp.type_handlers.create_type_handler_registry(
        (LazyArray, lazy), (jax.Array, lazy.arrays))
    super().__init__(save_concurrent_gb=96, restore_concurrent_gb=96,
                     type_handler_registry=registry)

  @classmethod
  def typestr(cls) -> str:
    return ocp.StandardCheckpointHandler.typestr()


def save_model_item(workdir: str, step: int, tree: Any) -> None:
  """Writes `tree` (leaves: `LazyArray`) as the `model` item of `workdir/checkpoints/<step>`."""
  from moejax.train import checkpoint  # pylint: disable=import-outside-toplevel
  options = ocp.CheckpointManagerOptions(max_to_keep=1, create=True,
                                         enable_async_checkpointing=False)
  registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
  registry.add(MODEL_ITEM, ocp.args.PyTreeSave, _ModelItemHandler())
  mngr = ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, checkpoint.CHECKPOINT_DIR)),
                               options=options, handler_registry=registry)
  mngr.save(step, args=ocp.args.Composite(**{MODEL_ITEM: ocp.args.PyTreeSave(tree)}), force=True)
  mngr.wait_until_finished()
  mngr.close()


class ModelItemReader:
  """Reads chosen leaves of a run directory's `model` item (latest or given step) as numpy arrays."""

  def __init__(self, workdir: str, step: int | None = None):
    from moejax.train import checkpoint  # pylint: disable=import-outside-toplevel
    self._mngr = checkpoint.manager(workdir, read_only=True, async_save=False)
    self.step = step if step is not None else self._mngr.latest_step()
    if self.step is None:
      raise FileNotFoundError(f"{workdir}/{checkpoint.CHECKPOINT_DIR}: no finalised checkpoint")

  def read(self, keypaths: list[tuple[str, ...]]) -> list[np.ndarray]:
    """The leaves at `keypaths` (tuples of keys, e.g. ('params', 'blocks', '0', ..., 'value'))."""
    item: dict = {}
    for path in keypaths:
      node = item
      for key in path[:-1]:
        node = node.setdefault(key, {})
      node[path[-1]] = 0
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
    out = self._mngr.restore(self.step, args=ocp.args.Composite(**{
        MODEL_ITEM: ocp.args.PyTreeRestore(item=item, restore_args=restore_args,
                                           partial_restore=True)}))[MODEL_ITEM]
    values = []
    for path in keypaths:
      node = out
      for key in path:
        node = node[key]
      values.append(node)
    return values

  def close(self) -> None:
    self._mngr.close()


SAFETENSORS_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64",
                      "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8",
                      "bool": "BOOL"}


def write_safetensors(path: str, tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> None:
  """Writes `tensors` as one safetensors file, tensor by tensor (no serialised copy of the file)."""
  header: dict[str, Any] = {"__metadata__": metadata}
  offset = 0
  for name, value in tensors.items():
    if value.dtype.name not in SAFETENSORS_DTYPES:
      raise TypeError(f"{name}: dtype {value.dtype} has no safetensors code")
    header[name] = {"dtype": SAFETENSORS_DTYPES[value.dtype.name], "shape": list(value.shape),
                    "data_offsets": [offset, offset + value.nbytes]}
    offset += value.nbytes
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned, as safetensors writes it.
  with open(path, "wb") as f:
    f.write(len(blob).to_bytes(8, "little"))
    f.write(blob)
    for value in tensors.values():
      f.write(np.ascontiguousarray(value).reshape(-1).view(np.uint8).data)


class ShardWriter:
  """Collects named tensors and writes a safetensors shard whenever the next tensor would take it
  past `max_shard_bytes`, so at most one shard is held; `close()` names the shards as
  `transformers` does (`model.safetensors`, or `model-0000i-of-0000n.safetensors` + index)."""

  def __init__(self, out_dir: str, max_shard_bytes: int):
    self.out_dir, self.max_shard_bytes = out_dir, max_shard_bytes
    self._pending: dict[str, np.ndarray] = {}
    self._pending_bytes = 0
    self._shards: list[list[str]] = []   # tensor names of each written shard
    self._total_bytes = 0

  def _tmp_path(self, i: int) -> str:
    return os.path.join(self.out_dir, f".shard-{i:05d}.safetensors.tmp")

  def _flush(self) -> None:
    if self._pending:
      write_safetensors(self._tmp_path(len(self._shards)), self._pending, {"format": "pt"})
      self._shards.append(list(self._pending))
      self._pending, self._pending_bytes = {}, 0

  def add(self, name: str, value: np.ndarray) -> None:
    if self._pending and self._pending_bytes + value.nbytes > self.max_shard_bytes:
      self._flush()
    self._pending[name] = value
    self._pending_bytes += value.nbytes
    self._total_bytes += value.nbytes

  def close(self) -> list[str]:
    """Writes the last shard, renames all into place (and the index); returns the file names."""
    self._flush()
    n = len(self._shards)
    names = (["model.safetensors"] if n == 1 else
             [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)])
    for i, fname in enumerate(names):
      os.replace(self._tmp_path(i), os.path.join(self.out_dir, fname))
    if n > 1:
      weight_map = {k: fname for fname, shard in zip(names, self._shards) for k in shard}
      with open(os.path.join(self.out_dir, "model.safetensors.index.json"), "w",
                encoding="utf-8") as f:
        json.dump({"metadata": {"total_size": self._total_bytes}, "weight_map": weight_map}, f,
                  indent=2)
    return names
