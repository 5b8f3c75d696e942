"""Expert-parallel (EP) routed experts with `shard_map` and all-to-all (GShard arXiv 2006.16668 §2-3).

The tokens are split over every mesh axis in `batch_axes` (the expert axis included: outside the
MoE layer it acts as data parallelism), the E routed experts over `expert_axis` (P shards of
E_l = E / P experts). Each phase is one function:

  route (done by `MoELayer.route`, token-wise, so local to each batch shard)
  -> dispatch: all-to-all of every (token, choice) copy to the shard that owns its expert
  -> expert_ffn: local SwiGLU experts (grouped matmul `get_ops(impl).gmm`, or einsums for capacity)
  -> return: the reverse all-to-all
  -> combine: y_t = sum_k g_{t,k} FFN_{e_{t,k}}(x_t) on the token's own shard.

Three exchanges:
- "capacity": GShard fixed capacity. Each batch shard is one GShard group with
  C = ceil(T_l K / E * capacity_factor) slots per expert (first choices first); the [E, C, D]
  dispatch buffer moves with one `all_to_all`. Copies over capacity are dropped and counted.
- "padded": dropless with a plain `all_to_all` of worst-case-sized buffers ([P, T_l K, D]: every copy
  could go to one shard). Runs everywhere, CPU included; costs P x the memory of "ragged".
- "ragged": dropless with `jax.lax.ragged_all_to_all` (only the routed rows move). XLA:CPU cannot
  compile the op ("ragged-all-to-all is not supported by XLA:CPU"), so on CPU `ragged` runs an
  emulation with identical semantics built on `all_to_all` (`ragged_all_to_all_emulated`); on
  GPU/TPU the real collective is used.

Load counts and drop counts are `psum`med over all `batch_axes`, so the ALF-LB bias update
(arXiv 2408.15664 Algorithm 1) and the drop fraction see the global batch.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Callable, Iterator, NamedTuple, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from moejax import sharding
from moejax.kernels import get_ops
from moejax.model import dispatch

EXCHANGES = ("capacity", "padded", "ragged")

try:
  _shard_map = jax.shard_map
except AttributeError:  # jax < 0.6
  from jax.experimental.shard_map import shard_map as _shard_map  # pylint: disable=g-import-not-at-top


class EPPlan(NamedTuple):
  """Where EP runs: the mesh, the axis the experts are split over, the axes splitting tokens."""
  mesh: Mesh
  expert_axis: str = "expert"
  batch_axes: tuple[str, ...] = ("data", "fsdp", "expert")
  exchange: str = "auto"     # dropless exchange: auto | padded | ragged (auto: ragged off CPU).


_FORCE: contextvars.ContextVar[bool] = contextvars.ContextVar("moejax_force_ep", default=False)


@contextlib.contextmanager
def force_ep(on: bool = True) -> Iterator[None]:
  """Use the EP path even when the expert axis has size 1 (overhead benchmarks, tests)."""
  token = _FORCE.set(on)
  try:
    yield
  finally:
    _FORCE.reset(token)


def plan_from_active(expert_axis: str = "expert") -> EPPlan | None:
  """The EP plan for the mesh/rules activated by `sharding.use_rules`, or None (single-device path).

  EP is on when the active mesh has an `expert_axis` of size > 1 (or under `force_ep`). The axes
  that split tokens are those the `batch` rule maps to.
  """
  ctx = sharding.active()
  if ctx is None:
    return None
  mesh, rules = ctx
  size = dict(mesh.shape).get(expert_axis, 0)
  if size == 0 or (size == 1 and not _FORCE.get()):
    return None
  target = rules.get("batch")
  batch_axes = () if target is None else ((target,) if isinstance(target, str) else tuple(target))
  return EPPlan(mesh, expert_axis, tuple(a for a in batch_axes if a in mesh.shape))


def _resolve_exchange(mode: str, exchange: str) -> str:
  if mode == "capacity":
    return "capacity"
  if mode != "dropless":
    raise ValueError(f"expert_parallel: mode={mode!r}: expected 'dropless' or 'capacity'")
  if exchange == "auto":
    return "padded" if jax.default_backend() == "cpu" else "ragged"
  if exchange not in ("padded", "ragged"):
    raise ValueError(f"expert_parallel: exchange={exchange!r}: expected auto, padded or ragged")
  return exchange


# ----------------------------------------------------------------------------------------------
# Collectives.
# ----------------------------------------------------------------------------------------------

def ragged_all_to_all_emulated(operand, output, input_offsets, send_sizes, output_offsets,
                               recv_sizes, *, axis_name: str, axis_size: int):
  """`jax.lax.ragged_all_to_all` semantics (one chunk per peer) from a dense `all_to_all`.

  Chunk j = operand[input_offsets[j] : + send_sizes[j]] is written on peer j at
  output[output_offsets[j] : + send_sizes[j]]; `recv_sizes[i]` rows arrive from peer i.
  """
  n = operand.shape[0]
  rows = jnp.arange(n)

  def pack(offset, size):
    chunk = jnp.take(operand, jnp.clip(offset + rows, 0, n - 1), axis=0)
    mask = (rows < size).reshape((n,) + (1,) * (operand.ndim - 1))
    return jnp.where(mask, chunk, jnp.zeros_like(chunk))

  chunks_PxN = jax.vmap(pack)(input_offsets, send_sizes)
  recv_PxN = jax.lax.all_to_all(chunks_PxN, axis_name, 0, 0)
  dest_off_P = jax.lax.all_to_all(output_offsets, axis_name, 0, 0, tiled=True)
  target_PxN = jnp.where(rows[None, :] < recv_sizes[:, None], dest_off_P[:, None] + rows[None, :],
                         output.shape[0])   # out of bounds -> dropped by the scatter
  del axis_size
  return output.at[target_PxN.reshape(-1)].set(
      recv_PxN.reshape((-1,) + operand.shape[1:]), mode="drop")


def _ragged(exchange_fn, operand, output, in_off, send, out_off, recv, axis_name, axis_size):
  return exchange_fn(operand, output, in_off, send, out_off, recv, axis_name=axis_name,
                     axis_size=axis_size)


def _real_ragged(operand, output, in_off, send, out_off, recv, *, axis_name, axis_size):
  del axis_size
  return jax.lax.ragged_all_to_all(operand, output, in_off, send, out_off, recv,
                                   axis_name=axis_name)


# ----------------------------------------------------------------------------------------------
# Per-shard phases (run inside shard_map).
# ----------------------------------------------------------------------------------------------

def _combine(y_copies_TxKxD, gates_TxK, dt):
  """combine: y_t = sum_k g_{t,k} y_{t,k} in fp32, cast to the compute dtype."""
  y = jnp.einsum("tkd,tk->td", y_copies_TxKxD.astype(jnp.float32), gates_TxK.astype(jnp.float32))
  return y.astype(dt)


def _local_load(idx_TxK, num_experts):
  """Copies routed to each FFN expert on this shard (ids outside [0, E) are not counted)."""
  flat = idx_TxK.reshape(-1)
  flat = jnp.where((flat >= 0) & (flat < num_experts), flat, num_experts)
  return jnp.zeros((num_experts + 1,), jnp.float32).at[flat].add(1.0)[:num_experts]


def _routed_copies(idx_TxK, e_local, p):
  """The M = T*K routed copies: expert id [M], valid mask [M], destination shard [M] (p if invalid).

  A copy is valid when its expert id is in [0, e_local * p) (MoE++ null experts and padding ids are
  not); the experts are split in contiguous blocks of `e_local` per shard of the expert axis.
  """
  flat_e = idx_TxK.reshape(-1)
  valid = (flat_e >= 0) & (flat_e < e_local * p)
  return flat_e, valid, jnp.where(valid, flat_e // e_local, p)


def _dropless_padded(x_TxD, idx_TxK, weights, ops, p, axis):
  """dispatch -> expert_ffn -> return for "padded": worst-case [P, M, D] buffers, M = T_l*K."""
  t, k = idx_TxK.shape
  d = x_TxD.shape[1]
  m = t * k
  e_local = weights[0].shape[0]
  flat_e, valid, dest_M = _routed_copies(idx_TxK, e_local, p)
  onehot_MxP = jax.nn.one_hot(dest_M, p, dtype=jnp.int32)
  pos_M = jnp.sum((jnp.cumsum(onehot_MxP, axis=0) - onehot_MxP) * onehot_MxP, axis=-1)
  x_M = jnp.take(x_TxD, jnp.arange(m) // k, axis=0)
  send_x = jnp.zeros((p, m, d), x_TxD.dtype).at[dest_M, pos_M].set(x_M, mode="drop")
  send_e = jnp.full((p, m), e_local, jnp.int32).at[dest_M, pos_M].set(
      (flat_e % e_local).astype(jnp.int32), mode="drop")
  with jax.named_scope("ep_dispatch"):
    recv_x = jax.lax.all_to_all(send_x, axis, 0, 0).reshape(p * m, d)
    recv_e = jax.lax.all_to_all(send_e, axis, 0, 0).reshape(p * m, 1)
  with jax.named_scope("ep_expert_ffn"):
    y_recv = dispatch.dropless(recv_x, recv_e, jnp.ones(recv_e.shape, jnp.float32), *weights, ops)
  with jax.named_scope("ep_return"):
    back = jax.lax.all_to_all(y_recv.reshape(p, m, d), axis, 0, 0)
  y_M = back[jnp.clip(dest_M, 0, p - 1), pos_M]
  return jnp.where(valid[:, None], y_M, 0).reshape(t, k, d)


def _dropless_ragged(x_TxD, idx_TxK, weights, ops, p, axis, exchange_fn):
  """dispatch -> expert_ffn -> return with ragged all-to-all (only routed rows are exchanged)."""
  t, k = idx_TxK.shape
  d = x_TxD.shape[1]
  m = t * k
  e_local = weights[0].shape[0]
  flat_e, valid, dest = _routed_copies(idx_TxK, e_local, p)
  order_M = jnp.argsort(jnp.where(valid, flat_e, e_local * p), stable=True)
  sorted_e = jnp.take(flat_e, order_M)
  x_sorted = jnp.take(x_TxD, order_M // k, axis=0)
  send_P = jnp.bincount(dest, length=p + 1)[:p].astype(jnp.int32)
  in_off_P = (jnp.cumsum(send_P) - send_P).astype(jnp.int32)
  counts_PxP = jax.lax.all_gather(send_P, axis)            # [src, dst]
  me = jax.lax.axis_index(axis)
  src_before = (jnp.arange(p) < me).astype(jnp.int32)
  out_off_P = jnp.sum(counts_PxP * src_before[:, None], axis=0).astype(jnp.int32)
  recv_P = counts_PxP[:, me].astype(jnp.int32)
  recv_off_P = (jnp.cumsum(recv_P) - recv_P).astype(jnp.int32)
  # Where my chunk starts in each source's send buffer = that source's input offset for me.
  src_in_off_P = (jnp.cumsum(counts_PxP, axis=1) - counts_PxP)[:, me].astype(jnp.int32)
  local_e = jnp.where(jnp.arange(m) < jnp.sum(send_P), sorted_e % e_local, e_local).astype(jnp.int32)
  with jax.named_scope("ep_dispatch"):
    recv_x = _ragged(exchange_fn, x_sorted, jnp.zeros((p * m, d), x_TxD.dtype), in_off_P, send_P,
                     out_off_P, recv_P, axis, p)
    recv_e = _ragged(exchange_fn, local_e, jnp.full((p * m,), e_local, jnp.int32), in_off_P,
                     send_P, out_off_P, recv_P, axis, p)
  with jax.named_scope("ep_expert_ffn"):
    y_recv = dispatch.dropless(recv_x, recv_e[:, None], jnp.ones((p * m, 1), jnp.float32),
                               *weights, ops)
  with jax.named_scope("ep_return"):
    back_sorted = _ragged(exchange_fn, y_recv, jnp.zeros((m, d), y_recv.dtype), recv_off_P, recv_P,
                          src_in_off_P, send_P, axis, p)
  y_M = jnp.zeros((m, d), y_recv.dtype).at[order_M].set(back_sorted)
  return jnp.where(valid[:, None], y_M, 0).reshape(t, k, d)


def _capacity(x_TxD, idx_TxK, weights, capacity, p, axis):
  """GShard capacity dispatch per batch shard; returns (y copies combined later, dropped count)."""
  w_gate, w_up, w_down = weights
  dt = x_TxD.dtype
  e_local = w_gate.shape[0]
  e = e_local * p
  position_TxK, valid_TxK = dispatch.priority_positions(idx_TxK, e)
  keep_TxK = valid_TxK & (position_TxK < capacity)
  expert_TxKxE = jax.nn.one_hot(jnp.where(keep_TxK, idx_TxK, -1), e, dtype=jnp.float32)
  slot_TxKxC = jax.nn.one_hot(position_TxK, capacity, dtype=jnp.float32)
  dispatch_TxExC = jnp.einsum("tke,tkc->tec", expert_TxKxE, slot_TxKxC)
  x_ExCxD = jnp.einsum("tec,td->ecd", dispatch_TxExC.astype(dt), x_TxD,
                       preferred_element_type=jnp.float32).astype(dt)
  c, d = capacity, x_TxD.shape[1]
  with jax.named_scope("ep_dispatch"):
    recv = jax.lax.all_to_all(x_ExCxD.reshape(p, e_local, c, d), axis, 0, 0)   # [src, E_l, C, D]
  with jax.named_scope("ep_expert_ffn"):
    x_local = recv.transpose(1, 0, 2, 3).reshape(e_local, p * c, d)
    gate = jnp.einsum("ecd,edf->ecf", x_local, w_gate, preferred_element_type=jnp.float32)
    up = jnp.einsum("ecd,edf->ecf", x_local, w_up, preferred_element_type=jnp.float32)
    h = (jax.nn.silu(gate) * up).astype(dt)
    out = jnp.einsum("ecf,efd->ecd", h, w_down, preferred_element_type=jnp.float32)
  with jax.named_scope("ep_return"):
    out = out.reshape(e_local, p, c, d).transpose(1, 0, 2, 3)
    back_ExCxD = jax.lax.all_to_all(out, axis, 0, 0).reshape(e, c, d)
  y_TxKxD = jnp.einsum("tke,tkc,ecd->tkd", expert_TxKxE, slot_TxKxC, back_ExCxD)
  dropped = jnp.sum(valid_TxK & ~keep_TxK).astype(jnp.float32)
  return y_TxKxD, dropped


# ----------------------------------------------------------------------------------------------
# Public entry point.
# ----------------------------------------------------------------------------------------------

def ep_experts(x_TxD: jax.Array, idx_TxK: jax.Array, gates_TxK: jax.Array, w_gate_EDF: jax.Array,
               w_up_EDF: jax.Array, w_down_EFD: jax.Array, plan: EPPlan, *, mode: str = "dropless",
               capacity_factor: float = 1.25, impl: str = "xla",
               capacity_fn: Callable[[int], int] | None = None):
  """Routed SwiGLU experts over an expert-parallel mesh (drop-in for `dispatch.dropless/capacity`).

  Args:
    x_TxD, idx_TxK, gates_TxK: global (GSPMD) arrays; tokens are split over `plan.batch_axes`.
      Ids outside [0, E) (MoE++ zero-computation experts, masked-token sentinels) are skipped.
    w_*: global expert weights [E, D, F] / [E, F, D] (split over `plan.expert_axis` inside).
    mode: "dropless" (exchange per `plan.exchange`) or "capacity" (GShard, per-shard groups).
    capacity_fn: per-shard capacity from the shard's token count (default GShard
      `dispatch.expert_capacity(T_l, K, E, capacity_factor)`).
  Returns:
    (y_TxD in x's dtype, dropped_fraction fp32 over the global T*K copies, load_E fp32 global
    copies per FFN expert, psummed over all batch axes).
  """
  mesh, axis = plan.mesh, plan.expert_axis
  sizes = dict(mesh.shape)
  p = sizes.get(axis, 1)
  e = w_gate_EDF.shape[0]
  if e % p:
    raise ValueError(f"expert_parallel: num_experts={e} is not divisible by the {axis!r} mesh axis "
                     f"of size {p}")
  shards = math.prod(sizes[a] for a in plan.batch_axes)
  t, k = idx_TxK.shape
  if t % shards:
    raise ValueError(f"expert_parallel: {t} tokens cannot be split over the batch axes "
                     f"{plan.batch_axes} ({shards} shards)")
  exchange = _resolve_exchange(mode, plan.exchange)
  ops = get_ops(impl)
  batch_spec = P(plan.batch_axes or None, None)
  w_spec = P(axis, None, None)
  reduce_axes = tuple(plan.batch_axes)
  capacity = None
  if exchange == "capacity":
    t_local = t // shards
    capacity = (capacity_fn(t_local) if capacity_fn is not None
                else dispatch.expert_capacity(t_local, k, e, capacity_factor))
  exchange_fn = (_real_ragged if jax.default_backend() != "cpu" else ragged_all_to_all_emulated)

  def body(x, idx, gates, w_gate, w_up, w_down):
    dt = x.dtype
    weights = (w_gate.astype(dt), w_up.astype(dt), w_down.astype(dt))
    dropped = jnp.zeros((), jnp.float32)
    if exchange == "capacity":
      y_copies, dropped = _capacity(x, idx, weights, capacity, p, axis)
    elif exchange == "padded":
      y_copies = _dropless_padded(x, idx, weights, ops, p, axis)
    else:
      y_copies = _dropless_ragged(x, idx, weights, ops, p, axis, exchange_fn)
    y = _combine(y_copies, jnp.where(idx < e, gates, 0.0), dt)
    load = _local_load(idx, e)
    n_copies = jnp.asarray(idx.size, jnp.float32)
    if reduce_axes:
      load, dropped, n_copies = jax.lax.psum((load, dropped, n_copies), reduce_axes)
    return y, dropped / n_copies, load

  fn = _shard_map(body, mesh=mesh, in_specs=(batch_spec, batch_spec, batch_spec, w_spec, w_spec,
                                             w_spec), out_specs=(batch_spec, P(), P()))
  return fn(x_TxD, idx_TxK, gates_TxK, w_gate_EDF, w_up_EDF, w_down_EFD)


def expert_axis_size(mesh: Mesh, axis: str = "expert") -> int:
  return int(dict(mesh.shape).get(axis, 1))


def ep_specs(axes: Sequence[str]) -> P:  # convenience for callers building shard_map specs
  return P(*axes)
