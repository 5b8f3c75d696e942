"""Typed model configuration: the one place a model's hyper-parameters are defined and validated.

`ModelConfig` is a frozen dataclass. `ml_collections.ConfigDict` stays at the edge (configs/,
moejax.train); the model only ever sees this dataclass. Every impossible combination fails in
`__post_init__` with a `ConfigError` that names the field, before anything is compiled.

Dimension legend (used in names across moejax): B batch, L length, T tokens (B*L), D d_model,
H query heads, G kv heads, Dh head dim, F ffn hidden, E experts, K top-k, C capacity, V vocab.
"""

from __future__ import annotations

import dataclasses
from typing import Any

SCORE_FUNCTIONS = ("softmax", "sigmoid")
BALANCE_METHODS = ("none", "aux_loss", "seq_aux_loss", "alf_lb", "z_loss", "moepp_loss")
DISPATCH_MODES = ("dropless", "capacity")
IMPLS = ("xla", "pallas", "auto")
ATTENTION_KINDS = ("mha", "mla")
QK_NORM_SCOPES = ("head", "all")
BIAS_UPDATE_RULES = ("sign", "error")
DTYPES = ("float32", "bfloat16", "float16")


class ConfigError(ValueError):
  """An impossible or malformed configuration; the message names the offending field."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Hyper-parameters of a decoder-only (MoE) transformer.

  Layer pattern: the first `num_dense_layers` layers use a dense SwiGLU FFN; after them, layer i is an
  MoE layer iff `(i - num_dense_layers) % moe_every == 0`. `num_experts == 0` gives the dense baseline.
  Routed experts are ordered [FFN x num_experts] + [constant x n] + [copy x n] + [zero x n]
  (MoE++ official order), so index >= num_experts means a zero-computation expert.
  """

  # --- Transformer backbone ---
  vocab_size: int = 4096
  d_model: int = 128
  num_layers: int = 4
  num_heads: int = 4
  num_kv_heads: int = 0            # 0 -> num_heads (plain MHA); < num_heads gives GQA.
  head_dim: int = 0                # 0 -> d_model // num_heads.
  ff_dim: int = 512                # hidden size of dense SwiGLU FFN layers.
  max_seq_len: int = 2048          # RoPE / KV cache upper bound.
  rope_theta: float = 10000.0
  norm_eps: float = 1e-6
  qk_norm: bool = False            # RMSNorm on q and k (OLMoE, Qwen3); see qk_norm_scope.
  qk_norm_scope: str = "head"      # head: per head over Dh (Qwen3); all: over all heads H*Dh (OLMoE).
  tie_embeddings: bool = True
  init_std: float = 0.02
  param_dtype: str = "float32"
  compute_dtype: str = "bfloat16"

  # --- MoE layer pattern ---
  num_experts: int = 0             # routed FFN experts; 0 -> dense model.
  top_k: int = 2
  expert_ff_dim: int = 0           # 0 -> ff_dim. Small values give fine-grained experts.
  num_shared_experts: int = 0      # always-on experts (DeepSeekMoE), each of size expert_ff_dim.
  num_dense_layers: int = 0        # leading dense layers (DeepSeek first_k_dense_replace).
  moe_every: int = 1               # MoE layer every k layers after the dense ones.

  # --- Router ---
  score_fn: str = "softmax"        # softmax | sigmoid.
  renormalize: bool = True         # renormalise the selected K gates to sum to 1.
  routed_scaling_factor: float = 1.0   # multiplies routed gates (DeepSeek-V3 route_scale 2.5).
  n_groups: int = 0                # group-limited routing (DeepSeek-V3); 0 -> off.
  topk_groups: int = 0             # groups kept per token when n_groups > 0.
  router_jitter: float = 0.0       # multiplicative uniform noise on router input (train only).
  expert_dropout: float = 0.0      # prob. of masking a routed expert out of a token's selection (train only).

  # --- Load balancing (any combination) ---
  balance: tuple[str, ...] = ("aux_loss",)
  aux_loss_coef: float = 1e-2      # Switch/GShard alpha.
  seq_aux_loss_coef: float = 1e-4  # DeepSeek-V3 sequence-wise alpha.
  z_loss_coef: float = 1e-3        # ST-MoE c_z.
  bias_update_rate: float = 1e-3   # ALF-LB u (gamma in DeepSeek-V3).
  bias_update_rule: str = "sign"   # sign: b += u*sign(e); error: b += u*e (e = mean - load, normalised by mean).

  # --- Dispatch ---
  dispatch: str = "dropless"       # dropless | capacity.
  capacity_factor: float = 1.25
  impl: str = "xla"                # xla | pallas | auto.

  # --- MoE++ zero-computation experts (arXiv 2410.07348) ---
  num_zero_experts: int = 0
  num_copy_experts: int = 0
  num_const_experts: int = 0
  moepp_tau: float = 0.75          # eta for zero-computation experts in L_b; capacity split.
  moepp_loss_coef: float = 0.01    # beta.
  gating_residual: bool = False    # G(x^j) = W^j x^j + W_g^j G(x^{j-1}).

  # --- Multi-head latent attention (DeepSeek-V2 arXiv 2405.04434 / V3 arXiv 2412.19437) ---
  attention: str = "mha"           # mha (MHA/GQA, moejax.model.attention) | mla (moejax.model.mla).
  q_lora_rank: int = 0             # query compression rank d_c'; 0 -> full-rank query projection.
  kv_lora_rank: int = 0            # key/value latent rank d_c (what the MLA KV cache stores).
  qk_nope_head_dim: int = 0        # per-head query/key dims without RoPE (d_h).
  qk_rope_head_dim: int = 0        # decoupled RoPE dims d_h^R (one shared key head).
  v_head_dim: int = 0              # per-head value dims.

  def __post_init__(self):
    if isinstance(self.balance, str):
      object.__setattr__(self, "balance", parse_balance(self.balance))
    else:
      object.__setattr__(self, "balance", tuple(self.balance))
    _validate(self)

  # ----- Derived quantities -----
  @property
  def kv_heads(self) -> int:
    return self.num_kv_heads or self.num_heads

  @property
  def head_size(self) -> int:
    return self.head_dim or self.d_model // self.num_heads

  @property
  def expert_hidden(self) -> int:
    return self.expert_ff_dim or self.ff_dim

  @property
  def num_zc_experts(self) -> int:
    return self.num_zero_experts + self.num_copy_experts + self.num_const_experts

  @property
  def num_routed(self) -> int:
    """All experts that take part in top-k selection (FFN + zero-computation)."""
    return self.num_experts + self.num_zc_experts

  def is_moe_layer(self, layer: int) -> bool:
    if self.num_experts == 0 or layer < self.num_dense_layers:
      return False
    return (layer - self.num_dense_layers) % self.moe_every == 0

  @property
  def moe_layers(self) -> tuple[int, ...]:
    return tuple(i for i in range(self.num_layers) if self.is_moe_layer(i))

  def uses(self, method: str) -> bool:
    return method in self.balance

  def replace(self, **kw: Any) -> "ModelConfig":
    return dataclasses.replace(self, **kw)

  def active_params(self) -> int:
    """Parameters touched per token (embeddings counted once), for MFU and dense-vs-MoE matching."""
    d, dh = self.d_model, self.head_size
    attn = d * dh * (self.num_heads * 2 + self.kv_heads * 2)
    if self.attention == "mla":
      h, dq = self.num_heads, self.qk_nope_head_dim + self.qk_rope_head_dim
      q = d * self.q_lora_rank + self.q_lora_rank * h * dq if self.q_lora_rank else d * h * dq
      attn = (q + d * (self.kv_lora_rank + self.qk_rope_head_dim)
              + self.kv_lora_rank * h * (self.qk_nope_head_dim + self.v_head_dim)
              + h * self.v_head_dim * d)
    dense_ffn = 3 * d * self.ff_dim
    expert_ffn = 3 * d * self.expert_hidden
    total = self.vocab_size * d * (1 if self.tie_embeddings else 2)
    for i in range(self.num_layers):
      total += attn
      if self.is_moe_layer(i):
        total += d * self.num_routed + (self.top_k + self.num_shared_experts) * expert_ffn
      else:
        total += dense_ffn
    return total


