"""Attention against a numpy reference, document isolation, and KV-cache decoding == full forward."""

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax.model import KVCache, ModelConfig, Transformer
from moejax.model.attention import Attention

BASE = ModelConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, ff_dim=48,
                   max_seq_len=32, compute_dtype="float32", init_std=0.2)
HAS_MOE = importlib.util.find_spec("moejax.model.moe") is not None


@nnx.jit
def _forward(model, tokens, positions, segment_ids, cache):
  return model.forward(tokens, positions_BxL=positions, segment_ids_BxL=segment_ids, cache=cache)


def _np_rms(x, eps):
  return x / np.sqrt((x ** 2).mean(-1, keepdims=True) + eps)


def _np_rope(x, positions, theta):
  half = x.shape[-1] // 2
  inv_freq = theta ** (-np.arange(half) * 2 / x.shape[-1])
  z = (x[..., :half] + 1j * x[..., half:]) * np.exp(1j * positions[:, :, None, None] * inv_freq)
  return np.concatenate([z.real, z.imag], axis=-1)


def _np_attention(attn, cfg, x, positions, seg):
  """Loop-based GQA reference: query head h reads kv head h // (H // G); mask built pairwise."""
  p = {k: np.asarray(getattr(attn, k)[...], np.float64)
       for k in ("wq_DxHxDh", "wk_DxGxDh", "wv_DxGxDh", "wo_HxDhxD")}
  q = np.einsum("bld,dhk->blhk", x, p["wq_DxHxDh"])
  k = np.einsum("bld,dgk->blgk", x, p["wk_DxGxDh"])
  v = np.einsum("bld,dgk->blgk", x, p["wv_DxGxDh"])
  if cfg.qk_norm:
    q = _np_rms(q, cfg.norm_eps) * np.asarray(attn.q_norm.scale[...])
    k = _np_rms(k, cfg.norm_eps) * np.asarray(attn.k_norm.scale[...])
  q, k = _np_rope(q, positions, cfg.rope_theta), _np_rope(k, positions, cfg.rope_theta)
  b, l, h, dh = q.shape
  rep = h // k.shape[2]
  out = np.zeros_like(q)
  for bi in range(b):
    for qi in range(l):
      allowed = [s for s in range(l) if s <= qi and seg[bi, s] == seg[bi, qi] and seg[bi, qi] != 0]
      if not allowed:
        continue
      for hi in range(h):
        scores = np.array([q[bi, qi, hi] @ k[bi, s, hi // rep] for s in allowed]) / np.sqrt(dh)
        w = np.exp(scores - scores.max())
        w /= w.sum()
        out[bi, qi, hi] = sum(wi * v[bi, s, hi // rep] for wi, s in zip(w, allowed))
  return np.einsum("blhk,hkd->bld", out, p["wo_HxDhxD"])


@pytest.mark.parametrize("qk_norm", [False, True])
def test_gqa_attention_matches_numpy_with_segments(qk_norm):
  cfg = BASE.replace(qk_norm=qk_norm, num_heads=4, num_kv_heads=2)
  attn = Attention(cfg, rngs=nnx.Rngs(1))
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 6, 32)).astype(np.float32)
  seg = np.array([[1, 1, 1, 2, 2, 0], [0, 0, 3, 3, 3, 3]], np.int32)  # packing + padding
  pos = np.array([[0, 1, 2, 0, 1, 0], [0, 0, 0, 1, 2, 3]], np.int32)
  y, kv = jax.jit(lambda a, *args: nnx.merge(*a)(*args))(nnx.split(attn), jnp.asarray(x),
                                                          jnp.asarray(pos), jnp.asarray(seg))
  assert kv is None
  y = np.asarray(y)
  assert np.all(np.isfinite(y))
  np.testing.assert_allclose(y, _np_attention(attn, cfg, x.astype(np.float64), pos, seg),
                             rtol=1e-4, atol=1e-5)
  assert np.all(y[seg == 0] == 0.0)  # padding queries attend to nothing -> exactly 0


def test_packed_documents_do_not_interact():
  model = Transformer(BASE, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(1)
  doc1, doc2 = rng.integers(0, 64, size=5), rng.integers(0, 64, size=7)
  tokens = np.concatenate([doc1, doc2])[None]
  seg = np.array([[1] * 5 + [2] * 7], np.int32)
  pos = np.array([list(range(5)) + list(range(7))], np.int32)
  run = lambda t, p, s: np.asarray(_forward(model, jnp.asarray(t), jnp.asarray(p), jnp.asarray(s),
                                            None)[0])
  base = run(tokens, pos, seg)
  perturbed = tokens.copy()
  perturbed[0, :5] = (perturbed[0, :5] + 1 + rng.integers(0, 60, size=5)) % 64
  other = run(perturbed, pos, seg)
  assert np.abs(other[0, :5] - base[0, :5]).max() > 1e-3  # document 1 itself did change
  np.testing.assert_array_equal(other[0, 5:], base[0, 5:])
  alone = run(doc2[None], np.arange(7)[None], np.ones((1, 7), np.int32))
  np.testing.assert_allclose(base[0, 5:], alone[0], atol=1e-5)


def _decode_matches_full(model, tokens, seg, pos, prompt_len, max_len):
  """Prefill `prompt_len` tokens, then decode one at a time; compare with one full forward."""
  b, l = tokens.shape
  full, full_aux, _ = _forward(model, tokens, pos, seg, None)
  cache = model.init_cache(b, max_len, jnp.float32)
  logits, _, cache = _forward(model, tokens[:, :prompt_len], pos[:, :prompt_len],
                              seg[:, :prompt_len], cache)
  steps = [logits]
  for i in range(prompt_len, l):
    logits, aux, cache = _forward(model, tokens[:, i:i + 1], pos[:, i:i + 1], seg[:, i:i + 1], cache)
    steps.append(logits)
  got = np.concatenate([np.asarray(s) for s in steps], axis=1)
  valid = np.asarray(seg) != 0
  np.testing.assert_allclose(got[valid], np.asarray(full)[valid], atol=1e-5, rtol=1e-5)
  assert int(cache.index) == l
  np.testing.assert_array_equal(np.asarray(cache.segment_ids_BxS[:, :l]), np.asarray(seg))
  assert np.all(np.asarray(cache.segment_ids_BxS[:, l:]) == 0)
  return full, full_aux


@pytest.mark.parametrize("qk_norm,tie", [(False, True), (True, False)])
def test_kv_cache_decoding_equals_full_forward(qk_norm, tie):
  model = Transformer(BASE.replace(qk_norm=qk_norm, tie_embeddings=tie), rngs=nnx.Rngs(2))
  tokens = jax.random.randint(jax.random.key(0), (2, 8), 0, 64)
  seg = jnp.ones((2, 8), jnp.int32)
  pos = jnp.broadcast_to(jnp.arange(8), (2, 8))
  _, aux = _decode_matches_full(model, tokens, seg, pos, prompt_len=5, max_len=12)
  assert aux == {}
  if not tie:
    assert model.lm_head_DxV.shape == (32, 64)


def test_kv_cache_default_positions_continue_from_index():
  model = Transformer(BASE, rngs=nnx.Rngs(3))
  tokens = jax.random.randint(jax.random.key(1), (1, 6), 0, 64)
  full = nnx.jit(lambda m, t: m(t))(model, tokens)
  step = nnx.jit(lambda m, t, c: m.forward(t, cache=c))
  logits, _, cache = step(model, tokens[:, :4], model.init_cache(1, 8, jnp.float32))
  outs = [logits]
  for i in (4, 5):
    logits, _, cache = step(model, tokens[:, i:i + 1], cache)
    outs.append(logits)
  np.testing.assert_allclose(np.concatenate(outs, 1), np.asarray(full), atol=1e-5)


def test_kv_cache_left_padded_rows():
  model = Transformer(BASE, rngs=nnx.Rngs(4))
  rng = np.random.default_rng(5)
  real = [rng.integers(0, 64, size=n) for n in (3, 6)]
  l = 9  # 6 prompt slots (row 0 left-padded by 3) + 3 decoded tokens
  tokens = np.zeros((2, l), np.int32)
  seg = np.zeros((2, l), np.int32)
  pos = np.zeros((2, l), np.int32)
  for r, prompt in enumerate(real):
    pad = 6 - len(prompt)
    tokens[r, pad:6] = prompt
    tokens[r, 6:] = rng.integers(0, 64, size=3)
    seg[r, pad:] = 1
    pos[r, pad:] = np.arange(l - pad)
  full, _ = _decode_matches_full(model, jnp.asarray(tokens), jnp.asarray(seg), jnp.asarray(pos),
                                 prompt_len=6, max_len=10)
  # The padded row behaves exactly like its unpadded sequence run alone.
  alone = _forward(model, jnp.asarray(tokens[:1, 3:]), jnp.arange(6)[None], jnp.ones((1, 6), jnp.int32),
                   None)[0]
  np.testing.assert_allclose(np.asarray(full)[0, 3:], np.asarray(alone)[0], atol=1e-5)
  assert np.all(np.isfinite(np.asarray(full)))


def test_forward_input_checks():
  model = Transformer(BASE.replace(num_layers=1), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="tokens must be"):
    model.forward(jnp.zeros((4,), jnp.int32))
  with pytest.raises(ValueError, match="segment_ids_BxL"):
    model.forward(jnp.zeros((1, 4), jnp.int32), segment_ids_BxL=jnp.ones((1, 3), jnp.int32))
  with pytest.raises(ValueError, match="cache is for batch"):
    model.forward(jnp.zeros((2, 4), jnp.int32), cache=model.init_cache(1, 8))
  with pytest.raises(ValueError, match="max_seq_len"):
    model.init_cache(1, 64)
  cache = KVCache.create(BASE.replace(compute_dtype="bfloat16"), 2, 8)
  # [B, G, S, Dh]: head-major, the layout the attention matmuls read.
  assert len(cache.k) == 2 and cache.k[0].shape == (2, 2, 8, 8) and cache.k[0].dtype == jnp.bfloat16


@pytest.mark.skipif(not HAS_MOE, reason="moejax.model.moe (MoELayer) is not written yet")
def test_moe_model_kv_cache_and_aux_rows():
  cfg = BASE.replace(num_layers=3, num_experts=4, top_k=2, expert_ff_dim=16, num_dense_layers=1,
                     dispatch="dropless", balance=("aux_loss",), gating_residual=True)
  assert cfg.moe_layers == (1, 2)
  model = Transformer(cfg, rngs=nnx.Rngs(6))
  tokens = jax.random.randint(jax.random.key(2), (2, 7), 0, 64)
  seg = jnp.asarray([[1] * 7, [0, 0] + [1] * 5], jnp.int32)
  pos = jnp.asarray([list(range(7)), [0, 0] + list(range(5))], jnp.int32)
  full, aux = _decode_matches_full(model, tokens, seg, pos, prompt_len=4, max_len=8)
  assert aux, "an MoE model must report aux values"
  for name, value in aux.items():
    assert value.shape[0] == 2, f"aux[{name!r}] has shape {value.shape}, expected one row per MoE layer"
  assert aux["tokens_per_expert"].shape == (2, 4)
  # Router logits are threaded: the second MoE layer's gating residual W_g must affect the output.
  ffn = model.blocks[2].ffn
  ffn.gate_residual_ExE[...] = 50.0 * jax.random.normal(jax.random.key(3), (4, 4))
  changed = _forward(model, tokens, pos, seg, None)[0]
  assert np.abs(np.asarray(changed) - np.asarray(full)).max() > 1e-4


def test_prefill_in_two_chunks_equals_full_forward():
  """A fresh cache takes the self-attention (prefill) path; the second chunk of 3 tokens attends
  over the cache. Both must give the full forward's logits, and only `create` makes a fresh cache."""
  model = Transformer(BASE.replace(qk_norm=True), rngs=nnx.Rngs(4))
  tokens = jax.random.randint(jax.random.key(5), (2, 9), 0, 64)
  seg = jnp.asarray([[1] * 9, [0, 0, 1, 1, 1, 2, 2, 2, 2]], jnp.int32)   # left padding, two docs
  pos = jnp.asarray([list(range(9)), [0, 0, 0, 1, 2, 0, 1, 2, 3]], jnp.int32)
  full = np.asarray(_forward(model, tokens, pos, seg, None)[0])
  cache = model.init_cache(2, 12, jnp.float32)
  assert cache.fresh
  first, _, cache = _forward(model, tokens[:, :6], pos[:, :6], seg[:, :6], cache)
  assert not cache.fresh and int(cache.index) == 6
  second, _, cache = _forward(model, tokens[:, 6:], pos[:, 6:], seg[:, 6:], cache)
  got = np.concatenate([np.asarray(first), np.asarray(second)], axis=1)
  valid = np.asarray(seg) != 0
  np.testing.assert_allclose(got[valid], full[valid], atol=1e-5, rtol=1e-5)
