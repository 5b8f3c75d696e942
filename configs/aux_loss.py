"""Auxiliary-loss balancing baseline of the ALF-LB comparison (arXiv 2408.15664 Eq. 2).

Sigmoid gates with top-k renormalisation (as the paper's main runs and DeepSeek-V3), balanced by
the Switch/GShard loss alpha * E * sum_i f_i P_i and the router z-loss. Compare with alf_lb.py,
which differs only in the balancing method.
  python -m moejax.train --config=configs/aux_loss.py --workdir=runs/aux_loss
"""
from moejax.train import config_lib


def get_config(arg=None):
  args = config_lib.parse_arg(arg, smoke=False, top_k=2)
  config = config_lib.default_config()
  config.moe.update(score_fn="sigmoid", renormalize=True, top_k=args["top_k"],
                    balance="aux_loss,z_loss", aux_loss_coef=1e-2)
  if args["smoke"]:
    config_lib.shrink_for_smoke(config)
  return config


def get_sweep():
  return [{"moe.top_k": k} for k in (1, 2, 4)]
