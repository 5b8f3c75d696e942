"""Dense baseline with the same active parameters per token as the base MoE (top-2 of ff 128).

A dense SwiGLU of ff_dim = top_k * expert_ff_dim = 256 matches the routed FFN compute of base.py
(the router's D*E parameters aside).
  python -m moejax.train --config=configs/dense.py --workdir=runs/dense
"""
from moejax.train import config_lib


def get_config(arg=None):
  args = config_lib.parse_arg(arg, smoke=False)
  config = config_lib.default_config()
  config.model.ff_dim = config.moe.top_k * config.moe.expert_ff_dim
  config.moe.num_experts = 0
  config.moe.balance = "none"
  if args["smoke"]:
    config_lib.shrink_for_smoke(config)
    config.model.ff_dim = 64
  return config
