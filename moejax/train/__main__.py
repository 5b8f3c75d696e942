"""python -m moejax.train --config=configs/alf_lb.py --workdir=runs/x [--config.moe.top_k=4 ...]

Intentionally short: parse flags, initialise jax.distributed when asked, call the library.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, tb/, metrics.jsonl).")
_MAX_STEPS_THIS_RUN = flags.DEFINE_integer(
    "max_steps_this_run", None, "Stop (after saving a checkpoint) once this many steps ran in this "
    "invocation; the next invocation resumes. For schedulers with a wall-clock limit per job.")
flags.mark_flags_as_required(["config", "workdir"])
try:  # defines --coordinator_address/--num_processes/--process_id before app.run parses argv.
  from moejax.parallel import distributed as _distributed  # pylint: disable=unused-import
except ImportError:
  pass


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)   # orbax logs every file it writes at INFO.
  from moejax.data import DataError  # pylint: disable=g-import-not-at-top
  from moejax.model.config import ConfigError  # pylint: disable=g-import-not-at-top
  from moejax.train import trainer  # pylint: disable=g-import-not-at-top
  try:
    from moejax.parallel import distributed  # pylint: disable=g-import-not-at-top
    distributed.initialize_from_flags()
  except ImportError:
    pass
  try:
    result = trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value,
                                         max_steps_this_run=_MAX_STEPS_THIS_RUN.value)
  except (ConfigError, DataError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  summary = {k: v for k, v in result.items() if not k.startswith("max_vio_") or "/" not in k}
  print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                 for k, v in sorted(summary.items()) if "/" not in k))


def run():
  app.run(main)


if __name__ == "__main__":
  run()
