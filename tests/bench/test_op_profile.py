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
