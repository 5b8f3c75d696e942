"""Shared helpers for the training tests: tiny configs on a small slice of the stdlib corpus."""
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)


def tiny_config(name: str = "base", **overrides):
  from moejax.train import config_lib
  config = config_lib.load_config_file(os.path.join(REPO, "configs", f"{name}.py") + ":smoke")
  config_lib.flat_overrides(config, overrides)
  return config


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
  """One tokenizer trained once per session and copied into each run dir (saves test time)."""
  return tmp_path_factory.mktemp("tok")


def seed_workdir(workdir, tokenizer_dir, config):
  """Reuses the session tokenizer (and token cache) in `workdir` when the data config matches."""
  import shutil
  from moejax.data import build_tokenizer
  from moejax.train.trainer import _data_config
  data_cfg = _data_config(config, config.train.seed)
  build_tokenizer(data_cfg, str(tokenizer_dir))
  os.makedirs(workdir, exist_ok=True)
  for name in os.listdir(tokenizer_dir):
    src = os.path.join(tokenizer_dir, name)
    if os.path.isfile(src):
      shutil.copy(src, os.path.join(workdir, name))
