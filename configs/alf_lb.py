"""Auxiliary-loss-free load balancing (ALF-LB, arXiv 2408.15664 Eq. 3 / Algorithm 1; DeepSeek-V3).

Same model as aux_loss.py; balancing by a per-expert selection bias updated after every optimizer
step, b_i += u * sign(mean_load - load_i), counted over the global batch. u = 1e-3 is the paper's
default for 40k-step runs; these few-hundred-step runs use 1e-2 so the bias can act in time.
  python -m moejax.train --config=configs/alf_lb.py --workdir=runs/alf_lb
  python launch/sweep.py --config=configs/alf_lb.py --study_dir=runs/study_alf   # top-k 1/2/4
"""
from moejax.train import config_lib


def get_config(arg=None):
  args = config_lib.parse_arg(arg, smoke=False, top_k=2)
  config = config_lib.default_config()
  config.moe.update(score_fn="sigmoid", renormalize=True, top_k=args["top_k"],
                    balance="alf_lb,z_loss", bias_update_rate=1e-2)
  if args["smoke"]:
    config_lib.shrink_for_smoke(config)
  return config


def get_sweep():
  return [{"moe.top_k": k, "moe.balance": b}
          for k in (1, 2, 4) for b in ("alf_lb,z_loss", "aux_loss,z_loss")]
