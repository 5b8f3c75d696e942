"""RMSNorm, RoPE, SwiGLU MLP and Embed against numpy references written here."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax.model.config import ModelConfig
from moejax.model.layers import MLP, Embed, RMSNorm, apply_rope

CFG = ModelConfig(vocab_size=48, d_model=16, num_heads=2, ff_dim=24, compute_dtype="float32",
                  norm_eps=1e-5, init_std=0.5)


def _np_rope(x, positions, theta):
  """Rotary embedding as a complex rotation of the pairs (x_i, x_{i+Dh/2}) (HF rotate-half layout)."""
  half = x.shape[-1] // 2
  inv_freq = theta ** (-np.arange(half, dtype=np.float64) * 2 / x.shape[-1])
  z = x[..., :half].astype(np.float64) + 1j * x[..., half:].astype(np.float64)
  z = z * np.exp(1j * positions[:, :, None, None] * inv_freq)
  return np.concatenate([z.real, z.imag], axis=-1)


def test_rms_norm_matches_numpy():
  norm = RMSNorm(16, CFG, rngs=nnx.Rngs(0))
  scale = np.random.default_rng(0).normal(size=16).astype(np.float32)
  norm.scale[...] = jnp.asarray(scale)
  x = np.random.default_rng(1).normal(size=(2, 3, 16)).astype(np.float32) * 3
  want = x / np.sqrt((x.astype(np.float64) ** 2).mean(-1, keepdims=True) + 1e-5) * scale
  np.testing.assert_allclose(np.asarray(norm(jnp.asarray(x))), want, rtol=1e-5, atol=1e-5)
  assert norm.scale.get_metadata()["axes"] == ("embed",)


def test_rms_norm_bf16_input_uses_fp32_statistics():
  cfg = CFG.replace(compute_dtype="bfloat16")
  norm = RMSNorm(16, cfg, rngs=nnx.Rngs(0))
  x = (np.random.default_rng(2).normal(size=(4, 16)) * 300).astype(np.float32)
  y = norm(jnp.asarray(x, jnp.bfloat16))
  assert y.dtype == jnp.bfloat16
  xb = np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32))
  want = xb / np.sqrt((xb ** 2).mean(-1, keepdims=True) + 1e-5)
  np.testing.assert_allclose(np.asarray(y.astype(jnp.float32)), want, rtol=1e-2, atol=1e-2)


def test_rms_norm_rejects_wrong_width():
  with pytest.raises(ValueError, match="expected 16"):
    RMSNorm(16, CFG, rngs=nnx.Rngs(0))(jnp.ones((2, 8)))


def test_rope_matches_complex_rotation():
  rng = np.random.default_rng(3)
  x = rng.normal(size=(2, 5, 3, 8)).astype(np.float32)
  positions = rng.integers(0, 100, size=(2, 5))
  got = apply_rope(jnp.asarray(x), jnp.asarray(positions, jnp.int32), 500.0)
  np.testing.assert_allclose(np.asarray(got), _np_rope(x, positions, 500.0), rtol=1e-4, atol=1e-4)


def test_rope_scores_depend_only_on_relative_position():
  rng = np.random.default_rng(4)
  q = jnp.asarray(rng.normal(size=(1, 1, 1, 8)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(1, 1, 1, 8)), jnp.float32)

  def score(m, n):
    qm = apply_rope(q, jnp.full((1, 1), m), 10000.0)
    kn = apply_rope(k, jnp.full((1, 1), n), 10000.0)
    return float(jnp.sum(qm * kn))

  assert score(7, 3) == pytest.approx(score(14, 10), abs=1e-4)
  assert score(7, 3) != pytest.approx(score(7, 4), abs=1e-3)
  np.testing.assert_allclose(np.asarray(apply_rope(q, jnp.zeros((1, 1), jnp.int32), 1e4)), q)


def test_rope_rejects_bad_shapes():
  with pytest.raises(ValueError, match="positions shape"):
    apply_rope(jnp.ones((2, 5, 3, 8)), jnp.zeros((2, 4), jnp.int32), 1e4)
  with pytest.raises(ValueError, match="even"):
    apply_rope(jnp.ones((2, 5, 3, 7)), jnp.zeros((2, 5), jnp.int32), 1e4)


def test_mlp_matches_numpy_swiglu():
  mlp = MLP(16, 24, CFG, rngs=nnx.Rngs(0))
  x = np.random.default_rng(5).normal(size=(2, 3, 16)).astype(np.float32)
  wg, wu, wd = (np.asarray(p[...], np.float64) for p in (mlp.w_gate_DxF, mlp.w_up_DxF, mlp.w_down_FxD))
  g = x @ wg
  want = ((g / (1 + np.exp(-g))) * (x @ wu)) @ wd
  np.testing.assert_allclose(np.asarray(mlp(jnp.asarray(x))), want, rtol=1e-4, atol=1e-4)
  assert mlp.w_gate_DxF.get_metadata()["axes"] == ("embed", "mlp")
  assert mlp.w_up_DxF.get_metadata()["axes"] == ("embed", "mlp")
  assert mlp.w_down_FxD.get_metadata()["axes"] == ("mlp", "embed")
  assert mlp.w_down_FxD.shape == (24, 16)
  assert float(np.std(wg)) == pytest.approx(0.5, rel=0.2)  # normal(init_std)


def test_param_dtype_and_compute_dtype():
  cfg = CFG.replace(param_dtype="bfloat16", compute_dtype="bfloat16")
  mlp = MLP(16, 24, cfg, rngs=nnx.Rngs(0))
  assert mlp.w_up_DxF[...].dtype == jnp.bfloat16
  assert mlp(jnp.ones((1, 2, 16), jnp.float32)).dtype == jnp.bfloat16


def test_embed_lookup_and_tied_attend():
  emb = Embed(CFG, rngs=nnx.Rngs(0))
  table = np.asarray(emb.embedding_VxD[...])
  assert table.shape == (48, 16)
  assert emb.embedding_VxD.get_metadata()["axes"] == ("vocab", "embed")
  tokens = np.array([[0, 5, 47], [3, 3, 1]])
  np.testing.assert_array_equal(np.asarray(emb(jnp.asarray(tokens))), table[tokens])
  x = np.random.default_rng(6).normal(size=(2, 3, 16)).astype(np.float32)
  logits = emb.attend(jnp.asarray(x))
  assert logits.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(logits), x @ table.T, rtol=1e-4, atol=1e-4)
  with pytest.raises(TypeError, match="integers"):
    emb(jnp.ones((1, 2)))
