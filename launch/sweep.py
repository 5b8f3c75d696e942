"""Runs every point of a config's `get_sweep()` as its own run directory under one study dir.

  python launch/sweep.py --config=configs/alf_lb.py --study_dir=runs/study            # sequentially here
  python launch/sweep.py --config=configs/alf_lb.py --study_dir=runs/study --dry_run  # print commands
  tensorboard --logdir runs/study                                                      # compare them

`get_sweep()` returns a list of flat override dicts ({"moe.top_k": 2, "opt.lr": 3e-4}); each point
becomes `python -m moejax.train --config=<file>[:arg] --workdir=<study>/<name> --config.k=v ...`,
with the name built from the overrides. `--dry_run` prints one command per point (for a cluster
scheduler) and runs nothing. Extra `--config.k=v` flags given here apply to every point.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys


def load_sweep(config_file: str) -> list[dict]:
  from moejax.train import config_lib  # pylint: disable=import-outside-toplevel
  path = config_file.split(":", 1)[0]
  try:
    module = config_lib.load_config_module(path)
  except config_lib.ConfigError as e:
    raise SystemExit(f"error: --config: {e}") from None
  if not hasattr(module, "get_sweep"):
    raise SystemExit(f"error: {path} defines no get_sweep(); nothing to sweep")
  points = module.get_sweep()
  if not isinstance(points, list) or not all(isinstance(p, dict) for p in points):
    raise SystemExit(f"error: {path}: get_sweep() must return a list of dicts of overrides")
  return points


def point_name(overrides: dict) -> str:
  parts = [f"{key.split('.')[-1]}={value}" for key, value in sorted(overrides.items())]
  return re.sub(r"[^A-Za-z0-9_.=+-]", "_", ",".join(parts)) or "default"


def commands(config_file: str, study_dir: str, extra: list[str]) -> list[tuple[str, list[str]]]:
  out = []
  for overrides in load_sweep(config_file):
    workdir = os.path.join(study_dir, point_name(overrides))
    cmd = [sys.executable, "-m", "moejax.train", f"--config={config_file}", f"--workdir={workdir}"]
    cmd += [f"--config.{k}={v}" for k, v in sorted(overrides.items())] + list(extra)
    out.append((workdir, cmd))
  return out


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", required=True, help="config file, optionally with :arg")
  parser.add_argument("--study_dir", required=True, help="parent directory of the run dirs")
  parser.add_argument("--dry_run", action="store_true", help="print the commands, run nothing")
  args, extra = parser.parse_known_args(argv)
  bad = [e for e in extra if not e.startswith("--config.")]
  if bad:
    parser.error(f"unexpected arguments {bad}; only --config.k=v overrides may follow")
  runs = commands(args.config, args.study_dir, extra)
  failed = 0
  for workdir, cmd in runs:
    print(shlex.join(cmd), flush=True)
    if args.dry_run:
      continue
    os.makedirs(workdir, exist_ok=True)
    if subprocess.call(cmd) != 0:
      failed += 1
      print(f"sweep point failed: {workdir}", file=sys.stderr)
  if not args.dry_run:
    print(f"{len(runs) - failed}/{len(runs)} runs finished; tensorboard --logdir {args.study_dir}")
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
