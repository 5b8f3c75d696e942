"""Batched generation with a KV cache: one jitted prefill, then one jitted decode step per token.

Prompts are LEFT-padded to a power-of-two length bucket (at least `min_bucket`), so every prompt of a
bucket reuses the same compiled prefill and decode step. Padding carries segment id 0 (it attends to
nothing and is ignored by the MoE router statistics, see `moejax.model.attention`) and positions are
counted from each row's first real token, so padding does not change a row's logits. The cache has
a power-of-two number of slots >= bucket + max_new_tokens (capped at `model.cfg.max_seq_len`). The
last partial batch is filled with inactive dummy rows, so the batch dimension never changes either.

Decoding is autoregressive (Vaswani et al., arXiv 1706.03762, Sec. 3): token t+1 ~ p(. | x_<=t) with
keys/values of earlier positions cached. The host loop reads each step's tokens back, which gives
per-token latencies and lets stop sequences be checked on decoded text; a row stops at EOS, at a stop
sequence (its text is cut before it) or at `max_new_tokens`, and then is fed as padding (segment 0).
"""

from __future__ import annotations

import collections
import dataclasses
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moejax.infer import sampling


@dataclasses.dataclass
class Generation:
  """One request's result. `tokens` excludes the EOS; `text` is cut before the first stop sequence."""
  prompt_tokens: list[int]
  tokens: list[int]
  text: str
  finish_reason: str                 # "eos" | "stop" | "length"
  ttft_s: float                      # batch start -> first token on the host
  token_latencies_s: list[float]     # one per token after the first (inter-token latency)
  truncated_prompt: bool = False


@dataclasses.dataclass
class BatchStats:
  """Timings of one batch: prefill and every decode step, and MoE experts touched per decode step."""
  batch_size: int
  active_rows: int
  prompt_bucket: int
  cache_len: int
  prompt_tokens: int                 # real (non-padding) prompt tokens
  prefill_s: float
  step_s: list[float]
  experts_per_step: list[np.ndarray]  # per decode step: [num_moe_layers] unique FFN experts used
  compile_key: tuple


def bucket_length(n: int, minimum: int = 16) -> int:
  """Smallest power of two >= max(n, minimum)."""
  n = max(int(n), int(minimum), 1)
  return 1 << (n - 1).bit_length()


# Compiled steps are shared by every Engine whose model has the same graph (same config): a new
# checkpoint of a run, or a second engine on the same model, reuses them.
_EXECUTABLES: dict[tuple, Any] = {}
_COMPILE_S: dict[tuple, float] = {}
_TRACES: collections.Counter = collections.Counter()


def _prefill_fn(graphdef, state, cache, tokens_BxL, segment_ids_BxL, positions_BxL, seed_key,
                row_ids_B, temperature, top_k, top_p):
  _TRACES["prefill"] += 1  # Python side effect: runs once per trace.
  model = nnx.merge(graphdef, state)
  logits_BxLxV, _, cache = model.forward(tokens_BxL, positions_BxL=positions_BxL,
                                         segment_ids_BxL=segment_ids_BxL, cache=cache)
  keys_B = sampling.row_keys(seed_key, jnp.zeros((), jnp.int32), row_ids_B)
  next_B = sampling.sample(logits_BxLxV[:, -1], keys_B, temperature, top_k, top_p)
  return next_B, cache


def _decode_fn(graphdef, state, cache, tokens_B, positions_B, active_B, step, seed_key, row_ids_B,
               temperature, top_k, top_p):
  _TRACES["decode"] += 1
  model = nnx.merge(graphdef, state)
  logits_Bx1xV, aux, cache = model.forward(
      tokens_B[:, None], positions_BxL=positions_B[:, None],
      segment_ids_BxL=active_B.astype(jnp.int32)[:, None], cache=cache)
  keys_B = sampling.row_keys(seed_key, step, row_ids_B)
  next_B = sampling.sample(logits_Bx1xV[:, 0], keys_B, temperature, top_k, top_p)
  if "tokens_per_expert" in aux:  # [num_moe_layers, E_routed]; count FFN experts only.
    load_LxE = aux["tokens_per_expert"][:, :model.cfg.num_experts]
    experts_L = jnp.sum(load_LxE > 0, axis=-1).astype(jnp.int32)
  else:
    experts_L = jnp.zeros((0,), jnp.int32)
  return next_B, cache, experts_L


_JITTED = {"prefill": jax.jit(_prefill_fn, static_argnums=0, donate_argnums=2),
           "decode": jax.jit(_decode_fn, static_argnums=0, donate_argnums=2)}


