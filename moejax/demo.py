"""`make demo`: ALF-LB vs auxiliary-loss balancing on the embedded corpus, side by side.

Trains configs/alf_lb.py and configs/aux_loss.py briefly on the Python standard library source (a
few minutes on 2 CPU cores), runs the eval worker once on each final checkpoint, and prints one
table: validation loss, MaxVio_global, training tokens/s, canonical-solution NLL, pass@1 and decode
latency. Re-running reuses finished runs (delete the workdir to start over).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNS = ("alf_lb", "aux_loss")


def demo_config(name: str, num_steps: int):
  from moejax.train import config_lib  # pylint: disable=g-import-not-at-top
  config = config_lib.load_config_file(os.path.join(REPO, "configs", f"{name}.py"))
  config.train.update(num_steps=num_steps, batch_size=8, seq_len=128, eval_every=num_steps,
                      checkpoint_every=num_steps, log_every=10, eval_batches=8)
  return config


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", default="runs/demo")
  parser.add_argument("--steps", type=int, default=150)
  parser.add_argument("--skip_eval", action="store_true", help="train only; no eval worker")
  args = parser.parse_args(argv)

  from absl import logging  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.WARNING)   # orbax logs every file it writes at INFO.
  from moejax.train.trainer import train_and_evaluate  # pylint: disable=g-import-not-at-top
  workdirs = []
  for name in RUNS:
    workdir = os.path.join(args.workdir, name)
    print(f"== training {name} ({args.steps} steps) -> {workdir}", flush=True)
    t0 = time.perf_counter()
    train_and_evaluate(demo_config(name, args.steps), workdir)
    print(f"   {name}: {time.perf_counter() - t0:.0f} s", flush=True)
    workdirs.append(workdir)

  if not args.skip_eval:
    try:
      from moejax.evals import worker  # pylint: disable=g-import-not-at-top
    except ImportError:
      worker = None
    if worker is not None:
      for workdir in workdirs:
        print(f"== evaluating {workdir}", flush=True)
        worker.evaluate_once(workdir, suite="demo")

  from moejax.evals import compare  # pylint: disable=g-import-not-at-top
  print()
  print(compare.table(workdirs))
  print(f"\nTensorBoard: tensorboard --logdir {args.workdir}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
