"""Canonical-solution NLL: how likely the model finds each benchmark's reference solution.

For a problem with prompt tokens p_1..p_m and reference-solution tokens r_1..r_n, teacher forcing
gives  NLL = -(1/n) sum_j log p(r_j | p_1..p_m, r_<j)  (the per-token cross-entropy of the
solution; prompt tokens are context only). Small models score ~0 pass@1, and this moves long
before pass@1 does. The benchmark value is the token-weighted mean over all problems'
solution tokens (`nll`); the mean of per-problem means is reported as `nll_problem_mean`.

Prompt and reference are tokenized separately and concatenated, so the boundary is exact. A pair
longer than the context keeps the end of its prompt (and, if the reference alone does not fit,
the start of the reference). Rows are right-padded (segment id 0) to power-of-two buckets, so the
jitted forward compiles once per bucket.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moejax.infer.engine import bucket_length


@dataclasses.dataclass(frozen=True)
class NLLResult:
  nll: float                # token-weighted mean over all reference tokens
  nll_problem_mean: float   # mean over problems of the per-problem mean
  n_tokens: int
  n_problems: int
  per_problem: tuple[float, ...]


@nnx.jit
def _token_nll(model, tokens_BxL, segment_ids_BxL, target_mask_BxL):
  """Sum of -log p(token_{t+1} | tokens_<=t) over masked targets, and their count, per row."""
  logits_BxLxV, _, _ = model.forward(tokens_BxL, segment_ids_BxL=segment_ids_BxL)
  logp_BxLxV = jax.nn.log_softmax(logits_BxLxV[:, :-1].astype(jnp.float32), axis=-1)
  targets_BxL = tokens_BxL[:, 1:]
  nll_BxL = -jnp.take_along_axis(logp_BxLxV, targets_BxL[..., None], axis=-1)[..., 0]
  mask = target_mask_BxL[:, 1:]
  return jnp.sum(jnp.where(mask, nll_BxL, 0.0), axis=-1), jnp.sum(mask, axis=-1)


def _fit(prompt: list[int], ref: list[int], max_len: int) -> tuple[list[int], list[int]]:
  if not ref:
    return prompt, ref
  ref = ref[:max_len - 1]
  keep = max_len - len(ref)
  return (prompt[-keep:] if prompt else []), ref


def sequence_nll(model, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], *,
                 batch_size: int = 8, min_bucket: int = 32) -> list[tuple[float, int]]:
  """(summed NLL of the reference tokens, their count) for each (prompt_ids, reference_ids).

  The first token of a sequence has no context, so a pair with an empty prompt does not count its
  first reference token.
  """
  max_len = model.cfg.max_seq_len
  fitted = [_fit(list(p), list(r), max_len) for p, r in pairs]
  order = sorted(range(len(fitted)), key=lambda i: len(fitted[i][0]) + len(fitted[i][1]))
  out: list[tuple[float, int]] = [(0.0, 0)] * len(fitted)
  for start in range(0, len(order), batch_size):
    chunk = order[start:start + batch_size]
    longest = max(len(fitted[i][0]) + len(fitted[i][1]) for i in chunk)
    width = max(2, min(bucket_length(longest, min_bucket), max_len))
    tokens = np.zeros((batch_size, width), np.int32)
    segments = np.zeros((batch_size, width), np.int32)
    target = np.zeros((batch_size, width), bool)
    for row, i in enumerate(chunk):
      p, r = fitted[i]
      seq = p + r
      tokens[row, :len(seq)] = seq
      segments[row, :len(seq)] = 1
      target[row, max(len(p), 1):len(seq)] = True
    sums, counts = _token_nll(model, jnp.asarray(tokens), jnp.asarray(segments), jnp.asarray(target))
    sums, counts = np.asarray(sums), np.asarray(counts)
    for row, i in enumerate(chunk):
      out[i] = (float(sums[row]), int(counts[row]))
  return out


def reference_nll(model, tokenizer, pairs: Sequence[tuple[str, str]], *,
                  batch_size: int = 8) -> NLLResult:
  """Canonical-solution NLL of (prompt, reference) text pairs (e.g. `benchmarks.reference_pairs`)."""
  if not pairs:
    raise ValueError("reference_nll: no (prompt, reference) pairs")
  encode = lambda s: list(tokenizer.encode(s, add_special_tokens=False).ids)  # noqa: E731
  ids = [(encode(p), encode(r)) for p, r in pairs]
  results = sequence_nll(model, ids, batch_size=batch_size)
  counted = [(s, n) for s, n in results if n > 0]
  if not counted:
    raise ValueError("reference_nll: every reference solution is empty")
  total, n_tok = sum(s for s, _ in counted), sum(n for _, n in counted)
  per_problem = tuple(s / n for s, n in counted)
  return NLLResult(nll=total / n_tok, nll_problem_mean=float(np.mean(per_problem)),
                   n_tokens=n_tok, n_problems=len(counted), per_problem=per_problem)