def parse_balance(value: str) -> tuple[str, ...]:
  """'aux_loss,z_loss' -> ('aux_loss', 'z_loss'); 'none' or '' -> ()."""
  items = tuple(s.strip() for s in value.split(",") if s.strip())
  return tuple(s for s in items if s != "none")


def _require(cond: bool, field: str, expected: str, value: Any) -> None:
  if not cond:
    raise ConfigError(f"model.{field}={value!r}: expected {expected}")


def _validate(c: ModelConfig) -> None:
  for name in ("vocab_size", "d_model", "num_layers", "num_heads", "ff_dim", "max_seq_len"):
    _require(isinstance(getattr(c, name), int) and getattr(c, name) > 0, name, "a positive int",
             getattr(c, name))
  _require(c.num_kv_heads >= 0 and (c.num_kv_heads == 0 or c.num_heads % c.num_kv_heads == 0),
           "num_kv_heads", f"0 or a divisor of num_heads={c.num_heads}", c.num_kv_heads)
  _require(c.head_dim > 0 or c.d_model % c.num_heads == 0, "num_heads",
           f"a divisor of d_model={c.d_model} (or set head_dim)", c.num_heads)
  _require(c.head_size % 2 == 0, "head_dim", "an even head size (RoPE rotates pairs)", c.head_size)
  for name in ("param_dtype", "compute_dtype"):
    _require(getattr(c, name) in DTYPES, name, f"one of {DTYPES}", getattr(c, name))
  _require(c.attention in ATTENTION_KINDS, "attention", f"one of {ATTENTION_KINDS}", c.attention)
  _require(c.qk_norm_scope in QK_NORM_SCOPES, "qk_norm_scope", f"one of {QK_NORM_SCOPES}",
           c.qk_norm_scope)
  if c.attention == "mla":
    for name in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
      _require(getattr(c, name) > 0, name, "a positive int when attention='mla'", getattr(c, name))
    _require(c.q_lora_rank >= 0, "q_lora_rank", "an int >= 0 (0: full-rank queries)", c.q_lora_rank)
    _require(c.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim", "an even int (RoPE rotates pairs)",
             c.qk_rope_head_dim)
    _require(not c.qk_norm, "qk_norm", "False with attention='mla' (MLA normalises its latents)",
             c.qk_norm)
  _require(c.num_experts >= 0, "num_experts", "an int >= 0", c.num_experts)
  _require(0 <= c.num_dense_layers <= c.num_layers, "num_dense_layers",
           f"between 0 and num_layers={c.num_layers}", c.num_dense_layers)
  _require(c.moe_every >= 1, "moe_every", "an int >= 1", c.moe_every)
  _require(c.score_fn in SCORE_FUNCTIONS, "score_fn", f"one of {SCORE_FUNCTIONS}", c.score_fn)
  _require(c.dispatch in DISPATCH_MODES, "dispatch", f"one of {DISPATCH_MODES}", c.dispatch)
  _require(c.impl in IMPLS, "impl", f"one of {IMPLS}", c.impl)
  _require(c.bias_update_rule in BIAS_UPDATE_RULES, "bias_update_rule",
           f"one of {BIAS_UPDATE_RULES}", c.bias_update_rule)
  for method in c.balance:
    _require(method in BALANCE_METHODS, "balance",
             f"a comma-separated subset of {BALANCE_METHODS}, got unknown method {method!r}",
             ",".join(c.balance))
  for name in ("num_zero_experts", "num_copy_experts", "num_const_experts", "num_shared_experts",
               "n_groups", "topk_groups", "expert_ff_dim"):
    _require(getattr(c, name) >= 0, name, "an int >= 0", getattr(c, name))
  _require(0.0 <= c.router_jitter < 1.0, "router_jitter", "a float in [0, 1)", c.router_jitter)
  _require(0.0 <= c.expert_dropout < 1.0, "expert_dropout", "a float in [0, 1)", c.expert_dropout)
  _require(c.capacity_factor > 0, "capacity_factor", "a float > 0", c.capacity_factor)
  if c.num_experts == 0:
    _require(c.num_zc_experts == 0, "num_experts",
             "> 0 when MoE++ zero-computation experts are configured", c.num_experts)
    return
  _require(1 <= c.top_k <= c.num_routed, "top_k",
           f"between 1 and the number of routed experts ({c.num_routed})", c.top_k)
  if c.n_groups or c.topk_groups:
    _require(c.n_groups > 0 and c.num_routed % c.n_groups == 0, "n_groups",
             f"a divisor of the number of routed experts ({c.num_routed})", c.n_groups)
    _require(1 <= c.topk_groups <= c.n_groups, "topk_groups",
             f"between 1 and n_groups={c.n_groups}", c.topk_groups)
    per_group = c.num_routed // c.n_groups
    _require(c.topk_groups * per_group >= c.top_k, "topk_groups",
             f"enough groups to hold top_k={c.top_k} experts ({per_group} experts per group)",
             c.topk_groups)
  if c.uses("moepp_loss") or c.gating_residual:
    _require(c.score_fn == "softmax", "score_fn", "'softmax' for MoE++ (its loss and residual "
             "are defined on softmax router probabilities)", c.score_fn)
  _require(0.0 < c.moepp_tau <= 1.0, "moepp_tau", "a float in (0, 1]", c.moepp_tau)
