"""Where a jitted step spends its time, per HLO op (a profiling aid; not a test).

    python -m moejax.bench.op_profile --run_dir RUN [--what train|prefill|decode] [--batch 8] [--seq 256]
    python -m moejax.bench.op_profile --tiny            # a small random MoE model, no run needed

Runs the trainer's train step (or a cache-filling prefill, or `--decode_steps` greedy steps of the
engine's on-device decode loop after a `--seq`-token prefill) a few times under `jax.profiler.trace`
with XLA CPU's per-op trace events on (`--xla_cpu_enable_xprof_traceme=true`, set before JAX
starts), reads the trace back with JAX's own xplane reader, and prints the *exclusive* time of every
op (its own time minus that of ops nested in it, e.g. a while loop minus its body), summed over the
worker threads and grouped by the op's JAX source name (`op_name` metadata of the optimised HLO:
`transpose(jvp(...))` is backward, `while/body` a loop such as the expert tiles or the chunked loss).
Threads run ops concurrently, so the total exceeds the wall time. Uses JAX's private
`jax._src.lib._profile_data`; on other backends the per-op events may be missing.
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import sys
import tempfile
import time

_TRACE_FLAG = "--xla_cpu_enable_xprof_traceme=true"


def op_names(hlo_text: str) -> dict[str, str]:
  """HLO instruction name -> its `op_name` metadata, without the outer `jit(...)/` prefix."""
  names = {}
  for line in hlo_text.splitlines():
    m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = .*?op_name=\"([^\"]*)\"", line)
    if m:
      names.setdefault(m.group(1), re.sub(r"^jit\([^)]*\)/", "", m.group(2)))
  return names


def exclusive_times(trace_dir: str) -> collections.Counter:
  """Event name -> exclusive nanoseconds over the XLA worker threads of the trace in `trace_dir`."""
  from jax._src.lib import _profile_data  # pylint: disable=import-outside-toplevel
  files = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
  if not files:
    raise FileNotFoundError(f"op_profile: no *.xplane.pb under {trace_dir}")
  totals = collections.Counter()
  for plane in _profile_data.ProfileData.from_file(files[0]).planes:
    for line in plane.lines:
      if "XLAEigen" in line.name:
        totals.update(exclusive((ev.start_ns, ev.duration_ns, ev.name) for ev in line.events
                                if not ev.name.startswith(("ThunkExecutor", "SlinkyThreadPool"))))
  return totals


def exclusive(events) -> collections.Counter:
  """Name -> exclusive duration of one thread's (start, duration, name) events: an event's own
  time minus the time of the events nested inside it (children start and end within it)."""
  totals = collections.Counter()
  open_events = []   # (end, name) of the enclosing events, innermost last.
  for start, duration, name in sorted(events, key=lambda e: (e[0], -e[1])):
    end = start + duration
    while open_events and open_events[-1][0] <= start:
      open_events.pop()
    if open_events:
      totals[open_events[-1][1]] -= duration
    totals[name] += duration
    open_events.append((end, name))
  return totals


def profile(fn, args, runs: int = 3) -> tuple[list[tuple[str, float]], float]:
  """([(op_name, ms per run)] sorted, best untraced wall ms) of `fn(*args)` (a jitted function)."""
  import jax  # pylint: disable=import-outside-toplevel
  names = op_names(fn.lower(*args).compile().as_text())
  jax.block_until_ready(fn(*args))
  walls = []
  for _ in range(runs):   # untraced: the profiler's own start/stop is not the step's time.
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    walls.append((time.perf_counter() - t0) * 1e3)
  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir):
      for _ in range(runs):
        jax.block_until_ready(fn(*args))
    totals = exclusive_times(trace_dir)
  wall_ms = min(walls)
  by_op = collections.Counter()
  for event, ns in totals.items():
    by_op[names.get(event, event)] += ns / 1e6 / runs
  return by_op.most_common(), wall_ms


def _tiny_model():
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from moejax.model import ModelConfig, Transformer  # pylint: disable=import-outside-toplevel
  from moejax.train import config_lib  # pylint: disable=import-outside-toplevel
  config = config_lib.default_config()
  cfg = ModelConfig(vocab_size=512, d_model=64, num_layers=2, num_heads=4, ff_dim=64, num_experts=4,
                    top_k=2, expert_ff_dim=32, max_seq_len=64, compute_dtype="float32")
  return Transformer(cfg, rngs=nnx.Rngs(0)), config


def decode_loop_and_args(model, tokens_BxL, num_steps: int, params=None):
  """The engine's decode loop (`moejax.infer.steps.loop_fn`, jitted without donation) and its
  arguments: a cache filled by the prompts tokens_BxL (no padding, row ids 0..B-1), then num_steps
  steps sampled with `params` (default greedy), EOS ignored. `fn(*args)[0]` holds the tokens of
  steps 1..num_steps (step 0 comes from the prefill)."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from moejax.infer import SamplingParams, steps  # pylint: disable=import-outside-toplevel
  graphdef, weights = nnx.split(model)
  tokens = jnp.asarray(tokens_BxL, jnp.int32)
  b, l = tokens.shape
  positions = jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (b, l))
  params = params or SamplingParams()
  rows, key, knobs = jnp.arange(b, dtype=jnp.int32), jax.random.key(params.seed), params.as_arrays()
  next_B, cache = jax.jit(steps.prefill_fn, static_argnums=0)(
      graphdef, weights, model.init_cache(b, l + num_steps), tokens, jnp.ones((b, l), jnp.int32),
      positions, key, rows, *knobs)
  args = (graphdef, weights, cache, next_B, jnp.full((b,), l, jnp.int32), jnp.ones((b,), bool),
          jnp.ones((), jnp.int32), jnp.asarray(num_steps, jnp.int32), key, rows, *knobs,
          jnp.full((8,), -1, jnp.int32), jnp.asarray(True), jnp.zeros((b, num_steps), jnp.int32))
  return jax.jit(steps.loop_fn, static_argnums=0), args


