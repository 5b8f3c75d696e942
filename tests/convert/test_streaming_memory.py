"""Streaming conversion (issue 8): `import_hf` / `export_run` hold about one layer, not the model.

A random 6-layer OLMoE (each layer ~51 MB fp32, mostly its three stacked-expert variables of 16.8 MB)
is built with `transformers`; `_memory_probe` converts it in a fresh process and reports the peak
RSS above the RSS just before import and before export. glibc is run with a fixed mmap threshold
(1 MiB), so freed blocks of a few MB go back to the kernel at once and RSS follows live memory rather
than per-thread free lists (whose retention varies from run to run). The whole-model path before
streaming peaked at ~2.2x the model on import and ~3x on export, and fails every bound below.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

try:
  import torch
  import transformers
  HAVE_HF = True
except ImportError:
  HAVE_HF = False

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHARD_BYTES = 20_000_000


def _olmoe(out_dir: str, *, layers: int, hidden: int, expert_hidden: int, experts: int) -> None:
  torch.manual_seed(0)
  cfg = transformers.OlmoeConfig(
      vocab_size=1024, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
      num_key_value_heads=4, intermediate_size=expert_hidden, num_experts=experts,
      num_experts_per_tok=2, rms_norm_eps=1e-5, max_position_embeddings=128,
      tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=0)
  transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(out_dir)


@pytest.mark.skipif(not HAVE_HF, reason="needs torch and transformers (the `reference` extra)")
@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc")
def test_import_and_export_peak_memory_is_about_one_layer(tmp_path):
  from safetensors import safe_open
  warmup, hf_dir, work = (str(tmp_path / n) for n in ("warmup", "hf", "work"))
  _olmoe(warmup, layers=1, hidden=64, expert_hidden=32, experts=4)
  _olmoe(hf_dir, layers=6, hidden=256, expert_hidden=1024, experts=16)
  with safe_open(os.path.join(hf_dir, "model.safetensors"), "numpy") as f:
    sizes = {n: int(np.prod(f.get_slice(n).get_shape())) * 4 for n in f.keys()}
  model_bytes = sum(sizes.values())
  layer_bytes = max(sum(b for n, b in sizes.items() if n.startswith(f"model.layers.{i}."))
                    for i in range(6))
  assert model_bytes > 5.5 * layer_bytes > 250e6

  env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(1 << 20), JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-m", "tests.convert._memory_probe", warmup, hf_dir, work,
                         str(SHARD_BYTES)], cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-4000:]
  peaks = json.loads(proc.stdout.strip().splitlines()[-1])
  report = (f"model {model_bytes / 1e6:.0f} MB, largest layer {layer_bytes / 1e6:.0f} MB, "
            f"peaks {({k: round(v / 1e6) for k, v in peaks.items()})} MB")
  print(report)
  # Import: one batch (<= the largest variable) being produced and written, not the model.
  assert peaks["import_peak_bytes"] < min(2 * layer_bytes, model_bytes / 3), report
  # Export: one layer read from the checkpoint plus the shard being filled.
  assert peaks["export_peak_bytes"] < min(2 * layer_bytes + 2 * SHARD_BYTES, model_bytes / 2), report

  with open(os.path.join(work, "export", "model.safetensors.index.json"), encoding="utf-8") as f:
    weight_map = json.load(f)["weight_map"]
  assert sorted(weight_map) == sorted(sizes)
  name = "model.layers.5.mlp.experts.15.down_proj.weight"
  with safe_open(os.path.join(hf_dir, "model.safetensors"), "numpy") as f:
    want = f.get_tensor(name)
  with safe_open(os.path.join(work, "export", weight_map[name]), "numpy") as f:
    np.testing.assert_array_equal(f.get_tensor(name), want)
