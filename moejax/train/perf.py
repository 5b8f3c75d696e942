"""Model FLOPs per token and device peak FLOP/s, for MFU (model FLOPs utilisation).

MFU counts *active*-parameter FLOPs (the experts a token actually visits), the usual convention for
MoE (e.g. PaLM appendix B for the 6N + attention term).
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp

from moejax.model.config import ModelConfig

# Dense bf16 peak FLOP/s per device (vendor figures, no sparsity).
_PEAK_BY_KIND = {
    "H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "L4": 121e12,
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v6": 918e12,
}


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  """Training FLOPs per token: 6 * active non-embedding params + 12 * layers * seq_len * H * Dh."""
  active = cfg.active_params() - cfg.vocab_size * cfg.d_model * (1 if cfg.tie_embeddings else 2)
  lm_head = cfg.vocab_size * cfg.d_model
  attention = 12 * cfg.num_layers * seq_len * cfg.num_heads * cfg.head_size / 2  # causal half
  return 6.0 * (active + lm_head) + attention


@functools.lru_cache(maxsize=None)
def _measured_peak() -> float:
  """Best-of-3 fp32 matmul throughput of device 0 (for devices missing from the table, e.g. CPU)."""
  n = 512
  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  best = float("inf")
  for _ in range(3):
    t0 = time.perf_counter()
    f(a).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return 2 * n**3 / best


def peak_flops_per_device(configured_tflops: float = 0.0) -> float:
  if configured_tflops > 0:
    return configured_tflops * 1e12
  kind = jax.devices()[0].device_kind
  for name, peak in _PEAK_BY_KIND.items():
    if name.lower() in kind.lower():
      return peak
  return _measured_peak()
