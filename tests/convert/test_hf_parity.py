"""HF `transformers` parity of `moejax.convert` (issue 8).

For each architecture a tiny random model is built with `transformers` (config in code, random norm
gains and DeepSeek-V3 router biases so every tensor matters), saved as safetensors, converted to a
moejax run directory and loaded with `moejax.load`. Checks: fp32 logits within 1e-4 of HF with and
without left padding (HF attention mask <-> moejax segment id 0), 32 greedy tokens through the moejax
KV cache identical to `generate(do_sample=False)`, and export -> re-import bitwise (the exported
safetensors also equal the originals bitwise). The torch-free tests check the config errors and MLA's
absorbed decode path against the expanded one.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax.convert import mapping
from moejax.convert.mapping import UnsupportedError

try:
  import torch
  import transformers
  HAVE_HF = True
except ImportError:  # the optional `reference` extra (torch CPU + transformers) is not installed.
  HAVE_HF = False
needs_hf = pytest.mark.skipif(not HAVE_HF, reason="needs torch and transformers (the `reference` "
                              "extra: pip install torch==2.13.0 transformers)")

TINY = dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            rms_norm_eps=1e-5, max_position_embeddings=128, tie_word_embeddings=False,
            bos_token_id=None, eos_token_id=None, pad_token_id=0)
ARCHS = {
    "mixtral": lambda: transformers.MixtralConfig(
        **TINY, intermediate_size=48, num_key_value_heads=2, num_local_experts=4,
        num_experts_per_tok=2),
    "olmoe": lambda: transformers.OlmoeConfig(
        **TINY, intermediate_size=32, num_key_value_heads=4, num_experts=8, num_experts_per_tok=4,
        norm_topk_prob=False),
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(
        **TINY, intermediate_size=96, moe_intermediate_size=32, num_key_value_heads=2, head_dim=16,
        num_experts=8, num_experts_per_tok=4, norm_topk_prob=True, mlp_only_layers=[0]),
    "deepseek_v3": lambda: transformers.DeepseekV3Config(
        **TINY, intermediate_size=96, moe_intermediate_size=32, num_key_value_heads=4,
        n_routed_experts=8, num_experts_per_tok=4, n_group=4, topk_group=2, n_shared_experts=1,
        first_k_dense_replace=1, q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=8,
        qk_rope_head_dim=8, v_head_dim=16, routed_scaling_factor=2.5),
    "deepseek_v3_noqlora": lambda: transformers.DeepseekV3Config(
        **TINY, intermediate_size=96, moe_intermediate_size=32, num_key_value_heads=4,
        n_routed_experts=8, num_experts_per_tok=2, n_group=1, topk_group=1, n_shared_experts=2,
        first_k_dense_replace=0, q_lora_rank=None, kv_lora_rank=16, qk_nope_head_dim=8,
        qk_rope_head_dim=4, v_head_dim=8, rope_interleave=False, routed_scaling_factor=1.0),
}


# The second DeepSeek-V3 variant (full-rank queries, rotate-half RoPE, one group) is `slow`: each
# architecture costs ~3 XLA compiles, and the four main ones already cover every converter path.
@pytest.fixture(scope="module", params=["deepseek_v3", "mixtral", "olmoe", "qwen3_moe",
                                        pytest.param("deepseek_v3_noqlora", marks=pytest.mark.slow)])
def pair(request, tmp_path_factory):
  """(HF model, moejax model, HF dir, run dir) for one architecture."""
  if not HAVE_HF:
    pytest.skip("needs torch and transformers (the `reference` extra)")
  import moejax
  from moejax.convert import import_hf
  torch.manual_seed(0)
  hf_cfg = ARCHS[request.param]()
  model = transformers.AutoModelForCausalLM.from_config(hf_cfg, attn_implementation="eager",
                                                        dtype=torch.float32).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight"):
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
    for name, b in model.named_buffers():
      if name.endswith("e_score_correction_bias"):
        b.copy_(0.05 * torch.randn_like(b))
  tmp = tmp_path_factory.mktemp(request.param)
  hf_dir, run_dir = str(tmp / "hf"), str(tmp / "run")
  model.save_pretrained(hf_dir)
  import_hf(hf_dir, run_dir)
  ours, _ = moejax.load(run_dir)
  return request.param, model, ours, hf_dir, run_dir


@nnx.jit
def _forward(model, tokens, positions, segment_ids, cache=None):
  """One compiled `Transformer.forward` per shape (eager op-by-op dispatch is far slower on CPU);
  returns (logits, greedy next token of each row, cache)."""
  logits, _, cache = model.forward(tokens, positions_BxL=positions, segment_ids_BxL=segment_ids,
                                   cache=cache)
  return logits, jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32), cache


def _left_padded(rng, batch, length, pads):
  tokens = rng.integers(1, 256, size=(batch, length)).astype(np.int32)
  mask = np.ones((batch, length), np.int32)
  for row, n in enumerate(pads):
    mask[row, :n] = 0
    tokens[row, :n] = 0
  positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
  return tokens, mask, positions


def _hf_logits(model, tokens, mask=None, positions=None):
  with torch.no_grad():
    kw = {} if mask is None else dict(attention_mask=torch.tensor(mask),
                                      position_ids=torch.tensor(positions, dtype=torch.long))
    return model(torch.tensor(tokens, dtype=torch.long), **kw).logits.numpy()


@needs_hf
def test_logits_match_without_padding(pair):
  _, hf_model, ours, _, _ = pair
  tokens, mask, positions = _left_padded(np.random.default_rng(1), 3, 20, pads=(0, 0, 0))
  want = _hf_logits(hf_model, tokens)
  got = np.asarray(_forward(ours, tokens, positions, mask)[0])
  assert got.shape == want.shape
  assert np.max(np.abs(got - want)) <= 1e-4


@needs_hf
def test_logits_match_with_left_padding(pair):
  _, hf_model, ours, _, _ = pair
  tokens, mask, positions = _left_padded(np.random.default_rng(2), 3, 20, pads=(0, 5, 13))
  want = _hf_logits(hf_model, tokens, mask, positions)
  got, _, _ = _forward(ours, tokens, positions, mask)
  real = mask.astype(bool)
  assert np.max(np.abs(np.asarray(got)[real] - want[real])) <= 1e-4


def greedy_with_cache(model, tokens, mask, positions, new_tokens):
  """Greedy decoding through `Transformer.forward(cache=...)`: prefill, then one token per step."""
  b, l = tokens.shape
  cache = model.init_cache(b, l + new_tokens, dtype=jnp.float32)
  _, nxt, cache = _forward(model, tokens, positions, mask, cache)
  pos = positions[:, -1:]
  out = [nxt]
  for step in range(1, new_tokens):
    _, nxt, cache = _forward(model, nxt[:, None], pos + step, np.ones((b, 1), np.int32), cache)
    out.append(nxt)
  return np.stack([np.asarray(t) for t in out], axis=1)


@needs_hf
def test_greedy_32_tokens_through_kv_cache_match_generate(pair):
  _, hf_model, ours, _, _ = pair
  tokens, mask, positions = _left_padded(np.random.default_rng(3), 2, 8, pads=(0, 3))
  with torch.no_grad():
    hf_out = hf_model.generate(torch.tensor(tokens, dtype=torch.long),
                               attention_mask=torch.tensor(mask), max_new_tokens=32,
                               do_sample=False, eos_token_id=None, pad_token_id=0)
  want = hf_out[:, tokens.shape[1]:].numpy()
  got = greedy_with_cache(ours, tokens, mask, positions, 32)
  assert want.shape == (2, 32)
  np.testing.assert_array_equal(got, want)


@needs_hf
def test_export_reimport_is_bitwise(pair, tmp_path):
  import moejax
  from flax import nnx
  from moejax.convert import export_run, import_hf
  from safetensors.numpy import load_file
  _, _, ours, hf_dir, run_dir = pair
  out = str(tmp_path / "export")
  export_run(run_dir, out, max_shard_bytes=100_000)  # force several shards + index.
  assert os.path.isfile(os.path.join(out, "model.safetensors.index.json"))
  original = load_file(os.path.join(hf_dir, "model.safetensors"))
  exported = {}
  for f in os.listdir(out):
    if f.endswith(".safetensors"):
      exported.update(load_file(os.path.join(out, f)))
  assert sorted(exported) == sorted(original)
  for name, value in original.items():
    assert exported[name].dtype == value.dtype and np.array_equal(exported[name], value), name
  import_hf(out, str(tmp_path / "run2"))
  again, _ = moejax.load(str(tmp_path / "run2"))
  a, b = nnx.state(ours), nnx.state(again)
  leaves_a, tree_a = jax.tree.flatten(a)
  leaves_b, tree_b = jax.tree.flatten(b)
  assert tree_a == tree_b
  for x, y in zip(leaves_a, leaves_b):
    assert x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y))
  with open(os.path.join(out, "config.json"), encoding="utf-8") as f:
    assert mapping.to_model_config(json.load(f)) == ours.cfg


# ----- torch-free tests ------------------------------------------------------------------------

BASE = dict(architectures=["OlmoeForCausalLM"], vocab_size=256, hidden_size=64, num_hidden_layers=2,
            num_attention_heads=4, intermediate_size=32, num_experts=8, num_experts_per_tok=2)


@pytest.mark.parametrize("change, field", [
    (dict(architectures=["LlamaForCausalLM"]), "LlamaForCausalLM"),
    (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0}), "rope_parameters.rope_type"),
    (dict(clip_qkv=8.0), "clip_qkv"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(architectures=["Qwen3MoeForCausalLM"], moe_intermediate_size=32, num_hidden_layers=4,
          mlp_only_layers=[1]), "mlp_only_layers"),
    (dict(architectures=["DeepseekV3ForCausalLM"], scoring_func="softmax"), "scoring_func"),
])
def test_unsupported_config_names_the_field(change, field):
  with pytest.raises(UnsupportedError, match=field):
    mapping.to_model_config({**BASE, **change})


def test_qwen3_sparse_step_maps_to_layer_pattern():
  cfg = mapping.to_model_config({**BASE, "architectures": ["Qwen3MoeForCausalLM"],
                                 "moe_intermediate_size": 16, "num_hidden_layers": 6,
                                 "decoder_sparse_step": 2, "mlp_only_layers": []})
  assert cfg.moe_layers == (1, 3, 5) and cfg.expert_hidden == 16 and cfg.ff_dim == 32


def test_rope_permutation_deinterleaves_pairs_and_inverts():
  fwd, bwd = mapping.rope_permutation(8, True)
  np.testing.assert_array_equal(fwd, [0, 2, 4, 6, 1, 3, 5, 7])
  np.testing.assert_array_equal(fwd[bwd], np.arange(8))
  assert mapping.rope_permutation(8, False) == (None, None)


def test_mla_absorbed_decode_equals_expanded_attention():
  from moejax.model import mla
  rng = np.random.default_rng(0)
  b, l, s, h, dn, dr, dv, r = 2, 3, 5, 4, 6, 4, 5, 7
  q_nope, q_rope, c_kv, k_rope, w_uk, w_uv = (
      rng.standard_normal(shape).astype(np.float32)
      for shape in ((b, l, h, dn), (b, l, h, dr), (b, s, r), (b, s, dr), (r, h, dn), (r, h, dv)))
  mask = rng.random((b, l, s)) < 0.7
  args = (q_nope, q_rope, c_kv, k_rope, w_uk, w_uv, mask, 0.3)
  want = np.zeros((b, l, h, dv))  # numpy reference of V3 Eqs. 2-10.
  k = np.einsum("bsr,rhn->bshn", c_kv, w_uk)
  v = np.einsum("bsr,rhv->bshv", c_kv, w_uv)
  sc = (np.einsum("blhn,bshn->bhls", q_nope, k) + np.einsum("blhd,bsd->bhls", q_rope, k_rope)) * 0.3
  m = mask[:, None]
  e = np.where(m, np.exp(sc - np.where(m, sc, -np.inf).max(-1, keepdims=True)), 0.0)
  p = np.nan_to_num(e / e.sum(-1, keepdims=True))
  want = np.einsum("bhls,bshv->blhv", p, v)
  for fn in (mla.mla_expanded, mla.mla_absorbed):
    np.testing.assert_allclose(jax.jit(fn, static_argnums=7)(*args), want, atol=1e-4)
