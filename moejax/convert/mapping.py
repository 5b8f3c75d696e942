"""Per-architecture maps between Hugging Face `transformers` checkpoints and moejax.

Two halves, both pure (no I/O):
  * config: HF `config.json` dict <-> `ModelConfig` (`to_model_config`, `to_hf_config`); anything
    moejax cannot reproduce exactly raises `UnsupportedError` naming the field or architecture.
  * weights: `weight_rules(cfg, arch, ...)` lists `Rule`s, each mapping a few HF tensors to a few
    moejax variables (dotted nnx paths) and back. HF `nn.Linear` weights are [out, in]; moejax keeps
    [in, out] with heads split out (`wq_DxHxDh`), experts stacked (`w_gate_EDF`).

Architectures (HF modeling files of transformers 5.x):
  Mixtral (arXiv 2401.04088): softmax top-2, renormalised. OLMoE (arXiv 2409.02060): softmax top-k,
  not renormalised, QK-norm over all heads. Qwen3-MoE: top-k (renormalised when norm_topk_prob),
  per-head QK-norm, `mlp_only_layers`/`decoder_sparse_step` -> moejax's layer pattern.
  DeepSeek-V3 (arXiv 2412.19437): MLA (`moejax.model.mla`), sigmoid scores plus
  `e_score_correction_bias` (= the ALF-LB `RouterBias`, arXiv 2408.15664 Eq. 3) for selection,
  group-limited routing, shared experts, `first_k_dense_replace`, `routed_scaling_factor`.
  DeepSeek's interleaved RoPE (`rope_interleave`) is a fixed permutation of the RoPE output rows of
  `q_b_proj`/`kv_a_proj_with_mqa`; it is applied at import and undone at export.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import numpy as np

from moejax.model.config import ModelConfig

ARCHITECTURES = {"MixtralForCausalLM": "mixtral", "OlmoeForCausalLM": "olmoe",
                 "Qwen3MoeForCausalLM": "qwen3_moe", "DeepseekV3ForCausalLM": "deepseek_v3"}
ARCH_CLASS = {v: k for k, v in ARCHITECTURES.items()}
DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


class UnsupportedError(ValueError):
  """An HF checkpoint (or a moejax model, on export) that cannot be converted exactly."""


class Rule(NamedTuple):
  ours: tuple[str, ...]                                  # dotted nnx paths
  theirs: tuple[str, ...]                                # HF tensor names
  load: Callable[[list[np.ndarray]], list[np.ndarray]]   # HF arrays -> moejax arrays
  save: Callable[[list[np.ndarray]], list[np.ndarray]]   # moejax arrays -> HF arrays


# ----------------------------------------------------------------------------------------------
# Config.
# ----------------------------------------------------------------------------------------------

def architecture(hf: dict) -> str:
  archs = hf.get("architectures") or []
  known = [ARCHITECTURES[a] for a in archs if a in ARCHITECTURES]
  if not known:
    raise UnsupportedError(f"config.json: architectures={archs!r} is not supported; expected one of "
                           f"{sorted(ARCHITECTURES)}")
  return known[0]


def _get(hf: dict, *names: str, default: Any = None) -> Any:
  for n in names:
    if hf.get(n) is not None:
      return hf[n]
  return default


def _reject(hf: dict, field: str, ok: Callable[[Any], bool], expected: str) -> None:
  if field in hf and not ok(hf[field]):
    raise UnsupportedError(f"config.json: {field}={hf[field]!r} is not supported; expected {expected}")


def _rope_theta(hf: dict) -> float:
  params = hf.get("rope_parameters") or {}
  scaling = hf.get("rope_scaling") or {}
  for field, p in (("rope_parameters", params), ("rope_scaling", scaling)):
    kind = p.get("rope_type", p.get("type", "default"))
    if kind not in (None, "default"):
      raise UnsupportedError(f"config.json: {field}.rope_type={kind!r} (RoPE scaling, e.g. YaRN) is "
                             "not supported yet; expected 'default' or no scaling")
  return float(_get(params, "rope_theta", default=_get(hf, "rope_theta", default=10000.0)))


def _layer_pattern(moe_layers: list[int], num_layers: int) -> tuple[int, int]:
  """(num_dense_layers, moe_every) reproducing exactly this set of MoE layers."""
  for dense in range(num_layers + 1):
    for every in range(1, num_layers + 1):
      pattern = [i for i in range(dense, num_layers) if (i - dense) % every == 0]
      if pattern == moe_layers:
        return dense, every
  raise UnsupportedError(f"config.json: MoE layers {moe_layers} (from mlp_only_layers / "
                         "decoder_sparse_step) do not follow moejax's pattern of leading dense "
                         "layers then an MoE layer every k layers")


def to_model_config(hf: dict, *, param_dtype: str | None = None, compute_dtype: str | None = None,
                    max_seq_len: int | None = None) -> ModelConfig:
  """`ModelConfig` reproducing an HF config exactly (or `UnsupportedError` naming the field)."""
  arch = architecture(hf)
  _reject(hf, "hidden_act", lambda v: v == "silu", "'silu' (SwiGLU experts)")
  for field in ("attention_bias", "mlp_bias"):
    _reject(hf, field, lambda v: not v, "false (moejax projections have no bias)")
  _reject(hf, "quantization_config", lambda v: not v, "an unquantised (bf16/fp32) checkpoint")
  _reject(hf, "pretraining_tp", lambda v: v in (None, 1), "1")
  dtype = param_dtype or DTYPES.get(str(_get(hf, "dtype", "torch_dtype", default="float32")),
                                    "float32")
  num_layers = int(hf["num_hidden_layers"])
  kw: dict[str, Any] = dict(
      vocab_size=int(hf["vocab_size"]), d_model=int(hf["hidden_size"]), num_layers=num_layers,
      num_heads=int(hf["num_attention_heads"]),
      num_kv_heads=int(_get(hf, "num_key_value_heads", default=0) or 0),
      head_dim=int(_get(hf, "head_dim", default=0) or 0),
      max_seq_len=int(max_seq_len or _get(hf, "max_position_embeddings", default=4096)),
      rope_theta=_rope_theta(hf), norm_eps=float(_get(hf, "rms_norm_eps", default=1e-6)),
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
      param_dtype=dtype, compute_dtype=compute_dtype or ("float32" if dtype == "float32" else dtype),
      num_experts=int(_get(hf, "num_local_experts", "num_experts", "n_routed_experts")),
      top_k=int(hf["num_experts_per_tok"]), score_fn="softmax",
      renormalize=bool(hf.get("norm_topk_prob", arch == "mixtral")),
      aux_loss_coef=float(_get(hf, "router_aux_loss_coef", default=1e-2)),
      balance=("aux_loss",))
  if arch == "mixtral":
    window = hf.get("sliding_window")
    if window is not None:  # attention is exact for sequences no longer than the window.
      kw["max_seq_len"] = min(kw["max_seq_len"], int(window))
    kw.update(ff_dim=int(hf["intermediate_size"]), renormalize=True,
              router_jitter=float(hf.get("router_jitter_noise") or 0.0))
  elif arch == "olmoe":
    _reject(hf, "clip_qkv", lambda v: v is None, "null (no q/k/v clipping)")
    kw.update(ff_dim=int(hf["intermediate_size"]), qk_norm=True, qk_norm_scope="all")
  elif arch == "qwen3_moe":
    _reject(hf, "use_sliding_window", lambda v: not v, "false")
    step = int(hf.get("decoder_sparse_step") or 1)
    dense_only = set(hf.get("mlp_only_layers") or [])
    moe = [i for i in range(num_layers) if i not in dense_only and (i + 1) % step == 0]
    dense, every = _layer_pattern(moe, num_layers) if moe else (num_layers, 1)
    kw.update(ff_dim=int(hf["intermediate_size"]), expert_ff_dim=int(hf["moe_intermediate_size"]),
              qk_norm=True, qk_norm_scope="head", num_dense_layers=dense, moe_every=every)
  else:  # deepseek_v3
    _reject(hf, "scoring_func", lambda v: v in (None, "sigmoid"), "'sigmoid'")
    _reject(hf, "topk_method", lambda v: v in (None, "noaux_tc"), "'noaux_tc'")
    _reject(hf, "moe_layer_freq", lambda v: v in (None, 1), "1")
    groups = int(hf.get("n_group") or 1)
    dn, dr = int(hf["qk_nope_head_dim"]), int(hf["qk_rope_head_dim"])
    kw.update(ff_dim=int(hf["intermediate_size"]), expert_ff_dim=int(hf["moe_intermediate_size"]),
              num_shared_experts=int(hf.get("n_shared_experts") or 0),
              num_dense_layers=min(int(hf.get("first_k_dense_replace") or 0), num_layers),
              score_fn="sigmoid", renormalize=bool(hf.get("norm_topk_prob", True)),
              routed_scaling_factor=float(hf.get("routed_scaling_factor") or 1.0),
              n_groups=groups if groups > 1 else 0,
              topk_groups=int(hf.get("topk_group") or 1) if groups > 1 else 0,
              balance=("alf_lb", "seq_aux_loss"), attention="mla", num_kv_heads=0,
              head_dim=dn + dr, q_lora_rank=int(hf.get("q_lora_rank") or 0),
              kv_lora_rank=int(hf["kv_lora_rank"]), qk_nope_head_dim=dn, qk_rope_head_dim=dr,
              v_head_dim=int(hf["v_head_dim"]))
  return ModelConfig(**kw)


def infer_architecture(cfg: ModelConfig) -> str:
  """The HF architecture that represents a (native) moejax model exactly, or UnsupportedError."""
  bad = [n for n in ("num_zero_experts", "num_copy_experts", "num_const_experts")
         if getattr(cfg, n)] + (["gating_residual"] if cfg.gating_residual else [])
  if cfg.num_experts == 0:
    bad.append("num_experts=0 (dense)")
  if cfg.attention == "mla" or cfg.score_fn == "sigmoid" or cfg.num_shared_experts or cfg.n_groups:
    arch = "deepseek_v3"
    if cfg.attention != "mla":
      bad.append("attention='mha' with DeepSeek routing/shared experts")
    if cfg.score_fn != "sigmoid":
      bad.append("score_fn='softmax' with MLA")
    if cfg.moe_every != 1:
      bad.append("moe_every != 1 with MLA")
  elif cfg.qk_norm:
    arch = "olmoe" if cfg.qk_norm_scope == "all" else "qwen3_moe"
    if arch == "olmoe" and (cfg.num_dense_layers or cfg.moe_every != 1):
      bad.append("dense layers with OLMoE-style QK-norm")
  else:
    arch = "mixtral"
    if not cfg.renormalize or cfg.num_dense_layers or cfg.moe_every != 1:
      bad.append("renormalize=False or dense layers without QK-norm")
  if cfg.routed_scaling_factor != 1.0 and arch != "deepseek_v3":
    bad.append("routed_scaling_factor != 1")
  if bad:
    raise UnsupportedError(f"export: no transformers architecture matches this model ({', '.join(bad)})")
  return arch


def to_hf_config(cfg: ModelConfig, arch: str, base: dict | None = None) -> dict:
  """An HF config.json dict for `cfg` (fields of `base`, e.g. the imported original, are kept)."""
  hf = dict(base or {})
  hf.pop("rope_scaling", None)
  hf.update(architectures=[ARCH_CLASS[arch]], model_type=arch, vocab_size=cfg.vocab_size,
            hidden_size=cfg.d_model, num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.kv_heads,
            max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
            rope_parameters={"rope_theta": cfg.rope_theta, "rope_type": "default"},
            tie_word_embeddings=cfg.tie_embeddings, hidden_act="silu", dtype=cfg.param_dtype,
            num_experts_per_tok=cfg.top_k, norm_topk_prob=cfg.renormalize,
            router_aux_loss_coef=cfg.aux_loss_coef, intermediate_size=cfg.ff_dim)
  if arch == "mixtral":
    hf.update(num_local_experts=cfg.num_experts, intermediate_size=cfg.expert_hidden,
              head_dim=cfg.head_dim or None, router_jitter_noise=cfg.router_jitter)
    if hf.get("sliding_window") is not None:
      hf["sliding_window"] = cfg.max_seq_len
  elif arch == "olmoe":
    hf.update(num_experts=cfg.num_experts, intermediate_size=cfg.expert_hidden, clip_qkv=None)
  elif arch == "qwen3_moe":
    moe = set(cfg.moe_layers)
    hf.update(num_experts=cfg.num_experts, moe_intermediate_size=cfg.expert_hidden,
              head_dim=cfg.head_dim or None, decoder_sparse_step=1,
              mlp_only_layers=[i for i in range(cfg.num_layers) if i not in moe])
  else:
    hf.update(n_routed_experts=cfg.num_experts, moe_intermediate_size=cfg.expert_hidden,
              n_shared_experts=cfg.num_shared_experts, first_k_dense_replace=cfg.num_dense_layers,
              routed_scaling_factor=cfg.routed_scaling_factor, n_group=cfg.n_groups or 1,
              topk_group=cfg.topk_groups or 1, q_lora_rank=cfg.q_lora_rank or None,
              kv_lora_rank=cfg.kv_lora_rank, qk_nope_head_dim=cfg.qk_nope_head_dim,
              qk_rope_head_dim=cfg.qk_rope_head_dim, v_head_dim=cfg.v_head_dim,
              head_dim=cfg.qk_rope_head_dim, rope_interleave=bool(hf.get("rope_interleave", True)))
  return hf


# ----------------------------------------------------------------------------------------------
# Weights.
# ----------------------------------------------------------------------------------------------

def _identity() -> tuple[Callable, Callable]:
  return (lambda a: list(a)), (lambda a: list(a))


def _linear(n_in: int, shape: tuple[int, ...]) -> tuple[Callable, Callable]:
  """HF [prod(out), prod(in)] <-> moejax in_dims + out_dims (`shape`, first `n_in` axes are in)."""
  n = int(np.prod(shape[:n_in]))
  return (lambda a: [a[0].T.reshape(shape)]), (lambda a: [a[0].reshape(n, -1).T])


def _stacked(num: int) -> tuple[Callable, Callable]:
  """E per-expert HF [out, in] tensors <-> one moejax [E, in, out]."""
  return (lambda a: [np.stack([w.T for w in a])]), (lambda a: [a[0][e].T for e in range(num)])


def _perm_rows(perm: np.ndarray | None, lo: int, hi: int, axis: int, a: np.ndarray) -> np.ndarray:
  if perm is None:
    return a
  idx = np.arange(a.shape[axis])
  idx[lo:hi] = lo + perm
  return np.take(a, idx, axis=axis)


def rope_permutation(dim: int, interleave: bool) -> tuple[np.ndarray | None, np.ndarray | None]:
  """(import, export) row permutations turning DeepSeek's interleaved RoPE pairs (x0,x1),(x2,x3)..
  into the rotate-half layout [x0, x2, ..; x1, x3, ..] and back; (None, None) when not interleaved."""
  if not interleave:
    return None, None
  perm = np.concatenate([np.arange(0, dim, 2), np.arange(1, dim, 2)])
  return perm, np.argsort(perm)


def _mla_rules(cfg: ModelConfig, p: str, o: str, interleave: bool) -> list[Rule]:
  d, h, r = cfg.d_model, cfg.num_heads, cfg.kv_lora_rank
  dn, dr, dv, rq = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.q_lora_rank
  fwd, bwd = rope_permutation(dr, interleave)
  dq = dn + dr

  def q_load(a, n_in_shape):
    w = a[0].reshape(h, dq, -1)
    return [_perm_rows(fwd, dn, dq, 1, w).reshape(h * dq, -1).T.reshape(n_in_shape)]

  def q_save(a):
    w = a[0].reshape(a[0].shape[0], h, dq).transpose(1, 2, 0)
    return [_perm_rows(bwd, dn, dq, 1, w).reshape(h * dq, -1)]

  rules = []
  if rq:
    rules += [Rule((f"{o}.wq_a_DxQ",), (f"{p}.q_a_proj.weight",), *_linear(1, (d, rq))),
              Rule((f"{o}.q_a_norm.scale",), (f"{p}.q_a_layernorm.weight",), *_identity()),
              Rule((f"{o}.wq_b_QxHxDq",), (f"{p}.q_b_proj.weight",),
                   lambda a: q_load(a, (rq, h, dq)), q_save)]
  else:
    rules.append(Rule((f"{o}.wq_DxHxDq",), (f"{p}.q_proj.weight",),
                      lambda a: q_load(a, (d, h, dq)), q_save))

  def kv_a_load(a):
    w = _perm_rows(fwd, r, r + dr, 0, a[0])
    return [w[:r].T, w[r:].T]

  def kv_b_load(a):
    w = a[0].reshape(h, dn + dv, r)
    return [w[:, :dn].transpose(2, 0, 1), w[:, dn:].transpose(2, 0, 1)]

  rules += [
      Rule((f"{o}.wkv_a_DxR", f"{o}.wk_rope_DxDr"), (f"{p}.kv_a_proj_with_mqa.weight",), kv_a_load,
           lambda a: [_perm_rows(bwd, r, r + dr, 0, np.concatenate([a[0].T, a[1].T], axis=0))]),
      Rule((f"{o}.kv_a_norm.scale",), (f"{p}.kv_a_layernorm.weight",), *_identity()),
      Rule((f"{o}.wk_b_RxHxDn", f"{o}.wv_b_RxHxDv"), (f"{p}.kv_b_proj.weight",), kv_b_load,
           lambda a: [np.concatenate([a[0].transpose(1, 2, 0), a[1].transpose(1, 2, 0)],
                                     axis=1).reshape(h * (dn + dv), r)]),
      Rule((f"{o}.wo_HxDvxD",), (f"{p}.o_proj.weight",), *_linear(2, (h, dv, d)))]
  return rules


def _mlp_rules(cfg: ModelConfig, p: str, o: str, hidden: int, names=("gate_proj", "up_proj",
                                                                        "down_proj")) -> list[Rule]:
  d = cfg.d_model
  return [Rule((f"{o}.w_gate_DxF",), (f"{p}.{names[0]}.weight",), *_linear(1, (d, hidden))),
          Rule((f"{o}.w_up_DxF",), (f"{p}.{names[1]}.weight",), *_linear(1, (d, hidden))),
          Rule((f"{o}.w_down_FxD",), (f"{p}.{names[2]}.weight",), *_linear(1, (hidden, d)))]


def _expert_rules(cfg: ModelConfig, p: str, o: str, names: tuple[str, str, str],
                  fused: bool) -> list[Rule]:
  e, f = cfg.num_experts, cfg.expert_hidden
  if fused:  # transformers >= 5 in-memory layout: gate_up_proj [E, 2F, D], down_proj [E, D, F].
    return [Rule((f"{o}.w_gate_EDF", f"{o}.w_up_EDF"), (f"{p}.experts.gate_up_proj",),
                 lambda a: [a[0][:, :f].transpose(0, 2, 1), a[0][:, f:].transpose(0, 2, 1)],
                 lambda a: [np.concatenate([a[0], a[1]], axis=2).transpose(0, 2, 1)]),
            Rule((f"{o}.w_down_EFD",), (f"{p}.experts.down_proj",),
                 lambda a: [a[0].transpose(0, 2, 1)], lambda a: [a[0].transpose(0, 2, 1)])]
  return [Rule((f"{o}.{ours}",), tuple(f"{p}.experts.{i}.{name}.weight" for i in range(e)),
               *_stacked(e))
          for ours, name in zip(("w_gate_EDF", "w_up_EDF", "w_down_EFD"), names)]


def weight_rules(cfg: ModelConfig, arch: str, *, interleave: bool = True,
                 fused_experts: bool = False) -> list[Rule]:
  """Every tensor of an HF checkpoint of `arch`, mapped onto `Transformer(cfg)`'s variables."""
  d, h, g, dh = cfg.d_model, cfg.num_heads, cfg.kv_heads, cfg.head_size
  rules = [Rule(("embed.embedding_VxD",), ("model.embed_tokens.weight",), *_identity()),
           Rule(("final_norm.scale",), ("model.norm.weight",), *_identity())]
  if not cfg.tie_embeddings:
    rules.append(Rule(("lm_head_DxV",), ("lm_head.weight",), *_linear(1, (d, cfg.vocab_size))))
  moe_name = "block_sparse_moe" if arch == "mixtral" else "mlp"
  expert_names = (("w1", "w3", "w2") if arch == "mixtral" else ("gate_proj", "up_proj", "down_proj"))
  for i in range(cfg.num_layers):
    p, o = f"model.layers.{i}", f"blocks.{i}"
    rules += [Rule((f"{o}.attn_norm.scale",), (f"{p}.input_layernorm.weight",), *_identity()),
              Rule((f"{o}.ffn_norm.scale",), (f"{p}.post_attention_layernorm.weight",),
                   *_identity())]
    if cfg.attention == "mla":
      rules += _mla_rules(cfg, f"{p}.self_attn", f"{o}.attn", interleave)
    else:
      a = f"{p}.self_attn"
      rules += [Rule((f"{o}.attn.wq_DxHxDh",), (f"{a}.q_proj.weight",), *_linear(1, (d, h, dh))),
                Rule((f"{o}.attn.wk_DxGxDh",), (f"{a}.k_proj.weight",), *_linear(1, (d, g, dh))),
                Rule((f"{o}.attn.wv_DxGxDh",), (f"{a}.v_proj.weight",), *_linear(1, (d, g, dh))),
                Rule((f"{o}.attn.wo_HxDhxD",), (f"{a}.o_proj.weight",), *_linear(2, (h, dh, d)))]
      if cfg.qk_norm:
        rules += [Rule((f"{o}.attn.q_norm.scale",), (f"{a}.q_norm.weight",), *_identity()),
                  Rule((f"{o}.attn.k_norm.scale",), (f"{a}.k_norm.weight",), *_identity())]
    if not cfg.is_moe_layer(i):
      rules += _mlp_rules(cfg, f"{p}.mlp", f"{o}.ffn", cfg.ff_dim)
      continue
    m = f"{p}.{moe_name}"
    rules.append(Rule((f"{o}.ffn.router.w_DxE",), (f"{m}.gate.weight",),
                      *_linear(1, (d, cfg.num_experts))))
    if arch == "deepseek_v3":
      rules.append(Rule((f"{o}.ffn.router_bias_E",), (f"{m}.gate.e_score_correction_bias",),
                        *_identity()))
    rules += _expert_rules(cfg, m, f"{o}.ffn", expert_names, fused_experts)
    if cfg.num_shared_experts:
      rules += _mlp_rules(cfg, f"{m}.shared_experts", f"{o}.ffn.shared",
                          cfg.num_shared_experts * cfg.expert_hidden)
  return rules


def ignorable(name: str, num_layers: int) -> bool:
  """HF tensors with no moejax counterpart that do not change the LM's logits: RoPE buffers and
  DeepSeek-V3 multi-token-prediction layers (stored as layers >= num_hidden_layers)."""
  if name.endswith("rotary_emb.inv_freq"):
    return True
  parts = name.split(".")
  return (len(parts) > 2 and parts[:2] == ["model", "layers"] and parts[2].isdigit()
          and int(parts[2]) >= num_layers)

