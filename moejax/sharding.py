"""Logical axis names -> mesh axes, and activation sharding constraints.

Model code annotates parameters with `nnx.Param(value, axes=("embed", "mlp"))` and activations with
`constrain(x, ("batch", "length", "embed"))`. Neither refers to a mesh: the mapping from logical
names to mesh axes is one short rules table held in config and activated with `use_rules(...)`.
Outside `use_rules` (single device, tests) `constrain` is the identity.

Logical names: batch, length, embed, mlp, heads, kv_heads, head_dim, expert, vocab.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

LogicalAxes = Sequence[str | None]
Rules = Sequence[tuple[str, str | tuple[str, ...] | None]]

_ACTIVE: contextvars.ContextVar[tuple[Mesh, dict] | None] = contextvars.ContextVar(
    "moejax_logical_rules", default=None)


def logical_to_spec(axes: LogicalAxes, rules: Rules) -> PartitionSpec:
  """Maps logical axis names to a PartitionSpec; a mesh axis is used at most once."""
  table = dict(rules)
  used: set[str] = set()
  spec = []
  for name in axes:
    target = table.get(name) if name is not None else None
    if target is None:
      spec.append(None)
      continue
    targets = (target,) if isinstance(target, str) else tuple(target)
    targets = tuple(t for t in targets if t not in used)
    used.update(targets)
    spec.append(targets[0] if len(targets) == 1 else (targets or None))
  return PartitionSpec(*spec)


@contextlib.contextmanager
def use_rules(mesh: Mesh, rules: Rules) -> Iterator[None]:
  token = _ACTIVE.set((mesh, dict(rules)))
  try:
    yield
  finally:
    _ACTIVE.reset(token)


def active() -> tuple[Mesh, dict] | None:
  return _ACTIVE.get()


def constrain(x: jax.Array, axes: LogicalAxes) -> jax.Array:
  """`with_sharding_constraint` by logical names; identity when no rules are active."""
  ctx = _ACTIVE.get()
  if ctx is None:
    return x
  mesh, rules = ctx
  spec = logical_to_spec(axes, tuple(rules.items()))
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
