"""Eval worker on a tiny run dir: restart safety, result keys, TensorBoard, summary, compare table;
throughput and canonical-solution NLL against independent references."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax.evals import compare, nll, throughput, worker
from moejax.infer import Generation
from moejax.model import Transformer
from moejax.summary import read_scalars
from moejax.train import checkpoint, config_lib
from tests.infer.test_engine import tiny_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROBLEMS = [
    {"task_id": "Tiny/0", "prompt": 'def add(a, b):\n    """Add two numbers."""\n',
     "canonical_solution": "    return a + b\n", "entry_point": "add",
     "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n"},
    {"task_id": "Tiny/1", "prompt": "def neg(x):\n", "canonical_solution": "    return -x\n",
     "entry_point": "neg", "test": "def check(candidate):\n    assert candidate(2) == -2\n"},
]
SUITE = worker.Suite(name="test", max_problems=2, max_new_tokens=6, gen_batch_size=2,
                     nll_problems=2, throughput_batch_sizes=(2,), throughput_prompt_len=8,
                     throughput_new_tokens=3, throughput_repeats=1, timeout_s=5.0, workers=2)


pytestmark = pytest.mark.usefixtures("fast_compiles")   # tests/conftest.py


def _config():
  c = config_lib.default_config()
  c.model.update(vocab_size=320, d_model=32, num_layers=1, num_heads=4, ff_dim=64, max_seq_len=128,
                 init_std=0.3)
  c.moe.update(num_experts=4, top_k=2, expert_ff_dim=32)
  return c


def _save(workdir, step, seed):
  model = Transformer(config_lib.model_config(_config()), rngs=nnx.Rngs(seed))
  _, params, model_state = nnx.split(model, nnx.Param, ...)
  checkpoint.save_model_only(str(workdir), step, params, model_state)
  return model


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  w = tmp_path_factory.mktemp("run")
  (w / "config.json").write_text(config_lib.to_json(_config()))
  tiny_tokenizer().save(str(w / "tokenizer.json"))
  he = w / "tiny_humaneval.jsonl"
  he.write_text("".join(json.dumps(p) + "\n" for p in PROBLEMS))
  _save(w, 1, seed=1)
  return w


def _compare_cells(workdir):
  table = compare.table([workdir]).splitlines()
  return dict(zip([c.strip() for c in table[0].split("|")], [c.strip() for c in table[2].split("|")]))


def test_worker_once_twice_then_cli_on_a_new_step(run_dir):
  w, he = str(run_dir), str(run_dir / "tiny_humaneval.jsonl")
  rows = worker.evaluate_once(w, SUITE, humaneval_path=he)
  assert {r["step"] for r in rows} == {1}
  bench = [r for r in rows if r["kind"] == "benchmark"]
  speed = [r for r in rows if r["kind"] == "throughput"]
  assert [r["kind"] for r in rows][-1] == "done" and len(bench) == 1 and len(speed) == 1
  b = bench[0]
  for key in ("step", "benchmark", "pass@1", "n_problems", "n_samples", "nll"):
    assert key in b, key
  assert b["benchmark"] == "humaneval" and b["n_problems"] == 2 and b["n_samples"] == 1
  assert 0.0 <= b["pass@1"] <= 1.0 and sum(b["outcomes"].values()) == 2
  assert np.isfinite(b["nll"]) and b["nll"] > 0
  for r in speed:
    for key in ("batch_size", "prefill_tokens_per_sec", "decode_tokens_per_sec", "ttft_ms",
                "itl_ms_p50", "itl_ms_p95", "compile_s", "unique_experts_per_step"):
      assert r[key] is not None, key
    assert 1.0 <= r["unique_experts_per_step"] <= min(4, 2 * r["batch_size"])
  assert speed[0]["batch_size"] == 2
  samples = (run_dir / "eval" / "samples" / "1_humaneval.jsonl").read_text().splitlines()
  assert len(samples) == 2 and all("result" in json.loads(s) for s in samples)

  cells = _compare_cells(w)
  for col in ("humaneval pass@1", "humaneval nll", "decode_tok_s", "ttft_ms", "itl_ms_p50",
              "unique_experts"):
    assert cells[col] not in ("", "-"), col
  assert float(cells["decode_tok_s"]) == pytest.approx(speed[0]["decode_tokens_per_sec"], rel=1e-3)

  assert worker.evaluate_once(w, SUITE, humaneval_path=he) == rows  # second run: nothing new
  _save(run_dir, 2, seed=2)
  env = dict(os.environ, JAX_DISABLE_MOST_OPTIMIZATIONS="true")
  cmd = [sys.executable, os.path.join(REPO, "evals", "worker.py"), "--workdir", w, "--once",
         "--suite", "demo", "--humaneval_path", he, "--override", "max_new_tokens=4",
         "--override", "throughput_batch_sizes=[]", "--override", "workers=2"]
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "step 2: done" in proc.stdout

  lines = [json.loads(x) for x in (run_dir / "eval" / "results.jsonl").read_text().splitlines()]
  keys = [(r["step"], r["kind"], r.get("benchmark"), r.get("batch_size")) for r in lines]
  assert len(keys) == len(set(keys)), "duplicate rows"
  assert [r["step"] for r in lines if r["kind"] == "done"] == [1, 2]
  scalars = read_scalars(str(run_dir / "tb_eval"))
  for tag in ("humaneval/pass@1", "humaneval/nll"):
    assert [s for s, _ in scalars[tag]] == [1, 2], tag
  for tag in ("decode_tokens_per_sec", "ttft_ms", "itl_ms_p50", "itl_ms_p95"):
    assert [s for s, _ in scalars[f"throughput/batch2/{tag}"]] == [1], tag
  assert "Latest evaluated step: 2" in (run_dir / "eval" / "summary.md").read_text()
  cells = _compare_cells(w)
  assert "decode_tok_s" not in cells  # compare reads the latest step only: step 2 has no speed rows
  last = [r for r in lines if r["step"] == 2]
  assert float(cells["humaneval nll"]) == pytest.approx(
      [r for r in last if r["kind"] == "benchmark"][0]["nll"], rel=1e-3)


def test_crash_midway_leaves_no_rows_and_pass_at_1_counts_sandbox_verdicts(tmp_path, monkeypatch):
  w = tmp_path / "run"
  w.mkdir()
  (w / "config.json").write_text(config_lib.to_json(_config()))
  tiny_tokenizer().save(str(w / "tokenizer.json"))
  he = tmp_path / "he.jsonl"
  he.write_text("".join(json.dumps(p) + "\n" for p in PROBLEMS))
  _save(w, 5, seed=0)
  answers = {PROBLEMS[0]["prompt"]: "    return a + b\n", PROBLEMS[1]["prompt"]: "    return x\n"}

  def fake_generate(self, prompts, **kw):  # right for problem 0, wrong for problem 1
    return [Generation([], [], answers[p], "stop", 0.0, []) for p in prompts]
  monkeypatch.setattr("moejax.infer.Engine.generate", fake_generate)
  suite = worker.Suite(**{**SUITE.__dict__, "throughput_batch_sizes": ()})

  def boom(*a, **k):
    raise RuntimeError("simulated crash after scoring")
  monkeypatch.setattr(worker, "_append_step", boom)  # crash after TB scalars, before the append
  with pytest.raises(RuntimeError, match="simulated"):
    worker.evaluate_once(str(w), suite, humaneval_path=str(he))
  assert worker.read_results(str(w)) == []
  # A torn tail and rows of a step without its marker are dropped on restart.
  (w / "eval" / "results.jsonl").write_text('{"step": 5, "kind": "benchmark"}\n{"step": 5, "ki')
  monkeypatch.undo()
  monkeypatch.setattr("moejax.infer.Engine.generate", fake_generate)
  rows = worker.evaluate_once(str(w), suite, humaneval_path=str(he))
  bench = [r for r in rows if r["kind"] == "benchmark"][0]
  assert bench["pass@1"] == 0.5 and bench["outcomes"] == {"passed": 1, "failed": 1}
  lines = (w / "eval" / "results.jsonl").read_text().splitlines()
  assert [json.loads(x)["kind"] for x in lines] == ["benchmark", "done"]


def test_reference_nll_matches_a_numpy_log_softmax():
  cfg = config_lib.model_config(_config())
  model = Transformer(cfg, rngs=nnx.Rngs(3))
  tok = tiny_tokenizer()
  pairs = [("def add(a, b):\n", "    return a + b\n"), ("x = ", "1"), ("class Point:\n", "    pass\n")]
  got = nll.reference_nll(model, tok, pairs, batch_size=2)
  fwd = nnx.jit(lambda m, t: m(t))
  total, count, per = 0.0, 0, []
  for prompt, ref in pairs:
    p, r = tok.encode(prompt).ids, tok.encode(ref).ids
    seq = np.zeros((1, 64), np.int32)  # right padding: causal, so logits of real tokens unchanged
    seq[0, :len(p) + len(r)] = p + r
    logits = np.asarray(fwd(model, jnp.asarray(seq)), np.float64)[0]
    top = logits.max(-1, keepdims=True)
    logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    nll_j = [-logp[len(p) + j - 1, r[j]] for j in range(len(r))]
    total, count = total + sum(nll_j), count + len(r)
    per.append(np.mean(nll_j))
  assert got.n_tokens == count and got.n_problems == 3
  np.testing.assert_allclose(got.nll, total / count, rtol=1e-4)
  np.testing.assert_allclose(got.per_problem, per, rtol=1e-4)


def test_throughput_rows_and_unique_experts_reference():
  cfg = config_lib.model_config(_config())
  model = Transformer(cfg, rngs=nnx.Rngs(4))
  rows = throughput.measure(model, batch_sizes=(1, 2), prompt_len=8, new_tokens=3, repeats=2)
  assert [r.batch_size for r in rows] == [1, 2]
  for r in rows:
    assert r.prefill_tokens_per_sec > 0 and r.decode_tokens_per_sec > 0
    assert r.itl_ms_p50 <= r.itl_ms_p95 and r.ttft_ms > 0 and r.compile_s > 0
  # Batch 1 decodes one token per step: exactly top_k distinct experts in every MoE layer.
  assert rows[0].unique_experts_per_step == cfg.top_k
  assert cfg.top_k <= rows[1].unique_experts_per_step <= cfg.num_experts
  dense = Transformer(cfg.replace(num_experts=0), rngs=nnx.Rngs(0))
  assert throughput.measure(dense, batch_sizes=(2,), prompt_len=8, new_tokens=3,
                            repeats=1)[0].unique_experts_per_step is None
  assert "| 2 |" in throughput.markdown(rows)
  with pytest.raises(ValueError, match="max_seq_len"):
    throughput.measure(model, batch_sizes=(1,), prompt_len=120, new_tokens=16)
