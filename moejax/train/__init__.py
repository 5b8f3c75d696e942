"""Training: `train_and_evaluate(config, workdir)` and the `python -m moejax.train` entry point."""


def train_and_evaluate(config, workdir, **kwargs):
  from moejax.train.trainer import train_and_evaluate as _run  # pylint: disable=g-import-not-at-top
  return _run(config, workdir, **kwargs)