class Engine:
  """Generation engine for one `Transformer`; reads the model's current parameters on every call.

  `trace_counts["prefill"|"decode"]` counts the traces (= compilations) this engine caused;
  `compile_s[key]` is the lower+compile time of each (kind, batch, bucket, cache) shape it used.
  """

  def __init__(self, model, tokenizer=None, *, batch_size: int = 8, min_bucket: int = 16,
               max_len: int | None = None, eos_ids: Sequence[int] | None = None,
               pad_id: int | None = None):
    if not hasattr(model, "cfg") or not hasattr(model, "forward"):
      raise TypeError(f"Engine: expected a moejax Transformer, got {type(model).__name__}")
    if batch_size < 1:
      raise ValueError(f"Engine: batch_size={batch_size}: expected an int >= 1")
    self.model = model
    self.cfg = model.cfg
    self.tokenizer = tokenizer
    self.batch_size = int(batch_size)
    self.min_bucket = int(min_bucket)
    self.max_len = int(max_len or self.cfg.max_seq_len)
    if self.max_len > self.cfg.max_seq_len:
      raise ValueError(f"Engine: max_len={self.max_len} exceeds model.max_seq_len="
                       f"{self.cfg.max_seq_len}")
    if eos_ids is None and tokenizer is not None:
      from moejax.data import eos_id  # pylint: disable=import-outside-toplevel
      eos_ids = (eos_id(tokenizer),)
    self.eos_ids = frozenset(int(i) for i in (eos_ids or ()))
    if pad_id is None and tokenizer is not None:
      from moejax.data import pad_id as _pad_id  # pylint: disable=import-outside-toplevel
      pad_id = _pad_id(tokenizer)
    self.pad_id = int(pad_id or 0)
    self.graphdef = nnx.graphdef(model)
    self.trace_counts: collections.Counter = collections.Counter()
    self.compile_s: dict[tuple, float] = {}

  def _executable(self, kind: str, key: tuple, args: tuple):
    """AOT-compiled step for a shape key, compiled (and timed) once per model graph and shape."""
    avals = tuple((x.shape, str(x.dtype)) for x in jax.tree.leaves(args[0]))
    full_key = (kind, self.graphdef, avals) + key
    if full_key not in _EXECUTABLES:
      before = _TRACES[kind]
      t0 = time.perf_counter()
      _EXECUTABLES[full_key] = _JITTED[kind].lower(self.graphdef, *args).compile()
      _COMPILE_S[full_key] = time.perf_counter() - t0
      self.trace_counts[kind] += _TRACES[kind] - before
    self.compile_s[(kind,) + key] = _COMPILE_S[full_key]
    return _EXECUTABLES[full_key]

  # ----- host side -----
  def encode(self, prompt) -> list[int]:
    if isinstance(prompt, str):
      if self.tokenizer is None:
        raise ValueError("Engine: string prompts need a tokenizer (pass one, or token id lists)")
      return list(self.tokenizer.encode(prompt, add_special_tokens=False).ids)
    ids = [int(t) for t in prompt]
    if any(not 0 <= t < self.cfg.vocab_size for t in ids):
      raise ValueError(f"Engine: prompt token ids must be in [0, {self.cfg.vocab_size})")
    return ids

  def decode(self, ids: Sequence[int]) -> str:
    if self.tokenizer is None:
      return ""
    return self.tokenizer.decode(list(ids), skip_special_tokens=True)

  def shapes(self, longest_prompt: int, max_new_tokens: int) -> tuple[int, int, int]:
    """(prompt bucket, cache slots, decode steps) for a batch.

    The last sampled token is never fed back, so the cache needs bucket + max_new_tokens - 1 slots.
    Near `max_len` the bucket is the single top-edge length max_len - (max_new_tokens - 1).
    """
    need = max_new_tokens - 1
    bucket = bucket_length(longest_prompt, self.min_bucket)
    if bucket + need > self.max_len:
      bucket = max(longest_prompt, self.max_len - need)
    cache_len = min(bucket_length(bucket + need, self.min_bucket), self.max_len)
    steps = min(max_new_tokens, cache_len - bucket + 1)
    return bucket, cache_len, steps

  def max_prompt_len(self, max_new_tokens: int) -> int:
    """Longer prompts keep their last tokens (at least half the context stays for the prompt)."""
    return max(1, self.max_len - min(max_new_tokens - 1, self.max_len // 2))

  def run_batch(self, prompt_ids: Sequence[Sequence[int]], row_ids: Sequence[int], *,
                max_new_tokens: int, params: sampling.SamplingParams, stop: Sequence[str] = (),
                ignore_eos: bool = False, collect_experts: bool = False,
                ) -> tuple[list[Generation], BatchStats]:
    """Generates for at most `batch_size` prompts (token ids) in one batch."""
    n, b = len(prompt_ids), self.batch_size
    if not 1 <= n <= b:
      raise ValueError(f"Engine.run_batch: got {n} prompts for batch_size={b}")
    if max_new_tokens < 1:
      raise ValueError(f"max_new_tokens={max_new_tokens}: expected an int >= 1")
    limit = self.max_prompt_len(max_new_tokens)
    truncated = [len(p) > limit for p in prompt_ids]
    prompts = [list(p[-limit:]) for p in prompt_ids]
    if any(len(p) == 0 for p in prompts):
      raise ValueError("Engine: empty prompt (encode at least one token, e.g. a newline)")
    bucket, cache_len, steps = self.shapes(max(len(p) for p in prompts), max_new_tokens)

    tokens = np.full((b, bucket), self.pad_id, np.int32)
    segments = np.zeros((b, bucket), np.int32)
    positions = np.zeros((b, bucket), np.int32)
    lengths = np.zeros((b,), np.int32)
    for i, p in enumerate(prompts):
      tokens[i, bucket - len(p):] = p
      segments[i, bucket - len(p):] = 1
      positions[i, bucket - len(p):] = np.arange(len(p))
      lengths[i] = len(p)
    rows = np.zeros((b,), np.int32)
    rows[:n] = np.asarray(row_ids, np.int32)
    state = nnx.state(self.model)
    seed_key = jax.random.key(params.seed)
    knobs = params.as_arrays()
    cache = self.model.init_cache(b, cache_len)
    shape_key = (b, bucket, cache_len)

    args = (state, cache, jnp.asarray(tokens), jnp.asarray(segments), jnp.asarray(positions),
            seed_key, jnp.asarray(rows)) + knobs
    prefill = self._executable("prefill", shape_key, args)
    t0 = time.perf_counter()
    next_B, cache = prefill(*args)
    host = np.asarray(next_B)
    t_prev = time.perf_counter()
    stats = BatchStats(b, n, bucket, cache_len, int(lengths.sum()), t_prev - t0, [], [], shape_key)

    out = [Generation(prompt_tokens=p, tokens=[], text="", finish_reason="", ttft_s=t_prev - t0,
                      token_latencies_s=[], truncated_prompt=t) for p, t in zip(prompts, truncated)]
    active = np.arange(b) < n
    self._consume(out, host, active, stop, ignore_eos)
    pos = lengths.copy()
    for step in range(1, steps):
      if not active.any():
        break
      args = (state, cache, next_B, jnp.asarray(pos), jnp.asarray(active),
              jnp.asarray(step, jnp.int32), seed_key, jnp.asarray(rows)) + knobs
      decode = self._executable("decode", shape_key, args)
      next_B, cache, experts_L = decode(*args)
      host = np.asarray(next_B)
      now = time.perf_counter()
      stats.step_s.append(now - t_prev)
      if collect_experts:
        stats.experts_per_step.append(np.asarray(experts_L))
      for i in np.flatnonzero(active):
        out[i].token_latencies_s.append(now - t_prev)
      t_prev = now
      pos += 1
      self._consume(out, host, active, stop, ignore_eos)
    for i in np.flatnonzero(active[:n]):
      out[i].finish_reason = "length"
      out[i].text = _cut_at_stop(self.decode(out[i].tokens), stop)[0]
    return out, stats

  def _consume(self, out, host_B, active_B, stop, ignore_eos) -> None:
    """Appends each active row's new token; marks rows done at EOS or a stop sequence (in place)."""
    for i in np.flatnonzero(active_B):
      g, tok = out[i], int(host_B[i])
      if tok in self.eos_ids and not ignore_eos:
        g.finish_reason, g.text = "eos", _cut_at_stop(self.decode(g.tokens), stop)[0]
        active_B[i] = False
        continue
      g.tokens.append(tok)
      if stop:
        text, hit = _cut_at_stop(self.decode(g.tokens), stop)
        if hit:
          g.finish_reason, g.text = "stop", text
          active_B[i] = False

  def generate(self, prompts: Sequence, *, max_new_tokens: int = 64, temperature: float = 0.0,
               top_k: int = 0, top_p: float = 1.0, seed: int = 0, stop: Sequence[str] = (),
               ignore_eos: bool = False) -> list[Generation]:
    """Generations for `prompts` (strings or token id lists), in input order.

    Requests are sorted by prompt length and batched `batch_size` at a time (less padding); a
    request's samples depend on (seed, its index in `prompts`, step) only.
    """
    params = sampling.SamplingParams(temperature, top_k, top_p, seed)
    ids = [self.encode(p) for p in prompts]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    results: list[Generation | None] = [None] * len(ids)
    for start in range(0, len(order), self.batch_size):
      chunk = order[start:start + self.batch_size]
      gens, _ = self.run_batch([ids[i] for i in chunk], chunk, max_new_tokens=max_new_tokens,
                               params=params, stop=stop, ignore_eos=ignore_eos)
      for i, g in zip(chunk, gens):
        results[i] = g
    return results  # type: ignore[return-value]


def _cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
  """text before the earliest stop sequence, and whether one occurred."""
  cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=-1)
  return (text[:cut], True) if cut >= 0 else (text, False)
