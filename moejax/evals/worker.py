"""The eval worker: every finalised checkpoint of a run, scored once, accuracy and speed side by side.

For a step it loads the checkpoint (`moejax.train.checkpoint.load`), generates completions with the
KV-cache engine (`moejax.infer`), executes them only through the sandbox (`moejax.evals.scoring`;
never in this process), computes pass@k (Chen et al. 2021, arXiv 2107.03374, unbiased estimator),
the canonical-solution NLL (`moejax.evals.nll`) and serving speed (`moejax.evals.throughput`). It
writes, per step:

  W/eval/results.jsonl   one row per benchmark and per throughput batch size, then a `done` marker
  W/eval/samples/<step>_<benchmark>.jsonl   every sample with its verdict
  W/tb_eval/             TensorBoard scalars (next to the training curves in W/tb)
  W/eval/summary.md      the latest step's tables and the history of pass@1 / NLL

Restart safety: all rows of a step are appended in ONE write after everything is computed, the
`done` marker last; a step counts as evaluated only when its marker is present. On start, rows of a
step without its marker and a torn last line are dropped (the file is rewritten atomically), and an
exclusive lock on W/eval/.lock keeps a second worker off the same run.
"""

from __future__ import annotations

import dataclasses
import fcntl
import importlib.util
import json
import os
import time
from typing import Any, Optional, Sequence

from moejax import jsonl

RESULTS = "results.jsonl"
DONE = "done"
STOPS = {"humaneval": None, "mbpp": ("[DONE]",), "humaneval_pro": ("```",), "mbpp_pro": ("```",)}
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@dataclasses.dataclass(frozen=True)
class Suite:
  """What the worker measures per checkpoint (configs in evals/suites.py). 0 = all problems."""
  name: str
  max_problems: int = 0
  n_samples: int = 1
  ks: tuple[int, ...] = (1,)
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  seed: int = 0
  max_new_tokens: int = 256
  gen_batch_size: int = 8
  nll_problems: int = 0
  nll_batch_size: int = 8
  throughput_batch_sizes: tuple[int, ...] = (1, 8, 32)
  throughput_prompt_len: int = 128
  throughput_new_tokens: int = 64
  throughput_repeats: int = 3
  timeout_s: float = 3.0
  workers: int = 0

  def __post_init__(self):
    for name in ("n_samples", "max_new_tokens", "gen_batch_size", "nll_batch_size"):
      if getattr(self, name) < 1:
        raise ValueError(f"suite {self.name}: {name}={getattr(self, name)!r}: expected >= 1")
    if self.temperature == 0 and self.n_samples > 1:
      raise ValueError(f"suite {self.name}: n_samples={self.n_samples} with greedy decoding "
                       "(temperature 0) repeats one sample; set a temperature")
    if any(k > self.n_samples for k in self.ks):
      raise ValueError(f"suite {self.name}: ks={self.ks} needs n_samples >= {max(self.ks)}")


