"""Serving speed of a checkpoint: prefill and decode throughput, TTFT, inter-token latency, experts.

For each batch size B the engine (`moejax.infer.Engine`) runs B synthetic prompts of
`prompt_len` random tokens and decodes exactly `new_tokens` tokens per row (EOS ignored), greedy.
The first run of a shape compiles and warms up; its lower+compile time is reported as `compile_s`
and excluded from every other number, which come from `repeats` further runs:

  prefill_tokens_per_sec = B * prompt_len / prefill time       (prefill time = TTFT of the batch)
  decode_tokens_per_sec  = B * (new_tokens - 1) / sum of decode step times
  ttft_ms                = mean prefill time (prompt in -> first token on the host)
  itl_ms_p50 / p95       = percentiles of decode step times (one token for every row per step)

For MoE models `unique_experts_per_step` is the number of distinct FFN experts that receive at least
one token in a decode step, averaged over steps and MoE layers: the expert weights a decode step has
to read from memory ("expert explosion" under batching, DES arXiv 2602.00879 Sec. 3, expected
E (1 - (1 - K/E)^B) under uniform routing). `None` for dense models.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from moejax.infer import Engine, SamplingParams


@dataclasses.dataclass(frozen=True)
class ThroughputRow:
  batch_size: int
  prompt_len: int
  new_tokens: int
  prefill_tokens_per_sec: float
  decode_tokens_per_sec: float
  ttft_ms: float
  itl_ms_p50: float
  itl_ms_p95: float
  compile_s: float
  unique_experts_per_step: float | None
  repeats: int

  def as_dict(self) -> dict:
    return dataclasses.asdict(self)


def measure(model, *, batch_sizes: Sequence[int] = (1, 8, 32), prompt_len: int = 128,
            new_tokens: int = 64, repeats: int = 3, seed: int = 0, pad_id: int = 0,
            ) -> list[ThroughputRow]:
  """One `ThroughputRow` per batch size (see the module docstring for the definitions)."""
  if new_tokens < 2:
    raise ValueError(f"throughput.new_tokens={new_tokens}: expected >= 2 (one prefill token and at "
                     "least one decode step)")
  if prompt_len < 1 or repeats < 1:
    raise ValueError(f"throughput: prompt_len={prompt_len} and repeats={repeats} must be >= 1")
  cfg = model.cfg
  if prompt_len + new_tokens > cfg.max_seq_len:
    raise ValueError(f"throughput: prompt_len + new_tokens = {prompt_len + new_tokens} exceeds "
                     f"model.max_seq_len={cfg.max_seq_len}")
  rng = np.random.default_rng(seed)
  low = 2 if cfg.vocab_size > 2 else 0
  params = SamplingParams()  # greedy
  rows = []
  for b in batch_sizes:
    if b < 1:
      raise ValueError(f"throughput.batch_sizes: {b} is not a positive batch size")
    engine = Engine(model, None, batch_size=b, min_bucket=prompt_len, eos_ids=(), pad_id=pad_id)
    prompts = rng.integers(low, cfg.vocab_size, size=(b, prompt_len)).tolist()
    run = lambda: engine.run_batch(prompts, list(range(b)), max_new_tokens=new_tokens,  # noqa: E731
                                   params=params, ignore_eos=True, collect_experts=True)[1]
    first = run()  # compiles + warms up
    compile_s = sum(s for k, s in engine.compile_s.items() if k[1:] == first.compile_key)
    prefill_s, steps_s, experts = [], [], []
    for _ in range(repeats):
      stats = run()
      prefill_s.append(stats.prefill_s)
      steps_s.extend(stats.step_s)
      experts.extend(stats.experts_per_step)
    steps = np.asarray(steps_s)
    tokens = b * prompt_len
    unique = None
    if experts and experts[0].size:
      unique = float(np.mean(np.stack(experts)))
    rows.append(ThroughputRow(
        batch_size=b, prompt_len=prompt_len, new_tokens=new_tokens,
        prefill_tokens_per_sec=tokens / float(np.mean(prefill_s)),
        decode_tokens_per_sec=b * steps.size / float(steps.sum()),
        ttft_ms=1e3 * float(np.mean(prefill_s)),
        itl_ms_p50=1e3 * float(np.percentile(steps, 50)),
        itl_ms_p95=1e3 * float(np.percentile(steps, 95)),
        compile_s=float(compile_s), unique_experts_per_step=unique, repeats=repeats))
  return rows


def markdown(rows: Sequence[ThroughputRow]) -> str:
  head = ("| batch | prefill tok/s | decode tok/s | TTFT ms | ITL p50 ms | ITL p95 ms | compile s "
          "| unique experts/step |")
  lines = [head, "|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for r in rows:
    ue = "-" if r.unique_experts_per_step is None else f"{r.unique_experts_per_step:.2f}"
    lines.append(f"| {r.batch_size} | {r.prefill_tokens_per_sec:.0f} | "
                 f"{r.decode_tokens_per_sec:.1f} | {r.ttft_ms:.1f} | {r.itl_ms_p50:.2f} | "
                 f"{r.itl_ms_p95:.2f} | {r.compile_s:.1f} | {ue} |")
  return "\n".join(lines)


def main(argv=None) -> int:
  """python -m moejax.evals.throughput (--workdir W | --config configs/x.py) [--batch_sizes 1,8,32]"""
  import argparse  # pylint: disable=import-outside-toplevel
  p = argparse.ArgumentParser(description="Prefill/decode throughput, TTFT and ITL of a model.")
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument("--workdir", help="a run dir: its latest checkpoint")
  src.add_argument("--config", help="a configs/*.py file: a randomly initialised model (speed only)")
  p.add_argument("--batch_sizes", default="1,8,32")
  p.add_argument("--prompt_len", type=int, default=128)
  p.add_argument("--new_tokens", type=int, default=64)
  p.add_argument("--repeats", type=int, default=3)
  args = p.parse_args(argv)
  if args.workdir:
    from moejax.train.checkpoint import load  # pylint: disable=import-outside-toplevel
    model, _ = load(args.workdir)
  else:
    from flax import nnx  # pylint: disable=import-outside-toplevel
    from moejax.model import Transformer  # pylint: disable=import-outside-toplevel
    from moejax.train import config_lib  # pylint: disable=import-outside-toplevel
    config = config_lib.load_config_file(args.config)
    model = Transformer(config_lib.model_config(config), rngs=nnx.Rngs(0))
  sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
  rows = measure(model, batch_sizes=sizes, prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                 repeats=args.repeats)
  print(f"prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, {args.repeats} repeats")
  print(markdown(rows))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