def _step_and_args(model, config, what: str, b: int, l: int, decode_steps: int = 16):
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from moejax.train import step as step_lib  # pylint: disable=import-outside-toplevel
  tokens = jax.random.randint(jax.random.key(0), (b, l), 1, model.cfg.vocab_size)
  positions = jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (b, l))
  segments = jnp.ones((b, l), jnp.int32)
  if what == "train":
    tx, schedule = step_lib.make_optimizer(config.opt, 1000)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    state = step_lib.TrainState(jnp.zeros((), jnp.int32), params, rest, tx.init(params),
                                jax.random.key(0))
    batch = dict(tokens=tokens, positions=positions, segment_ids=segments)
    return jax.jit(step_lib.make_train_step(graphdef, tx, model.cfg, schedule)), (state, batch)
  if what == "decode":
    return decode_loop_and_args(model, tokens, decode_steps)
  graphdef, weights = nnx.split(model)

  @jax.jit
  def prefill(w, t, p, s):
    m = nnx.merge(graphdef, w)
    h, _, cache = m.forward_hidden(t, positions_BxL=p, segment_ids_BxL=s, cache=m.init_cache(b, l))
    return m.logits(h[:, -1:]), cache

  return prefill, (weights, tokens, positions, segments)


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--run_dir", help="a moejax run or converted checkpoint (moejax.load)")
  ap.add_argument("--tiny", action="store_true", help="a small random MoE model instead")
  ap.add_argument("--what", choices=("train", "prefill", "decode"), default="train")
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--seq", type=int, default=256)
  ap.add_argument("--decode_steps", type=int, default=16, help="--what decode: steps per run")
  ap.add_argument("--runs", type=int, default=3)
  ap.add_argument("--top", type=int, default=30)
  args = ap.parse_args(argv)
  if bool(args.run_dir) == bool(args.tiny):
    ap.error("give exactly one of --run_dir DIR or --tiny")
  if "jax" in sys.modules:
    raise RuntimeError("op_profile: JAX was imported before XLA_FLAGS could be set; run it as "
                       "`python -m moejax.bench.op_profile`")
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _TRACE_FLAG).strip()
  import moejax  # pylint: disable=import-outside-toplevel
  model, config = _tiny_model() if args.tiny else moejax.load(args.run_dir)
  fn, fn_args = _step_and_args(model, config, args.what, args.batch, args.seq, args.decode_steps)
  rows, wall_ms = profile(fn, fn_args, args.runs)
  total = sum(ms for _, ms in rows)
  what = f"{args.decode_steps} decode steps after" if args.what == "decode" else args.what
  print(f"# {what}, batch {args.batch} x {args.seq}: wall {wall_ms:.1f} ms per run, "
        f"exclusive op time {total:.1f} ms summed over threads")
  print("| ms per run | % | op (JAX source name) |\n|---|---|---|")
  for name, ms in rows[:args.top]:
    print(f"| {ms:.2f} | {100 * ms / max(total, 1e-9):.1f} | {name} |")


if __name__ == "__main__":
  main()
