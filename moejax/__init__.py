"""moejax: a JAX research framework for Mixture-of-Experts language models.

Dimension legend used in names throughout (`router_logits_TxE`, `w_in_EDF`):
  B batch, L length, T tokens (B*L), D d_model, H query heads, G kv heads, Dh head dim,
  F FFN hidden, E experts, K top-k, C expert capacity, V vocab, S cache slots.
"""

__version__ = "0.1.0"


def load(path: str, step: int | None = None):
  """`model, config = moejax.load(W)`: latest checkpoint of a run dir (or a checkpoint dir).

  `model(tokens_BxL)` maps int32 tokens to fp32 logits `[B, L, V]`; `config` is the run's ConfigDict.
  """
  from moejax.train.checkpoint import load as _load  # pylint: disable=g-import-not-at-top
  return _load(path, step)
