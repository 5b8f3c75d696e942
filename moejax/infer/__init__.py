"""moejax.infer: batched KV-cache generation (prefill + decode) with greedy / top-k / top-p sampling.

    results = moejax.infer.generate(model, tokenizer, ["def add(a, b):"], max_new_tokens=32,
                                    stop=["\\ndef"])
    results[0].text, results[0].ttft_s, results[0].token_latencies_s

Decoding runs on the device in `jax.lax.while_loop` chunks by default (`device_loop=True`); pass
`device_loop=False` for one jitted call per token with host-measured per-token latencies (what
`moejax.evals.throughput` uses through `Engine.run_batch`). Both give the same tokens.
"""

from __future__ import annotations

import os
import weakref
from typing import Sequence

from moejax.infer.engine import BatchStats, Engine, Generation, bucket_length
from moejax.infer.sampling import SamplingParams

__all__ = ["BatchStats", "Engine", "Generation", "SamplingParams", "bucket_length", "generate",
           "load_tokenizer"]

_ENGINES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def load_tokenizer(path_or_tokenizer):
  """A `tokenizers.Tokenizer` from itself, a tokenizer.json path, or a run dir holding one."""
  if path_or_tokenizer is None or not isinstance(path_or_tokenizer, (str, os.PathLike)):
    return path_or_tokenizer
  from tokenizers import Tokenizer  # pylint: disable=import-outside-toplevel
  path = os.fspath(path_or_tokenizer)
  if os.path.isdir(path):
    path = os.path.join(path, "tokenizer.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"tokenizer: {path!r} does not exist (expected a tokenizer.json or a "
                            "run directory holding one)")
  try:
    return Tokenizer.from_file(path)
  except Exception as e:  # tokenizers raises a bare Exception on malformed JSON.
    raise ValueError(f"tokenizer: {path!r} is not a valid tokenizers JSON file ({e})") from None


def generate(model, tokenizer, prompts: Sequence, *, batch_size: int = 8, **opts) -> list[Generation]:
  """Generations for `prompts` (strings or token-id lists) with `model` (a moejax Transformer).

  `tokenizer`: a `tokenizers.Tokenizer`, a tokenizer.json path or a run directory. `opts` are those
  of `Engine.generate`: max_new_tokens, temperature (0 = greedy), top_k, top_p, seed, stop,
  ignore_eos, device_loop. Compiled steps are cached per (model, tokenizer, batch_size) across
  calls.
  """
  tok = load_tokenizer(tokenizer)
  per_model = _ENGINES.setdefault(model, {})
  key = (id(tok), batch_size)
  engine = per_model.get(key)
  if engine is None or engine.tokenizer is not tok:
    engine = per_model[key] = Engine(model, tok, batch_size=batch_size)
  return engine.generate(prompts, **opts)
