"""Batched generation with a KV cache: one jitted prefill, then one jitted decode step per token.

Prompts are LEFT-padded to a power-of-two length bucket (at least `min_bucket`), so every prompt of a
bucket reuses the same compiled prefill and decode step. Padding carries segment id 0 (it attends to
nothing and is ignored by the MoE router statistics, see `moejax.model.attention`) and positions are
counted from each row's first real token, so padding does not change a row's logits. The cache has
a power-of-two number of slots >= bucket + max_new_tokens (capped at `model.cfg.max_seq_len`). The
last partial batch is filled with inactive dummy rows, so the batch dimension never changes either.

Decoding is autoregressive (Vaswani et al., arXiv 1706.03762, Sec. 3): token t+1 ~ p(. | x_<=t) with
keys/values of earlier positions cached. A row stops at EOS, at a stop sequence (its text is cut
before it) or at `max_new_tokens`, and then is fed as padding (segment 0). Two decode loops
(`moejax.infer.steps`):
  host    (`run_batch(device_loop=False)`, the default there) one jitted step per token; the host
          reads every step's tokens back: true per-token latencies, stop sequences checked after
          every token. The eval worker's throughput measurement uses this.
  device  (`device_loop=True`, the default of `generate`) `loop_chunk` steps per call in one
          `jax.lax.while_loop` that ends early once every row has hit EOS; stop sequences are
          checked on the host between chunks. The tokens are the same as the host loop's; a row that
          hits a stop sequence keeps decoding (discarded) until its chunk ends, which can change
          other rows only through capacity-limited MoE dispatch. Per-token latencies are the
          chunk's time divided by its steps.
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

from moejax.infer import sampling, steps as steps_lib


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
  step_s: list[float]                 # per decode step (device loop: its chunk's time / steps)
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
_TRACES = steps_lib.TRACES
_JITTED = steps_lib.JITTED


class Engine:
  """Generation engine for one `Transformer`; reads the model's current parameters on every call.

  `trace_counts["prefill"|"decode"|"loop"]` counts the traces (= compilations) this engine caused;
  `compile_s[key]` is the lower+compile time of each (kind, batch, bucket, cache) shape it used.
  `loop_chunk` is the number of decode steps per device-loop call.
  """

  loop_chunk: int = 64

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
    self._local: dict[tuple, tuple] = {}

  def _executable(self, kind: str, key: tuple, args: tuple, avals: tuple):
    """AOT-compiled step for a shape key, compiled (and timed) once per model graph and shape.

    `avals` = `_avals(state)` of args[0], computed once per batch by the caller. The lookup runs
    between timed decode steps, so this engine memoises it by (kind, avals, key): the shared
    cache's key holds the graphdef, whose hash and equality walk the whole graph (~ms).
    """
    local_key = (kind, avals) + key
    if local_key not in self._local:
      full_key = (kind, self.graphdef, avals) + key
      if full_key not in _EXECUTABLES:
        before = _TRACES[kind]
        t0 = time.perf_counter()
        _EXECUTABLES[full_key] = _JITTED[kind].lower(self.graphdef, *args).compile()
        _COMPILE_S[full_key] = time.perf_counter() - t0
        self.trace_counts[kind] += _TRACES[kind] - before
      self._local[local_key] = (_EXECUTABLES[full_key], _COMPILE_S[full_key])
    executable, self.compile_s[(kind,) + key] = self._local[local_key]
    return executable

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
                device_loop: bool = False) -> tuple[list[Generation], BatchStats]:
    """Generates for at most `batch_size` prompts (token ids) in one batch.

    device_loop: decode `loop_chunk` steps per call in an on-device while loop instead of one call
    per token (see the module docstring; same tokens, averaged per-token latencies).
    """
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
    avals = _avals(state)
    prefill = self._executable("prefill", shape_key, args, avals)
    t0 = time.perf_counter()
    next_B, cache = prefill(*args)
    host = np.asarray(next_B)
    t_prev = time.perf_counter()
    stats = BatchStats(b, n, bucket, cache_len, int(lengths.sum()), t_prev - t0, [], [], shape_key)

    out = [Generation(prompt_tokens=p, tokens=[], text="", finish_reason="", ttft_s=t_prev - t0,
                      token_latencies_s=[], truncated_prompt=t) for p, t in zip(prompts, truncated)]
    active = np.arange(b) < n
    self._consume(out, host, active, stop, ignore_eos)
    run = dict(state=state, avals=avals, cache=cache, next_B=next_B, pos=lengths.copy(), active=active,
               seed_key=seed_key, rows=jnp.asarray(rows), knobs=knobs, shape_key=shape_key,
               stop=stop, ignore_eos=ignore_eos, collect_experts=collect_experts, t_prev=t_prev)
    (self._device_decode if device_loop else self._host_decode)(out, stats, steps, run)
    for i in np.flatnonzero(active[:n]):
      out[i].finish_reason = "length"
      out[i].text = _cut_at_stop(self.decode(out[i].tokens), stop)[0]
    return out, stats

  def _host_decode(self, out, stats: BatchStats, steps: int, run: dict) -> None:
    """Decode steps 1 .. steps-1, one jitted call per token (updates `out`, `stats`, `run`)."""
    active, pos, next_B, cache = run["active"], run["pos"], run["next_B"], run["cache"]
    decode = None
    for step in range(1, steps):
      if not active.any():
        break
      args = (run["state"], cache, next_B, jnp.asarray(pos), jnp.asarray(active),
              jnp.asarray(step, jnp.int32), run["seed_key"], run["rows"]) + run["knobs"]
      if decode is None:  # once per batch (memoised per engine: see `_executable`).
        decode = self._executable("decode", run["shape_key"], args, run["avals"])
      next_B, cache, experts_L = decode(*args)
      host = np.asarray(next_B)
      now = time.perf_counter()
      self._record(out, stats, active, [now - run["t_prev"]],
                   [np.asarray(experts_L)] if run["collect_experts"] else [])
      run["t_prev"] = now
      pos += 1
      self._consume(out, host, active, run["stop"], run["ignore_eos"])

  def _device_decode(self, out, stats: BatchStats, steps: int, run: dict) -> None:
    """Decode steps 1 .. steps-1 in on-device loops of `loop_chunk` steps; between chunks the host
    consumes the tokens step by step (EOS, stop sequences) exactly as `_host_decode` does."""
    b = self.batch_size
    active, next_B, cache = run["active"], run["next_B"], run["cache"]
    pos_B = jnp.asarray(run["pos"])
    eos = sorted(self.eos_ids)
    eos_N = np.full((max(8, 1 << max(len(eos) - 1, 0).bit_length()),), -1, np.int32)
    eos_N[:len(eos)] = eos
    _, bucket, cache_len = run["shape_key"]
    chunk = max(1, min(int(self.loop_chunk), cache_len - bucket))  # fixed per shape: no retrace
    buffer = jnp.zeros((b, chunk), jnp.int32)
    step, loop = 1, None
    while step < steps and active.any():
      args = (run["state"], cache, next_B, pos_B, jnp.asarray(active), jnp.asarray(step, jnp.int32),
              jnp.asarray(steps - step, jnp.int32), run["seed_key"], run["rows"]) + run["knobs"] + (
                  jnp.asarray(eos_N), jnp.asarray(run["ignore_eos"]), buffer)
      if loop is None:
        loop = self._executable("loop", run["shape_key"] + (chunk,), args, run["avals"])
      tokens_BxC, done, experts_CxL, cache, next_B, pos_B, _ = loop(*args)
      tokens_BxC, done = np.asarray(tokens_BxC), int(done)
      now = time.perf_counter()
      experts = list(np.asarray(experts_CxL)[:done]) if run["collect_experts"] else []
      for i in range(done):
        if not active.any():
          break
        self._record(out, stats, active, [(now - run["t_prev"]) / done],
                     experts[i:i + 1])
        self._consume(out, tokens_BxC[:, i], active, run["stop"], run["ignore_eos"])
      run["t_prev"] = now
      step += done

  @staticmethod
  def _record(out, stats: BatchStats, active, step_s: list, experts: list) -> None:
    stats.step_s.extend(step_s)
    stats.experts_per_step.extend(experts)
    for i in np.flatnonzero(active):
      out[i].token_latencies_s.extend(step_s)

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
               ignore_eos: bool = False, device_loop: bool = True) -> list[Generation]:
    """Generations for `prompts` (strings or token id lists), in input order.

    Requests are sorted by prompt length and batched `batch_size` at a time (less padding); a
    request's samples depend on (seed, its index in `prompts`, step) only. `device_loop`: see
    `run_batch` (False: one call per token, per-token latencies measured on the host).
    """
    params = sampling.SamplingParams(temperature, top_k, top_p, seed)
    ids = [self.encode(p) for p in prompts]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    results: list[Generation | None] = [None] * len(ids)
    for start in range(0, len(order), self.batch_size):
      chunk = order[start:start + self.batch_size]
      gens, _ = self.run_batch([ids[i] for i in chunk], chunk, max_new_tokens=max_new_tokens,
                               params=params, stop=stop, ignore_eos=ignore_eos,
                               device_loop=device_loop)
      for i, g in zip(chunk, gens):
        results[i] = g
    return results  # type: ignore[return-value]


def _avals(state) -> tuple:
  """(shape, dtype) of every leaf of the model state: with the graphdef, what a compiled step is
  specialised to."""
  return tuple((x.shape, str(x.dtype)) for x in jax.tree.leaves(state))


def _cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
  """text before the earliest stop sequence, and whether one occurred."""
  cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=-1)
  return (text[:cut], True) if cut >= 0 else (text, False)
