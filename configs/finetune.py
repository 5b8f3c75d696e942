"""Fine-tune a trained or imported model (e.g. an HF checkpoint converted with moejax.convert).

The model, MoE and data sections come from the source run's config.json (they must match its
weights; an import also sets its tokenizer.json), its weights and ALF-LB biases from its latest
checkpoint (`train.init_from`), with fresh AdamW state at step 0 and a fine-tuning schedule:
  python -m moejax.convert.hf --hf_dir ~/hf/OLMoE-1B-7B-0924 --out runs/olmoe
  python -m moejax.train --config=configs/finetune.py:runs/olmoe --workdir=runs/olmoe_ft \
      --config.moe.balance=alf_lb --config.moe.bias_update_rate=1e-3
The source run is only read; the fine-tuned run has its own workdir (it resumes there as usual).
"""
import os

from moejax.model.config import ConfigError
from moejax.train import config_lib


def get_config(arg=None):
  if not arg:
    raise ConfigError("configs/finetune.py needs the run to start from: "
                      "--config=configs/finetune.py:<run dir or W/checkpoints/<step>>")
  source = os.path.abspath(arg)
  root = source   # W/checkpoints/<step>: the run's config is two levels up.
  if not os.path.isfile(os.path.join(root, "config.json")):
    root = os.path.dirname(os.path.dirname(source))
  if not os.path.isfile(os.path.join(root, "config.json")):
    raise ConfigError(f"configs/finetune.py:{arg}: no config.json there (expected a moejax run "
                      "directory or one of its checkpoints/<step> directories)")
  with open(os.path.join(root, "config.json"), encoding="utf-8") as f:
    config = config_lib.from_json(f.read())
  tokenizer = os.path.join(root, "tokenizer.json")   # the source's token ids, not a new BPE.
  if not config.data.tokenizer and os.path.isfile(tokenizer):
    config.data.tokenizer = tokenizer
  config.train.update(init_from=source, num_steps=200, eval_every=50, checkpoint_every=50)
  config.opt.update(lr=1e-5, warmup_steps=10, min_lr_ratio=0.1, weight_decay=0.0)
  return config
