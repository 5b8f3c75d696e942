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


def generate(model, config_or_tokenizer, prompts, **opts):
  """`moejax.generate(model, config, prompts, max_new_tokens=..., temperature=0, ...)`.

  Batched KV-cache generation (`moejax.infer.generate`) from a trained or converted model.
  `config_or_tokenizer`: the run's ConfigDict (its `data.tokenizer` names the tokenizer.json; set by
  `moejax.convert`), a `tokenizers.Tokenizer`, a tokenizer.json path or a run directory.
  """
  from moejax.infer import generate as _generate  # pylint: disable=g-import-not-at-top
  tok = config_or_tokenizer
  data = getattr(tok, "data", None) if not hasattr(tok, "encode") else None
  if data is not None and "tokenizer" in data:
    if not data.tokenizer:
      raise ValueError("moejax.generate: config.data.tokenizer is empty (the run trained its own "
                       "BPE): pass the run directory or its tokenizer.json instead of the config")
    tok = data.tokenizer
  return _generate(model, tok, prompts, **opts)
