"""Base MoE: 4 layers, d_model 128, 8 experts of ff 128, top-2, Switch auxiliary loss.

Sized for a 2-core CPU (about a minute for 200 steps). Launch:
  python -m moejax.train --config=configs/base.py --workdir=runs/base
  python -m moejax.train --config=configs/base.py:smoke --workdir=/tmp/smoke    # 2 steps
GPU: add --config.model.compute_dtype=bfloat16 and scale model/train fields.
"""
from moejax.train import config_lib


def get_config(arg=None):
  args = config_lib.parse_arg(arg, smoke=False)
  config = config_lib.default_config()
  config.moe.balance = "aux_loss"
  if args["smoke"]:
    config_lib.shrink_for_smoke(config)
  return config