def get_suite(suite: "str | Suite", **overrides) -> Suite:
  """A `Suite` object, or one named in evals/suites.py; `overrides` replace its fields."""
  if isinstance(suite, str):
    path = os.path.join(REPO, "evals", "suites.py")
    if not os.path.isfile(path):
      raise FileNotFoundError(f"{path}: the suite configs are missing (needed for suite={suite!r})")
    spec = importlib.util.spec_from_file_location("moejax_eval_suites", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if suite not in module.SUITES:
      raise ValueError(f"suite={suite!r}: expected one of {sorted(module.SUITES)} (evals/suites.py)")
    suite = module.SUITES[suite]
  return dataclasses.replace(suite, **overrides) if overrides else suite


# ----------------------------------------------------------------------------- results file

def _paths(workdir: str) -> tuple[str, str]:
  eval_dir = os.path.join(workdir, "eval")
  return eval_dir, os.path.join(eval_dir, RESULTS)


def read_results(workdir: str, *, repair: bool = False) -> list[dict]:
  """Rows of completed steps only. With `repair`, rewrites the file without the others."""
  _, path = _paths(workdir)
  if not os.path.isfile(path):
    return []
  with open(path, encoding="utf-8") as f:
    text = f.read()
  # torn="skip": a crash mid-append leaves a torn line; it is dropped (and the file repaired).
  parsed, bad = jsonl.parse_objects(text, path, torn="skip")
  rows = [row for _, row in parsed]
  done = {r.get("step") for r in rows if r.get("kind") == DONE}
  kept = [r for r in rows if r.get("step") in done]
  if repair and (bad or len(kept) != len(rows) or (text and not text.endswith("\n"))):
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
      f.write("".join(json.dumps(r) + "\n" for r in kept))
    os.replace(tmp, path)
  return kept


def done_steps(workdir: str) -> set[int]:
  return {r["step"] for r in read_results(workdir) if r.get("kind") == DONE}


def _append_step(workdir: str, rows: list[dict]) -> None:
  eval_dir, path = _paths(workdir)
  os.makedirs(eval_dir, exist_ok=True)
  data = "".join(json.dumps(r) + "\n" for r in rows).encode("utf-8")
  fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
  try:
    os.write(fd, data)  # one write: a crash leaves at most one torn tail, repaired on restart
    os.fsync(fd)
  finally:
    os.close(fd)


def finalised_steps(workdir: str) -> list[int]:
  """Steps whose checkpoint orbax has finalised (never a checkpoint still being written)."""
  if not os.path.isdir(os.path.join(workdir, "checkpoints")):
    return []
  from moejax.train import checkpoint  # pylint: disable=import-outside-toplevel
  mngr = checkpoint.manager(workdir, read_only=True, async_save=False)
  try:
    return sorted(int(s) for s in mngr.all_steps())
  finally:
    mngr.close()


# ----------------------------------------------------------------------------- one step

def _load_tokenizer(workdir: str, config):
  from moejax.infer import load_tokenizer  # pylint: disable=import-outside-toplevel
  path = os.path.join(workdir, "tokenizer.json")
  configured = config.data.get("tokenizer", "") if "data" in config else ""
  tok = load_tokenizer(path if os.path.isfile(path) or not configured else configured)
  tok.encode_special_tokens = True  # literal "<|endoftext|>" in a prompt is text, as in training
  return tok


def load_problems(mbpp_path=None, humaneval_pro_path=None, mbpp_pro_path=None,
                  humaneval_path=None) -> dict[str, dict]:
  """{benchmark: problems}: HumanEval always; MBPP / Pro when their files are given."""
  from moejax.evals import benchmarks  # pylint: disable=import-outside-toplevel
  out = {"humaneval": benchmarks.load_humaneval(humaneval_path)}
  if mbpp_path:
    out["mbpp"] = benchmarks.load_mbpp(mbpp_path)
  if humaneval_pro_path:
    out["humaneval_pro"] = benchmarks.load_pro(humaneval_pro_path, "humaneval_pro")
  if mbpp_pro_path:
    out["mbpp_pro"] = benchmarks.load_pro(mbpp_pro_path, "mbpp_pro")
  return out


def _score_benchmark(name, problems, model, tok, suite, step, samples_dir) -> dict[str, Any]:
  from moejax.evals import benchmarks, nll, sandbox, scoring  # pylint: disable=import-outside-toplevel
  from moejax.infer import Engine  # pylint: disable=import-outside-toplevel
  chosen = dict(list(problems.items())[:suite.max_problems or None])
  tasks = [p for p in chosen.values() for _ in range(suite.n_samples)]
  engine = Engine(model, tok, batch_size=suite.gen_batch_size)
  t0 = time.perf_counter()
  gens = engine.generate([p.prompt for p in tasks], max_new_tokens=suite.max_new_tokens,
                         temperature=suite.temperature, top_k=suite.top_k, top_p=suite.top_p,
                         seed=suite.seed, stop=STOPS[name] or benchmarks.HUMANEVAL_STOP)
  gen_s = time.perf_counter() - t0
  samples = [{"task_id": p.task_id, "completion": benchmarks.completion_from_generation(p, g.text),
              "finish_reason": g.finish_reason} for p, g in zip(tasks, gens)]
  t0 = time.perf_counter()
  scored = scoring.score_samples(samples, chosen, benchmark=name,
                                 limits=sandbox.SandboxLimits(timeout_s=suite.timeout_s),
                                 workers=suite.workers or None)
  score_s = time.perf_counter() - t0
  os.makedirs(samples_dir, exist_ok=True)
  with open(os.path.join(samples_dir, f"{step}_{name}.jsonl"), "w", encoding="utf-8") as f:
    f.write("".join(json.dumps(r) + "\n" for r in scored))
  row: dict[str, Any] = {"step": step, "kind": "benchmark", "benchmark": name}
  row.update(scoring.pass_at_k_of(scored, name, suite.ks))
  outcomes: dict[str, int] = {}
  for r in scored:
    outcomes[r["result"]] = outcomes.get(r["result"], 0) + 1
  nll_pairs = benchmarks.reference_pairs(problems)[:suite.nll_problems or None]
  ref = nll.reference_nll(model, tok, nll_pairs, batch_size=suite.nll_batch_size)
  row.update({"n_problems": len(chosen), "n_samples": suite.n_samples, "outcomes": outcomes,
              "generated_tokens": sum(len(g.tokens) for g in gens), "generate_s": gen_s,
              "score_s": score_s, "nll": ref.nll, "nll_problem_mean": ref.nll_problem_mean,
              "nll_tokens": ref.n_tokens, "nll_problems": ref.n_problems})
  return row


def evaluate_step(workdir: str, step: int, suite: Suite, problems: dict[str, dict]) -> list[dict]:
  """All rows of one step (benchmarks, throughput, then the `done` marker); writes nothing."""
  from moejax.data import pad_id  # pylint: disable=import-outside-toplevel
  from moejax.evals import throughput  # pylint: disable=import-outside-toplevel
  from moejax.train import checkpoint  # pylint: disable=import-outside-toplevel
  t_start = time.perf_counter()
  model, config = checkpoint.load(workdir, step)
  tok = _load_tokenizer(workdir, config)
  rows = [_score_benchmark(name, probs, model, tok, suite, step,
                           os.path.join(workdir, "eval", "samples"))
          for name, probs in problems.items()]
  if suite.throughput_batch_sizes:
    for r in throughput.measure(model, batch_sizes=suite.throughput_batch_sizes,
                                prompt_len=suite.throughput_prompt_len,
                                new_tokens=suite.throughput_new_tokens,
                                repeats=suite.throughput_repeats, seed=suite.seed,
                                pad_id=pad_id(tok)):
      rows.append({"step": step, "kind": "throughput", **r.as_dict()})
  for r in rows:
    r["suite"] = suite.name
  rows.append({"step": step, "kind": DONE, "suite": suite.name, "time": time.time(),
               "wall_s": time.perf_counter() - t_start})
  return rows


def _tb_scalars(rows: Sequence[dict]) -> dict[str, float]:
  out = {}
  for r in rows:
    if r.get("kind") == "benchmark":
      for key in [k for k in r if k.startswith("pass@")] + ["nll"]:
        out[f"{r['benchmark']}/{key}"] = r[key]
    elif r.get("kind") == "throughput":
      for key in ("prefill_tokens_per_sec", "decode_tokens_per_sec", "ttft_ms", "itl_ms_p50",
                  "itl_ms_p95", "unique_experts_per_step"):
        if r.get(key) is not None:
          out[f"throughput/batch{r['batch_size']}/{key}"] = r[key]
  return out


def _write_summary(workdir: str) -> None:
  rows = read_results(workdir)
  if not rows:
    return
  from moejax.evals import throughput  # pylint: disable=import-outside-toplevel
  latest = max(r["step"] for r in rows)
  lines = [f"# Eval summary: {os.path.basename(os.path.normpath(workdir))}", "",
           f"Latest evaluated step: {latest}", "", "| step | benchmark | pass@1 | NLL | problems "
           "| samples | outcomes |", "|---:|---|---:|---:|---:|---:|---|"]
  for r in rows:
    if r.get("kind") == "benchmark":
      lines.append(f"| {r['step']} | {r['benchmark']} | {r.get('pass@1', float('nan')):.4f} | "
                   f"{r['nll']:.4f} | {r['n_problems']} | {r['n_samples']} | {r['outcomes']} |")
  speed = [r for r in rows if r.get("kind") == "throughput" and r["step"] == latest]
  if speed:
    fields = {f.name for f in dataclasses.fields(throughput.ThroughputRow)}
    rows_t = [throughput.ThroughputRow(**{k: v for k, v in r.items() if k in fields}) for r in speed]
    lines += ["", f"## Throughput at step {latest} (prompt {speed[0]['prompt_len']} tokens, "
              f"{speed[0]['new_tokens']} new tokens)", "", throughput.markdown(rows_t)]
  tmp = os.path.join(workdir, "eval", "summary.md.tmp")
  with open(tmp, "w", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")
  os.replace(tmp, os.path.join(workdir, "eval", "summary.md"))


class _Lock:
  def __init__(self, workdir: str):
    os.makedirs(os.path.join(workdir, "eval"), exist_ok=True)
    self.path = os.path.join(workdir, "eval", ".lock")

  def __enter__(self):
    self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      os.close(self.fd)
      raise RuntimeError(f"{self.path}: another eval worker is running on this run") from None
    return self

  def __exit__(self, *exc):
    fcntl.flock(self.fd, fcntl.LOCK_UN)
    os.close(self.fd)


def _evaluate_and_record(workdir, step, suite, problems, log) -> list[dict]:
  from moejax.summary import MetricWriter  # pylint: disable=import-outside-toplevel
  log(f"[eval] step {step}: evaluating (suite {suite.name})")
  rows = evaluate_step(workdir, step, suite, problems)
  writer = MetricWriter(os.path.join(workdir, "tb_eval"))
  writer.scalars(step, _tb_scalars(rows))
  writer.close()
  _append_step(workdir, rows)
  _write_summary(workdir)
  log(f"[eval] step {step}: done in {rows[-1]['wall_s']:.0f} s")
  return rows


# ----------------------------------------------------------------------------- entry points

_PATH_KEYS = ("mbpp_path", "humaneval_pro_path", "mbpp_pro_path", "humaneval_path")


def run(workdir: str, suite: "str | Suite" = "full", once: bool = False, poll_seconds: float = 30.0,
        *, max_polls: Optional[int] = None, until_step: Optional[int] = None, log=print,
        **kw) -> list[dict]:
  """Polls W/checkpoints and evaluates every finalised step not yet in results.jsonl, oldest first.

  `once`: the latest finalised step only, then return. Otherwise loops until `until_step` is
  evaluated or `max_polls` polls are done (forever by default). `kw`: benchmark paths
  (mbpp_path, humaneval_pro_path, mbpp_pro_path, humaneval_path) and Suite field overrides.
  Returns the rows written by this call.
  """
  if not os.path.isfile(os.path.join(workdir, "config.json")):
    raise FileNotFoundError(f"{workdir}: no config.json (not a moejax run directory)")
  paths = {k: kw.pop(k) for k in _PATH_KEYS if k in kw}
  suite = get_suite(suite, **kw)
  problems = load_problems(**paths)
  written: list[dict] = []
  polls = 0
  with _Lock(workdir):
    read_results(workdir, repair=True)
    while True:
      steps = finalised_steps(workdir)
      done = done_steps(workdir)
      if once:
        if not steps:
          raise FileNotFoundError(f"{workdir}/checkpoints: no finalised checkpoint to evaluate")
        todo = [] if steps[-1] in done else [steps[-1]]
        if not todo:
          log(f"[eval] step {steps[-1]} already evaluated; nothing to do")
      else:
        todo = [s for s in steps if s not in done]
      for step in todo:
        try:
          written += _evaluate_and_record(workdir, step, suite, problems, log)
        except FileNotFoundError as e:  # deleted by the trainer's keep-N policy meanwhile
          log(f"[eval] step {step}: checkpoint vanished ({e}); skipped")
      polls += 1
      if once or (until_step is not None and until_step in done_steps(workdir)) or (
          max_polls is not None and polls >= max_polls):
        return written
      time.sleep(poll_seconds)


def evaluate_once(workdir: str, suite: "str | Suite" = "demo", **kw) -> list[dict]:
  """Evaluates the latest finalised checkpoint (if not done yet); returns that step's rows."""
  run(workdir, suite, once=True, **kw)
  steps = finalised_steps(workdir)
  return [r for r in read_results(workdir) if steps and r["step"] == steps[-1]]
