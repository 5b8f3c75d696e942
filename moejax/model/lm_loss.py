"""Next-token cross entropy fused with the LM head, over chunks of tokens (no [T, V] logits).

    loss = sum_t mask_t * (logsumexp_v(h_t W)_v - (h_t W)_{y_t})

The plain path (`logits = h W`, then the loss) materialises [T, V] fp32 logits, their softmax and,
in the backward pass, a [T, V] gradient: on CPU writing and faulting in those buffers costs as much
as the head's matmuls. Here the loss and its gradients are computed chunk by chunk in one pass (the
"fused linear cross-entropy" of Liger Kernel, arXiv 2410.10989 §3.4; Cut Cross-Entropy, arXiv
2411.09009, avoids the logits the same way), with the gradient formed in the forward pass because
the loss is a scalar at the end of the graph:

    d loss / d logits_t = mask_t * (softmax(h_t W) - onehot(y_t))      (per chunk, [C, V])
    d h_t = (d logits_t) W^T,     d W = sum_chunks h_chunk^T (d logits_chunk)

Same FLOPs as forward + backward of the plain path (three [T, D] x [D, V]-sized matmuls), peak
extra memory one chunk's [C, V] logits. Without differentiation only the loss is computed.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

# Bytes of one chunk's fp32 logits on CPU: small enough to stay in the allocator's reused heap
# (larger buffers are mmap-ed and page-faulted afresh on every step).
_CPU_CHUNK_BYTES = 8 << 20


def next_token_targets(tokens_BxL: jax.Array, segment_ids_BxL: jax.Array):
  """(targets_BxL, mask_BxL fp32): position t predicts token t+1 of the same non-padding segment;
  the last position and positions whose next token is padding or another document are masked."""
  targets = jnp.concatenate([tokens_BxL[:, 1:], jnp.zeros_like(tokens_BxL[:, :1])], axis=1)
  same = (segment_ids_BxL[:, 1:] == segment_ids_BxL[:, :-1]) & (segment_ids_BxL[:, :-1] != 0)
  mask = jnp.concatenate([same, jnp.zeros_like(same[:, :1])], axis=1)
  return targets.astype(jnp.int32), mask.astype(jnp.float32)


def default_chunk(batch: int, length: int, vocab: int, backend: str | None = None) -> int:
  """Positions per chunk. CPU: the largest power of two c whose [batch * c, V] fp32 logits fit
  8 MiB, at least 1, at most `length` rounded up to a power of two. Other backends: the whole
  sequence (one chunk): with a batch-sharded mesh every chunk's d W is a cross-device sum, and
  the loop would repeat that all-reduce per chunk (not measured on accelerators yet)."""
  if (backend or jax.default_backend()) != "cpu":
    return max(1, length)
  rows = max(1, _CPU_CHUNK_BYTES // (4 * max(vocab, 1) * max(batch, 1)))
  chunk = 1 << (rows.bit_length() - 1)
  return min(chunk, 1 << max(0, (length - 1).bit_length()))


def _chunk_loss(h_BxCxD, w_DxV, targets_BxC, mask_BxC):
  """One chunk: (fp32 logits [B*C, V], logsumexp [B*C], masked loss sum)."""
  d = h_BxCxD.shape[-1]
  logits = jnp.dot(h_BxCxD.reshape(-1, d), w_DxV, preferred_element_type=jnp.float32)
  lse = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets_BxC.reshape(-1, 1), axis=-1)[:, 0]
  return logits, lse, jnp.sum((lse - target_logit) * mask_BxC.reshape(-1))


def _chunks(h_BxLxD, targets_BxL, mask_BxL, chunk: int):
  """Split the sequence axis into n chunks: ([n, B, C, D], [n, B, C], [n, B, C]); the batch axis
  stays whole, so a batch-sharded h stays sharded. Padded positions are masked."""
  b, l, d = h_BxLxD.shape
  n = -(-l // chunk)
  pad = n * chunk - l
  if pad:
    h_BxLxD = jnp.pad(h_BxLxD, ((0, 0), (0, pad), (0, 0)))
    targets_BxL = jnp.pad(targets_BxL, ((0, 0), (0, pad)))
    mask_BxL = jnp.pad(mask_BxL, ((0, 0), (0, pad)))
  split = lambda a: jnp.moveaxis(a.reshape(b, n, chunk, *a.shape[2:]), 1, 0)
  return split(h_BxLxD), split(targets_BxL), split(mask_BxL)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _fused_loss(h_BxLxD, w_DxV, targets_BxL, mask_BxL, chunk):
  def body(total, inp):
    h, targets, mask = inp
    return total + _chunk_loss(h, w_DxV, targets, mask)[2], None

  xs = _chunks(h_BxLxD, targets_BxL, mask_BxL, chunk)
  return jax.lax.scan(body, jnp.zeros((), jnp.float32), xs)[0]


def _fused_loss_fwd(h_BxLxD, w_DxV, targets_BxL, mask_BxL, chunk):
  b, l, d = h_BxLxD.shape
  vocab = w_DxV.shape[1]
  w_VxD = w_DxV.T
  h_chunks, targets_chunks, mask_chunks = _chunks(h_BxLxD, targets_BxL, mask_BxL, chunk)
  # Each chunk's h^T [D, B*C], transposed once outside the loop: XLA CPU runs the d W matmul
  # ~2x faster on a row-major h^T than contracting h's leading axis inside the loop.
  hT_chunks = jnp.swapaxes(h_chunks.reshape(h_chunks.shape[0], -1, d), 1, 2)

  def body(carry, inp):
    total, dw_DxV = carry
    h_BxCxD, hT_DxR, targets_BxC, mask_BxC = inp
    logits, lse, loss = _chunk_loss(h_BxCxD, w_DxV, targets_BxC, mask_BxC)
    onehot = jax.nn.one_hot(targets_BxC.reshape(-1), vocab, dtype=jnp.float32)
    dlogits = ((jnp.exp(logits - lse[:, None]) - onehot)
               * mask_BxC.reshape(-1, 1)).astype(h_BxCxD.dtype)
    dh = jnp.dot(dlogits, w_VxD, preferred_element_type=jnp.float32).reshape(h_BxCxD.shape)
    dw_DxV = dw_DxV + jnp.dot(hT_DxR, dlogits, preferred_element_type=jnp.float32)
    return (total + loss, dw_DxV), dh.astype(h_BxCxD.dtype)

  init = (jnp.zeros((), jnp.float32), jnp.zeros(w_DxV.shape, jnp.float32))
  (total, dw_DxV), dh_NxBxCxD = jax.lax.scan(
      body, init, (h_chunks, hT_chunks, targets_chunks, mask_chunks))
  dh_BxLxD = jnp.moveaxis(dh_NxBxCxD, 0, 1).reshape(b, -1, d)[:, :l]
  return total, (dh_BxLxD, dw_DxV.astype(w_DxV.dtype))


def _fused_loss_bwd(chunk, res, g):
  """Scales the gradients formed in the forward pass; targets and mask get none."""
  del chunk
  dh_BxLxD, dw_DxV = res
  return (g * dh_BxLxD).astype(dh_BxLxD.dtype), (g * dw_DxV).astype(dw_DxV.dtype), None, None


_fused_loss.defvjp(_fused_loss_fwd, _fused_loss_bwd)


def fused_lm_loss(h_BxLxD: jax.Array, w_DxV: jax.Array, targets_BxL: jax.Array,
                  mask_BxL: jax.Array, chunk: int | None = None) -> jax.Array:
  """Sum over positions of mask * cross_entropy(h W, targets), fp32 scalar (see module docstring).

  h [B, L, D] and W [D, V] in the compute dtype (logits accumulate in fp32); targets int [B, L];
  mask [B, L] (0/1; no gradient flows to it or to targets). `chunk`: sequence positions per chunk
  (default `default_chunk`). Differentiable in h and W; equal to the plain path up to fp32
  summation order.
  """
  b, l, d = h_BxLxD.shape
  if w_DxV.ndim != 2 or w_DxV.shape[0] != d:
    raise ValueError(f"fused_lm_loss: W must be [d_model={d}, vocab], got {w_DxV.shape}")
  if targets_BxL.shape != (b, l) or mask_BxL.shape != (b, l):
    raise ValueError(f"fused_lm_loss: targets {targets_BxL.shape} and mask {mask_BxL.shape} must "
                     f"be [B, L] = {(b, l)}")
  chunk = int(chunk or default_chunk(b, l, w_DxV.shape[1]))
  if chunk < 1:
    raise ValueError(f"fused_lm_loss: chunk must be >= 1, got {chunk}")
  return _fused_loss(h_BxLxD, w_DxV, targets_BxL.astype(jnp.int32), mask_BxL.astype(jnp.float32),
                     chunk)
