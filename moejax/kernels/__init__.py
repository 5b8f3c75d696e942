"""MoE hot-path ops behind one interface: `get_ops(impl)` returns an object with
`gmm(lhs_MxK, rhs_ExKxN, group_sizes_E)`, `permute(x_TxD, expert_idx_TxK, num_groups)` and
`unpermute(y_sorted_MxD, sort_order_M, gates_TxK)`; the XLA ops add
`expert_swiglu(x_sorted_MxD, w_gate_EDF, w_up_EDF, w_down_EFD, group_sizes_E)` (the three expert
matmuls of dropless dispatch fused per row tile on CPU). `impl='xla'` is the reference path (always
available, the test oracle); 'pallas' selects the Pallas kernels; 'auto' picks Pallas on GPU/TPU and
XLA on CPU. The model calls these ops and never changes when the implementation changes.
"""

from __future__ import annotations

import types

import jax

from moejax.kernels import xla


def resolve_impl(impl: str) -> str:
  if impl == "auto":
    return "xla" if jax.default_backend() == "cpu" else "pallas"
  if impl not in ("xla", "pallas"):
    raise ValueError(f"moe.impl={impl!r}: expected one of 'xla', 'pallas', 'auto'")
  return impl


def get_ops(impl: str = "xla") -> types.SimpleNamespace:
  impl = resolve_impl(impl)
  if impl == "xla":
    # permute/unpermute: the gather-only custom VJPs of `moejax.kernels.permute` (same values as
    # `xla.permute`/`xla.unpermute`; autodiff of those would scatter-add in the backward pass).
    from moejax.kernels import permute  # pylint: disable=g-import-not-at-top
    return types.SimpleNamespace(name="xla", gmm=xla.gmm, permute=permute.permute,
                                 unpermute=permute.unpermute, expert_swiglu=xla.expert_swiglu)
  from moejax.kernels import pallas_ops  # pylint: disable=g-import-not-at-top
  return pallas_ops.ops()
