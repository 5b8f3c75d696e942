"""MoE++ (arXiv 2410.07348): 8 FFN experts + zero, copy and 2 constant experts, gating residuals,
heterogeneous load-balance loss (Eq. 7, tau = 0.75, beta = 0.01), top-2 softmax routing.
  python -m moejax.train --config=configs/moepp.py --workdir=runs/moepp
"""
from moejax.train import config_lib


def get_config(arg=None):
  args = config_lib.parse_arg(arg, smoke=False)
  config = config_lib.default_config()
  config.moe.update(score_fn="softmax", top_k=2, num_zero_experts=1, num_copy_experts=1,
                    num_const_experts=2, gating_residual=True, balance="moepp_loss,z_loss",
                    moepp_tau=0.75, moepp_loss_coef=0.01)
  if args["smoke"]:
    config_lib.shrink_for_smoke(config)
  return config
