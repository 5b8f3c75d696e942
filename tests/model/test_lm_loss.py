"""The chunked LM-head loss against the plain path (full logits + `token_loss`) and numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax.model import ModelConfig, Transformer, lm_loss
from moejax.train import step as step_lib


def _inputs(b=3, l=20, d=16, v=50, seed=0):
  rng = np.random.default_rng(seed)
  h = jnp.asarray(rng.normal(size=(b, l, d)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(d, v)) * 0.3, jnp.float32)
  tokens = jnp.asarray(rng.integers(0, v, (b, l)), jnp.int32)
  # Row 0 one document, row 1 two documents, row 2 padded at the end.
  seg = np.ones((b, l), np.int32)
  seg[1, l // 2:] = 2
  seg[2, l - 6:] = 0
  return h, w, tokens, jnp.asarray(seg)


def _plain(h, w, tokens, seg):
  return step_lib.token_loss(jnp.einsum("bld,dv->blv", h, w), tokens, seg)[0]


def _numpy_loss(h, w, tokens, seg):
  logits = np.einsum("bld,dv->blv", np.asarray(h, np.float64), np.asarray(w, np.float64))
  tokens, seg = np.asarray(tokens), np.asarray(seg)
  total = 0.0
  for i in range(tokens.shape[0]):
    for t in range(tokens.shape[1] - 1):
      if seg[i, t] != 0 and seg[i, t + 1] == seg[i, t]:
        row = logits[i, t]
        total += np.log(np.exp(row - row.max()).sum()) + row.max() - row[tokens[i, t + 1]]
  return total


@pytest.mark.parametrize("chunk", [1, 3, 8, 64, None])
def test_loss_and_grads_match_plain_path(chunk):
  h, w, tokens, seg = _inputs()
  targets, mask = lm_loss.next_token_targets(tokens, seg)
  fused = lambda h, w: lm_loss.fused_lm_loss(h, w, targets, mask, chunk)
  loss, (dh, dw) = jax.jit(jax.value_and_grad(fused, argnums=(0, 1)))(h, w)
  ref, (ref_dh, ref_dw) = jax.value_and_grad(_plain, argnums=(0, 1))(h, w, tokens, seg)
  np.testing.assert_allclose(loss, _numpy_loss(h, w, tokens, seg), rtol=1e-5)
  np.testing.assert_allclose(loss, ref, rtol=1e-5)
  np.testing.assert_allclose(dh, ref_dh, atol=1e-5)
  np.testing.assert_allclose(dw, ref_dw, atol=1e-5)
  assert float(jnp.sum(mask)) == 19 + 18 + 13   # predicted tokens: per row L-1 minus breaks/padding


def test_cotangent_scales_gradients_and_forward_only_path():
  h, w, tokens, seg = _inputs(seed=1)
  targets, mask = lm_loss.next_token_targets(tokens, seg)
  grads = jax.grad(lambda h: 2.5 * lm_loss.fused_lm_loss(h, w, targets, mask, 4))(h)
  ref = jax.grad(lambda h: 2.5 * _plain(h, w, tokens, seg))(h)
  np.testing.assert_allclose(grads, ref, atol=1e-5)
  np.testing.assert_allclose(jax.jit(lm_loss.fused_lm_loss, static_argnums=4)(h, w, targets, mask, 4),
                             _plain(h, w, tokens, seg), rtol=1e-5)


def test_bf16_operands_accumulate_in_fp32():
  h, w, tokens, seg = _inputs(seed=2)
  targets, mask = lm_loss.next_token_targets(tokens, seg)
  hb, wb = h.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
  loss, (dh, dw) = jax.value_and_grad(
      lambda h, w: lm_loss.fused_lm_loss(h, w, targets, mask, 8), argnums=(0, 1))(hb, wb)
  assert loss.dtype == jnp.float32 and dh.dtype == jnp.bfloat16 and dw.dtype == jnp.bfloat16
  ref = _plain(hb.astype(jnp.float32), wb.astype(jnp.float32), tokens, seg)
  np.testing.assert_allclose(loss, ref, rtol=1e-5)


@pytest.mark.parametrize("tie", [False, True])
def test_train_loss_equals_logits_loss_through_the_model(tie):
  cfg = ModelConfig(vocab_size=40, d_model=16, num_layers=1, num_heads=2, num_kv_heads=2, ff_dim=24,
                    max_seq_len=16, compute_dtype="float32", tie_embeddings=tie, init_std=0.3)
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  _, _, tokens, seg = _inputs(b=3, l=12, d=16, v=40, seed=3)
  batch = dict(tokens=tokens, segment_ids=seg,
               positions=jnp.broadcast_to(jnp.arange(12, dtype=jnp.int32), (3, 12)))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def fused(params):
    loss_sum, n, _ = step_lib._forward_loss(graphdef, params, rest, batch, deterministic=True)  # pylint: disable=protected-access
    return loss_sum / n

  def plain(params):
    logits, _, _ = nnx.merge(graphdef, params, rest).forward(batch["tokens"],
                                                             segment_ids_BxL=batch["segment_ids"])
    loss_sum, n = step_lib.token_loss(logits, batch["tokens"], batch["segment_ids"])
    return loss_sum / n

  (a, ga), (b, gb) = jax.value_and_grad(fused)(params), jax.value_and_grad(plain)(params)
  np.testing.assert_allclose(a, b, rtol=1e-5)
  for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
    np.testing.assert_allclose(x, y, atol=1e-5)


def test_default_chunk_and_bad_shapes():
  assert lm_loss.default_chunk(8, 256, 8192, "cpu") == 32      # 8 x 32 x 8192 x 4 B = 8 MiB
  assert lm_loss.default_chunk(1, 5, 8192, "cpu") == 8         # never beyond the sequence
  assert lm_loss.default_chunk(64, 4096, 200_000, "cpu") == 1
  assert lm_loss.default_chunk(8, 2048, 50_304, "gpu") == 2048   # one chunk off CPU
  h, w, tokens, seg = _inputs()
  targets, mask = lm_loss.next_token_targets(tokens, seg)
  with pytest.raises(ValueError, match="d_model=16"):
    lm_loss.fused_lm_loss(h, w.T, targets, mask)
  with pytest.raises(ValueError, match="must be \\[B, L\\]"):
    lm_loss.fused_lm_loss(h, w, targets[:, 1:], mask)
