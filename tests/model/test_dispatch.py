"""dispatch.dropless / dispatch.capacity against independent numpy per-token references."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.kernels import get_ops
from moejax.model import dispatch

T, D, F, E, K = 24, 16, 8, 4, 2


def _np_swiglu(x_D, wg_DF, wu_DF, wd_FD):
  g = x_D @ wg_DF
  return ((g / (1.0 + np.exp(-g))) * (x_D @ wu_DF)) @ wd_FD


def _np_moe(x, idx, gates, wg, wu, wd, keep=None):
  """y_t = sum_k gate * SwiGLU_{e}(x_t) over kept copies with e < E (loop over tokens)."""
  x, wg, wu, wd = (np.asarray(a, np.float64) for a in (x, wg, wu, wd))
  y = np.zeros_like(x)
  for t in range(x.shape[0]):
    for k in range(idx.shape[1]):
      e = int(idx[t, k])
      if e >= wg.shape[0] or (keep is not None and not keep[t, k]):
        continue
      y[t] += float(gates[t, k]) * _np_swiglu(x[t], wg[e], wu[e], wd[e])
  return y


def _np_gshard_keep(idx, caps):
  """GShard priority: pass over choices k = 0..K-1, tokens in order; keep while the expert has room."""
  count = np.zeros(len(caps), np.int64)
  keep = np.zeros(idx.shape, bool)
  for k in range(idx.shape[1]):
    for t in range(idx.shape[0]):
      e = int(idx[t, k])
      if e < len(caps) and count[e] < caps[e]:
        keep[t, k] = True
        count[e] += 1
  return keep


def _problem(seed, num_ids=E, t=T, k=K, skew=False):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((t, D)).astype(np.float32)
  if skew:  # most tokens prefer expert 0 then 1: forces drops.
    p = np.array([0.6, 0.25] + [0.15 / (num_ids - 2)] * (num_ids - 2))
    idx = np.stack([rng.choice(num_ids, k, replace=False, p=p) for _ in range(t)])
  else:
    idx = np.stack([rng.permutation(num_ids)[:k] for _ in range(t)])
  gates = rng.uniform(0.1, 1.0, (t, k)).astype(np.float32)
  wg = (0.3 * rng.standard_normal((E, D, F))).astype(np.float32)
  wu = (0.3 * rng.standard_normal((E, D, F))).astype(np.float32)
  wd = (0.3 * rng.standard_normal((E, F, D))).astype(np.float32)
  return x, idx.astype(np.int32), gates, wg, wu, wd


def test_dropless_matches_numpy_loop():
  x, idx, gates, wg, wu, wd = _problem(0)
  y = dispatch.dropless(*map(jnp.asarray, (x, idx, gates, wg, wu, wd)), get_ops("xla"))
  assert y.dtype == jnp.float32 and y.shape == (T, D)
  np.testing.assert_allclose(np.asarray(y), _np_moe(x, idx, gates, wg, wu, wd), rtol=1e-4, atol=1e-5)


def test_ids_beyond_experts_contribute_nothing():
  # Ids E..E+2 stand for MoE++ zero-computation experts (or a padding sentinel).
  x, idx, gates, wg, wu, wd = _problem(1, num_ids=E + 3)
  assert (idx >= E).any() and (idx < E).any()
  want = _np_moe(x, idx, gates, wg, wu, wd)
  args = tuple(map(jnp.asarray, (x, idx, gates, wg, wu, wd)))
  np.testing.assert_allclose(np.asarray(dispatch.dropless(*args, get_ops("xla"))), want,
                             rtol=1e-4, atol=1e-5)
  y, dropped = dispatch.capacity(*args, T)
  np.testing.assert_allclose(np.asarray(y), want, rtol=1e-4, atol=1e-5)
  assert float(dropped) == 0.0


@pytest.mark.parametrize("t,k", [(T, K), (1, 2), (3, 1)])
def test_gathered_matches_numpy_loop_with_skipped_ids(t, k):
  x, idx, gates, wg, wu, wd = _problem(8 + t, num_ids=E + 2, t=t, k=k)
  idx[0, 0] = E + 1   # a MoE++ / padding id: contributes nothing
  args = tuple(map(jnp.asarray, (x, idx, gates, wg, wu, wd)))
  y = jax.jit(dispatch.gathered)(*args)
  assert y.dtype == jnp.float32 and y.shape == (t, D)
  np.testing.assert_allclose(np.asarray(y), _np_moe(x, idx, gates, wg, wu, wd), rtol=1e-4, atol=1e-5)

  def loss(fn, *a):
    return jnp.sum(jnp.sin(fn(a[0], args[1], *a[1:])))

  grads = [jax.grad(lambda *a, fn=fn: loss(fn, *a), argnums=range(5))(*args[:1], *args[2:])
           for fn in (dispatch.gathered,
                      lambda *a: dispatch.capacity(*a, t)[0])]
  for a, b in zip(*grads):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


def test_dropless_takes_the_gathered_form_for_decode_sized_inputs_on_cpu():
  def jaxpr(t):
    x, idx, gates, wg, wu, wd = _problem(9, t=t)
    return str(jax.make_jaxpr(lambda *a: dispatch.dropless(*a, get_ops("xla")))(
        *map(jnp.asarray, (x, idx, gates, wg, wu, wd))))
  if jax.default_backend() == "cpu":
    assert "sort[" not in jaxpr(1) and "while[" not in jaxpr(1)   # T*K = 2 <= E/2: gathered
    assert "sort[" in jaxpr(2) and "while[" in jaxpr(2)           # T*K = 4 > E/2: sort + tiles


def test_capacity_equals_dropless_when_nothing_dropped():
  x, idx, gates, wg, wu, wd = _problem(2)
  args = tuple(map(jnp.asarray, (x, idx, gates, wg, wu, wd)))
  cap = dispatch.expert_capacity(T, K, E, 100.0)
  assert cap == T
  y_cap, dropped = dispatch.capacity(*args, cap)
  y_dl = dispatch.dropless(*args, get_ops("xla"))
  assert float(dropped) == 0.0
  np.testing.assert_allclose(np.asarray(y_cap), np.asarray(y_dl), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(np.asarray(y_cap), _np_moe(x, idx, gates, wg, wu, wd),
                             rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("factor", [0.5, 1.0, 1.25])
def test_capacity_drops_follow_gshard_priority(factor):
  x, idx, gates, wg, wu, wd = _problem(3, skew=True)
  cap = dispatch.expert_capacity(T, K, E, factor)
  assert cap == min(T, math.ceil(T * K / E * factor))
  keep = _np_gshard_keep(idx, [cap] * E)
  assert not keep.all()  # the skewed assignment must overflow expert 0.
  y, dropped = dispatch.capacity(*map(jnp.asarray, (x, idx, gates, wg, wu, wd)), cap)
  np.testing.assert_allclose(np.asarray(y), _np_moe(x, idx, gates, wg, wu, wd, keep),
                             rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(float(dropped), (~keep).sum() / (T * K), rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(dispatch.capacity_keep(jnp.asarray(idx), [cap] * E)),
                                keep)


def test_second_choices_yield_to_later_first_choices():
  # Token 0's 2nd choice and token 1's 1st choice both go to expert 1 (capacity 1): the first
  # choice wins although it belongs to a later token.
  idx = np.array([[0, 1], [1, 2]], np.int32)
  keep = np.asarray(dispatch.capacity_keep(jnp.asarray(idx), jnp.array([1, 1, 1])))
  np.testing.assert_array_equal(keep, [[True, False], [True, True]])


def test_heterogeneous_capacities_and_skipped_ids():
  rng = np.random.default_rng(4)
  idx = np.stack([rng.permutation(7)[:3] for _ in range(20)]).astype(np.int32)
  idx[::5, 2] = 7  # sentinel id beyond all experts: never kept, never counted.
  caps = [2, 5, 3, 1, 4, 6, 2]
  got = np.asarray(dispatch.capacity_keep(jnp.asarray(idx), jnp.asarray(caps)))
  np.testing.assert_array_equal(got, _np_gshard_keep(idx, caps))


def test_gradients_agree_between_paths():
  x, idx, gates, wg, wu, wd = _problem(5)
  idx_j = jnp.asarray(idx)

  def loss(path, x, gates, wg, wu, wd):
    if path == "dropless":
      y = dispatch.dropless(x, idx_j, gates, wg, wu, wd, get_ops("xla"))
    else:
      y = dispatch.capacity(x, idx_j, gates, wg, wu, wd, T)[0]
    return jnp.sum(jnp.sin(y))

  args = tuple(map(jnp.asarray, (x, gates, wg, wu, wd)))
  g_dl = jax.grad(lambda *a: loss("dropless", *a), argnums=range(5))(*args)
  g_cap = jax.grad(lambda *a: loss("capacity", *a), argnums=range(5))(*args)
  for a, b in zip(g_dl, g_cap):
    assert np.abs(np.asarray(a)).max() > 0
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


def test_bf16_compute_close_to_fp32():
  x, idx, gates, wg, wu, wd = _problem(6)
  want = _np_moe(x, idx, gates, wg, wu, wd)
  xb = jnp.asarray(x, jnp.bfloat16)
  args = (xb, jnp.asarray(idx), jnp.asarray(gates), jnp.asarray(wg), jnp.asarray(wu), jnp.asarray(wd))
  y_dl = jax.jit(lambda *a: dispatch.dropless(*a, get_ops("xla")))(*args)
  y_cap, _ = jax.jit(dispatch.capacity, static_argnums=6)(*args, T)
  for y in (y_dl, y_cap):
    assert y.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y, np.float32), want, rtol=5e-2, atol=5e-2)


def test_bad_inputs_raise_clear_errors():
  x, idx, gates, wg, wu, wd = map(jnp.asarray, _problem(7))
  with pytest.raises(ValueError, match="gates shape"):
    dispatch.dropless(x, idx, gates[:, :1], wg, wu, wd, get_ops("xla"))
  with pytest.raises(ValueError, match="w_down"):
    dispatch.capacity(x, idx, gates, wg, wu, wd[:, :, :3], 4)
  with pytest.raises(ValueError, match="positive int capacity"):
    dispatch.capacity(x, idx, gates, wg, wu, wd, 0)
  with pytest.raises(ValueError, match="capacity_factor"):
    dispatch.expert_capacity(T, K, E, 0.0)
