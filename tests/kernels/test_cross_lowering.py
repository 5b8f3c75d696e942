"""The real GPU (Triton) and TPU (Mosaic) kernels lower from this CPU-only machine.

`jax.export(..., platforms=["cuda" | "tpu"])` inside `target.lowering_for(...)` runs the full Pallas
-> Triton / Mosaic lowering of every kernel (forward and backward) without a device: block-shape
rules, dtypes and unsupported primitives fail here, long before a GPU or TPU run. What it cannot
check is compilation and the numbers (interpret-mode tests and the GPU benchmark do that).
"""
import jax
import jax.numpy as jnp
import pytest
from jax import export

from moejax.kernels import gmm, router, target

# platform for jax.export, platform for moejax.kernels.target, the custom call a kernel lowers to.
PLATFORMS = [("cuda", "gpu", "__gpu$xla.gpu.triton"), ("tpu", "tpu", "tpu_custom_call")]
CHECKS = [export.DisabledSafetyCheck.custom_call(call) for _, _, call in PLATFORMS]


def _lowered_text(fn, export_platform, kernel_platform, *args) -> str:
  with target.lowering_for(kernel_platform):
    exported = export.export(jax.jit(fn), platforms=[export_platform], disabled_checks=CHECKS)(*args)
  return exported.mlir_module()


def _sds(shape, dtype):
  return jax.ShapeDtypeStruct(shape, dtype)


@pytest.mark.parametrize("export_platform,kernel_platform,call", PLATFORMS)
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_gmm_forward_and_backward_lower(export_platform, kernel_platform, call, dtype):
  m, k, n, e = 200, 128, 256, 5   # M is not a multiple of the tile: the padded path lowers too.

  def loss(lhs, rhs, sizes):
    return gmm.gmm(lhs, rhs, sizes, tiles=(64, 128, 128)).astype(jnp.float32).sum()

  args = (_sds((m, k), dtype), _sds((e, k, n), dtype), _sds((e,), jnp.int32))
  forward = _lowered_text(lambda *a: gmm.gmm(*a, tiles=(64, 128, 128)), export_platform,
                          kernel_platform, *args)
  assert forward.count(call) >= 1
  backward = _lowered_text(jax.grad(loss, argnums=(0, 1)), export_platform, kernel_platform, *args)
  assert backward.count(call) >= 2   # dlhs = gmm(dout, rhs^T) and drhs = tgmm(lhs, dout)


@pytest.mark.parametrize("export_platform,kernel_platform,call", PLATFORMS)
@pytest.mark.parametrize("e,k,score_fn", [(64, 8, "softmax"), (8, 2, "sigmoid"), (60, 6, "sigmoid")])
def test_fused_router_lowers(export_platform, kernel_platform, call, e, k, score_fn):
  t = 300

  def route(logits, bias):
    return router.fused_route(logits, bias, top_k=k, score_fn=score_fn, renormalize=True)

  def loss(logits, bias):
    _, gates, scores, _, score_sums = route(logits, bias)
    return gates.sum() + (scores ** 2).sum() + score_sums.sum()

  args = (_sds((t, e), jnp.float32), _sds((e,), jnp.float32))
  assert _lowered_text(route, export_platform, kernel_platform, *args).count(call) == 1
  assert _lowered_text(jax.grad(loss), export_platform, kernel_platform, *args).count(call) >= 1


@pytest.mark.parametrize("export_platform,kernel_platform,call", PLATFORMS)
def test_moe_layer_with_pallas_kernels_lowers(export_platform, kernel_platform, call):
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from moejax.model import moe  # pylint: disable=g-import-not-at-top
  from moejax.model.config import ModelConfig  # pylint: disable=g-import-not-at-top
  cfg = ModelConfig(vocab_size=64, d_model=128, num_layers=1, num_heads=2, ff_dim=128,
                    expert_ff_dim=128, num_experts=8, top_k=2, impl="pallas",
                    compute_dtype="bfloat16", balance=("aux_loss", "alf_lb"))
  graphdef, params = nnx.split(moe.MoELayer(cfg, rngs=nnx.Rngs(0)))

  def loss(params, x):
    y, aux, _ = nnx.merge(graphdef, params)(x)
    return y.astype(jnp.float32).sum() + aux["aux_loss"]

  abstract = jax.tree.map(lambda a: _sds(a.shape, a.dtype), params)
  text = _lowered_text(jax.grad(loss), export_platform, kernel_platform, abstract,
                       _sds((2, 64, 128), jnp.bfloat16))
  assert text.count(call) >= 3   # router + gmm forward + gmm backward (at least)


def test_lowering_for_rejects_unknown_platform_and_restores():
  before = target.backend()
  with pytest.raises(ValueError, match="platform='rocm'"):
    with target.lowering_for("rocm"):
      pass
  with target.lowering_for("tpu"):
    assert target.backend() == "tpu"
  assert target.backend() == before
