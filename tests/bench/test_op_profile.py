"""The op profiler: exclusive-time bookkeeping on synthetic events, and a real traced run."""

import os
import subprocess
import sys

from moejax.bench import op_profile


def test_exclusive_subtracts_nested_events():
  # One thread: a loop [0, 100) holding two dots and a nested loop [50, 90) holding an add; then a
  # copy after the loop.
  events = [(0, 100, "while"), (10, 20, "dot"), (50, 40, "inner"), (55, 10, "add"),
            (70, 15, "dot"), (100, 5, "copy")]
  got = op_profile.exclusive(events)
  assert got == {"while": 100 - 20 - 40, "dot": 35, "inner": 40 - 10 - 15, "add": 10, "copy": 5}
  assert sum(got.values()) == 105   # the thread's busy time, each instant counted once


def test_op_names_strip_the_jit_prefix():
  hlo = ('  %ynn_fusion.3 = f32[2,4]{1,0} fusion(%a, %b), kind=kCustom, '
         'metadata={op_name="jit(train_step)/transpose(jvp())/dot_general" stack_frame_id=1}\n'
         '  ROOT %add.1 = f32[] add(%x, %y), metadata={op_name="jit(f)/add"}\n')
  assert op_profile.op_names(hlo) == {"ynn_fusion.3": "transpose(jvp())/dot_general", "add.1": "add"}


def test_tiny_train_step_profile_lists_matmuls():
  env = dict(os.environ, XLA_FLAGS="")
  out = subprocess.run([sys.executable, "-m", "moejax.bench.op_profile", "--tiny", "--batch", "2",
                        "--seq", "16", "--runs", "2", "--top", "100000"],
                       capture_output=True, text=True, env=env, timeout=600, check=True).stdout
  rows = [line.split(" | ") for line in out.splitlines() if line.startswith("| ") and
          not line.startswith("| ms")]
  assert rows, out
  ms = {r[2].rstrip(" |"): float(r[0].lstrip("| ")) for r in rows}
  assert any("dot_general" in name and t > 0 for name, t in ms.items()), out
  assert any(name.startswith("transpose(jvp(") for name in ms), out   # the backward pass is there
  assert all(float(r[0].lstrip("| ")) >= 0 for r in rows), out     # exclusive times never negative
  assert abs(sum(float(r[1]) for r in rows) - 100) < 0.05 * len(rows) + 0.5, out   # all ops listed


def test_decode_loop_gives_the_engines_tokens():
  import numpy as np  # pylint: disable=import-outside-toplevel
  from moejax.infer import Engine, SamplingParams  # pylint: disable=import-outside-toplevel
  model, _ = op_profile._tiny_model()  # pylint: disable=protected-access
  prompts = np.random.default_rng(0).integers(1, model.cfg.vocab_size, (2, 8))
  # Sampled, not greedy: this tiny tied-embedding model greedily repeats its input token.
  params = SamplingParams(temperature=1.0, seed=3)
  fn, args = op_profile.decode_loop_and_args(model, prompts, num_steps=5, params=params)
  tokens_BxC, steps_done = fn(*args)[:2]
  gens, _ = Engine(model, None, batch_size=2, min_bucket=8, eos_ids=(), pad_id=0).run_batch(
      prompts.tolist(), [0, 1], max_new_tokens=6, params=params, ignore_eos=True)
  assert int(steps_done) == 5
  want = [g.tokens[1:] for g in gens]
  assert len({t for row in want for t in row}) > 4, want   # the tokens vary: a real comparison
  np.testing.assert_array_equal(np.asarray(tokens_BxC), want)


def test_tiny_decode_profile_lists_the_loop():
  env = dict(os.environ, XLA_FLAGS="")
  out = subprocess.run([sys.executable, "-m", "moejax.bench.op_profile", "--tiny", "--what",
                        "decode", "--batch", "2", "--seq", "8", "--decode_steps", "4", "--runs", "1",
                        "--top", "100000"],
                       capture_output=True, text=True, env=env, timeout=600, check=True).stdout
  assert "# 4 decode steps after, batch 2 x 8" in out, out
  names = [line.split(" | ")[2] for line in out.splitlines() if line.startswith("| ") and
           not line.startswith("| ms")]
  assert any(n.startswith("while/body/") and "dot_general" in n for n in names), out
  assert not any(n.startswith(("jvp(", "transpose(jvp(")) for n in names), out   # no training
