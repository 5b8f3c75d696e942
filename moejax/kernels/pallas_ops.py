"""The Pallas implementation behind `moejax.kernels.get_ops('pallas')`.

Same call signatures as `moejax.kernels.xla`: `gmm(lhs_MxK, rhs_ExKxN, group_sizes_E)`,
`permute(x_TxD, expert_idx_TxK, num_groups)`, `unpermute(y_sorted_MxD, sort_order_M, gates_TxK)`;
plus `route` = `router.fused_route` (scores, top-k, gates and balance statistics in one kernel).
On CPU the kernels run in Pallas interpret mode (correct but slow: for tests only).
"""

from __future__ import annotations

import types

from moejax.kernels import gmm as gmm_lib
from moejax.kernels import permute as permute_lib
from moejax.kernels import router as router_lib


def ops() -> types.SimpleNamespace:
  return types.SimpleNamespace(name="pallas", gmm=gmm_lib.gmm, tgmm=gmm_lib.tgmm,
                               permute=permute_lib.permute, unpermute=permute_lib.unpermute,
                               route=router_lib.fused_route)
