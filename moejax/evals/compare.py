"""One table across runs: quality, balance and speed side by side.

Reads each run directory's `config.json`, `metrics.jsonl` (training and validation scalars) and
`eval/results.jsonl` (the eval worker's rows) — files only, no JAX — and prints a markdown table:
method, top-k, experts, val loss, MaxVio_global, train tokens/s, then per benchmark pass@1 and
canonical-solution NLL, and decode tokens/s, TTFT and ITL p50 at the smallest measured batch size, and unique experts
per decode step at the largest.
"""

from __future__ import annotations

import json
import os
from typing import Any

from moejax import jsonl


def _read_jsonl(path: str) -> list[dict[str, Any]]:
  # A writer may be mid-append: only the last line may be torn.
  return jsonl.read_objects(path, torn="last", missing_ok=True)


def _last(rows: list[dict], key: str):
  for row in reversed(rows):
    if key in row and isinstance(row[key], (int, float)):
      return row[key]
  return None


def summarize(workdir: str) -> dict[str, Any]:
  """The row of one run (missing values are None)."""
  config_path = os.path.join(workdir, "config.json")
  if not os.path.isfile(config_path):
    raise FileNotFoundError(f"{workdir}: no config.json (not a moejax run directory)")
  with open(config_path, encoding="utf-8") as f:
    config = json.load(f)
  moe = config.get("moe", {})
  metrics = _read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  row: dict[str, Any] = {
      "run": os.path.basename(os.path.normpath(workdir)),
      "method": moe.get("balance", "") if moe.get("num_experts", 0) else "dense",
      "top_k": moe.get("top_k") if moe.get("num_experts", 0) else "-",
      "experts": moe.get("num_experts", 0),
      "step": _last(metrics, "step"),
      "val_loss": _last(metrics, "val_loss"),
      "max_vio_global": _last(metrics, "max_vio_global"),
      "train_tok_s": _last(metrics, "tokens_per_sec"),
  }
  evals = _read_jsonl(os.path.join(workdir, "eval", "results.jsonl"))
  if evals:
    latest = max(r.get("step", 0) for r in evals)
    evals = [r for r in evals if r.get("step", 0) == latest]
  for r in evals:
    if "benchmark" in r and "pass@1" in r:
      row[f"{r['benchmark']} pass@1"] = r["pass@1"]
    if "benchmark" in r and "nll" in r:
      row[f"{r['benchmark']} nll"] = r["nll"]
  speed = [r for r in evals if "decode_tokens_per_sec" in r]
  if speed:
    first = min(speed, key=lambda r: r.get("batch_size", 0))
    row["decode_tok_s"] = first["decode_tokens_per_sec"]
    row["ttft_ms"] = first.get("ttft_ms")
    row["itl_ms_p50"] = first.get("itl_ms_p50")
    # Unique experts per decode step is always top_k at batch 1; the largest batch is informative.
    largest = max(speed, key=lambda r: r.get("batch_size", 0))
    row["unique_experts"] = largest.get("unique_experts_per_step")
  return row


def _fmt(value: Any) -> str:
  if value is None:
    return "-"
  if isinstance(value, float):
    return f"{value:.4g}"
  return str(value)


def table(workdirs: list[str]) -> str:
  rows = [summarize(w) for w in workdirs]
  columns: list[str] = []
  for row in rows:
    for key in row:
      if key not in columns:
        columns.append(key)
  lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  for row in rows:
    lines.append("| " + " | ".join(_fmt(row.get(c)) for c in columns) + " |")
  return "\n".join(lines)
