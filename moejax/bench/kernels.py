"""Kernel benchmark (not a test): grouped matmul and router throughput on the MoE shapes of issue 6.

  python -m moejax.bench.kernels            # on a GPU: the full table (bf16)
  python -m moejax.bench.kernels --smoke    # anywhere: tiny shapes, checks that every path runs

For each shape it times the expert up-projection GEMM, lhs [M = T*k, D] x rhs [E, D, F] with
Dirichlet-uneven group sizes, forward and forward+backward, and prints TFLOP/s
(2*M*D*F forward, 3x that forward+backward) for: moejax's Pallas `gmm`, `jax.lax.ragged_dot`,
a dense `jnp.dot` [M, D] x [D, F] of the same FLOPs, tokamax's `ragged_dot` and
`torch._grouped_mm` when importable, and for the decode shape a dense per-expert loop. Then the
fused router kernel against the XLA router (`moejax.model.routing.route` + the load statistics).
Times are medians of `--reps` calls after a compile/warm-up call.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from moejax.kernels import gmm as gmm_lib
from moejax.kernels import router as router_lib


@dataclasses.dataclass(frozen=True)
class Shape:
  name: str
  t: int
  d: int
  f: int
  e: int
  k: int


SHAPES = (
    Shape("mixtral", 8192, 4096, 14336, 8, 2),
    Shape("olmoe", 16384, 2048, 1024, 64, 8),
    Shape("deepseek", 16384, 2048, 1408, 64, 6),
    Shape("decode-olmoe", 64, 2048, 1024, 64, 8),
)
SMOKE_SHAPES = (Shape("smoke", 64, 32, 64, 4, 2), Shape("smoke-decode", 8, 32, 64, 4, 2))


def dirichlet_group_sizes(m: int, e: int, alpha: float = 1.0, seed: int = 0) -> np.ndarray:
  """Uneven expert loads: multinomial(m, Dirichlet(alpha)) (some experts may get zero rows)."""
  rng = np.random.default_rng(seed)
  return rng.multinomial(m, rng.dirichlet([alpha] * e)).astype(np.int32)


def time_jax(fn, *args, reps: int) -> float:
  """Median seconds per call after one warm-up (compile) call."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def _fwd_bwd(matmul):
  """jit(grad) of sum(matmul(lhs, rhs)) w.r.t. both operands: forward + dlhs + drhs."""
  def loss(lhs, rhs):
    return matmul(lhs, rhs).astype(jnp.float32).sum()
  return jax.jit(jax.grad(loss, argnums=(0, 1)))


def _tokamax_ragged_dot():
  try:
    import tokamax  # pylint: disable=g-import-not-at-top
    return tokamax.ragged_dot
  except Exception:  # pylint: disable=broad-except
    return None


def _torch_grouped_mm(lhs, rhs, sizes, reps):
  """(fwd_s, fwd_bwd_s) of torch._grouped_mm on CUDA, or None when torch/CUDA is missing."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
    if not torch.cuda.is_available() or not hasattr(torch, "_grouped_mm"):
      return None
    a = torch.from_numpy(np.asarray(lhs.astype(jnp.float32))).cuda().bfloat16().requires_grad_()
    # _grouped_mm wants the expert weights with K as the fastest-moving dim of each [K, N] matrix.
    b = torch.from_numpy(np.asarray(rhs.astype(jnp.float32))).cuda().bfloat16()
    b = b.transpose(-2, -1).contiguous().transpose(-2, -1).requires_grad_()
    offs = torch.from_numpy(np.cumsum(sizes).astype(np.int32)).cuda()

    def run(backward):
      out = torch._grouped_mm(a, b, offs=offs)  # pylint: disable=protected-access
      if backward:
        out.float().sum().backward()

    def med(backward):
      run(backward)
      torch.cuda.synchronize()
      times = []
      for _ in range(reps):
        start = time.perf_counter()
        run(backward)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
      return statistics.median(times)
    return med(False), med(True)
  except Exception as err:  # pylint: disable=broad-except
    print(f"  torch._grouped_mm unavailable: {type(err).__name__}: {err}", file=sys.stderr)
    return None


def bench_gmm(shape: Shape, dtype, reps: int, interpret: bool) -> list[tuple[str, float, float]]:
  """Rows (implementation, fwd TFLOP/s, fwd+bwd TFLOP/s) for one shape."""
  m = shape.t * shape.k
  sizes = dirichlet_group_sizes(m, shape.e)
  kx, kw = jax.random.split(jax.random.key(0))
  lhs = jax.random.normal(kx, (m, shape.d), jnp.float32).astype(dtype)
  rhs = (jax.random.normal(kw, (shape.e, shape.d, shape.f), jnp.float32) * 0.02).astype(dtype)
  gs = jnp.asarray(sizes)
  flops = 2.0 * m * shape.d * shape.f

  impls = {
      "moejax gmm (pallas)": lambda a, b: gmm_lib.gmm(a, b, gs, interpret=interpret),
      "jax.lax.ragged_dot": lambda a, b: jax.lax.ragged_dot(a, b, gs),
      "dense jnp.dot (same FLOPs)": lambda a, b: jnp.dot(a, b[0]),
  }
  tokamax_rd = _tokamax_ragged_dot()
  if tokamax_rd is not None and not interpret:
    impls["tokamax.ragged_dot"] = lambda a, b: tokamax_rd(a, b, gs)
  if shape.t <= 256:
    bounds = np.concatenate([[0], np.cumsum(sizes)])

    def per_expert_loop(a, b):  # decode baseline: one dense matmul per expert, static slices
      outs = [a[bounds[i]:bounds[i + 1]] @ b[i] for i in range(shape.e)]
      return jnp.concatenate(outs, axis=0)
    impls["dense per-expert loop"] = per_expert_loop

  rows = []
  for name, fn in impls.items():
    try:
      fwd_s = time_jax(jax.jit(fn), lhs, rhs, reps=reps)
      bwd_s = time_jax(_fwd_bwd(fn), lhs, rhs, reps=reps)
      rows.append((name, flops / fwd_s / 1e12, 3 * flops / bwd_s / 1e12))
    except Exception as err:  # pylint: disable=broad-except
      print(f"  {name} failed: {type(err).__name__}: {str(err)[:200]}", file=sys.stderr)
  if not interpret:
    torch_s = _torch_grouped_mm(lhs, rhs, sizes, reps)
    if torch_s is not None:
      rows.append(("torch._grouped_mm", flops / torch_s[0] / 1e12, 3 * flops / torch_s[1] / 1e12))
  return rows


def _xla_router(logits_TxE, bias_E, *, top_k, score_fn):
  """The XLA path: reference `route` plus the balance statistics the fused kernel also returns."""
  try:
    from moejax.model import routing  # pylint: disable=g-import-not-at-top
  except ImportError:
    return router_lib.route_tile(logits_TxE, bias_E[None], jnp.ones((logits_TxE.shape[0], 1)),
                                 k=top_k, kp=top_k, score_fn=score_fn, renormalize=True, scale=1.0)
  r = routing.route(logits_TxE, bias_E, top_k=top_k, score_fn=score_fn, renormalize=True)
  counts = jax.nn.one_hot(r.expert_idx_TxK, logits_TxE.shape[1], dtype=jnp.float32).sum((0, 1))
  return r.expert_idx_TxK, r.gates_TxK, r.scores_TxE, counts, r.scores_TxE.sum(0)


def bench_router(shape: Shape, reps: int, interpret: bool) -> list[tuple[str, float]]:
  """Rows (implementation, microseconds) for routing T tokens over E experts."""
  logits = jax.random.normal(jax.random.key(1), (shape.t, shape.e), jnp.float32)
  bias = jnp.zeros((shape.e,), jnp.float32)
  kw = dict(top_k=shape.k, score_fn="softmax")
  fused = jax.jit(functools.partial(router_lib.fused_route, renormalize=True, interpret=interpret,
                                    **kw))
  xla = jax.jit(functools.partial(_xla_router, **kw))
  return [("fused router (pallas)", 1e6 * time_jax(fused, logits, bias, reps=reps)),
          ("XLA router", 1e6 * time_jax(xla, logits, bias, reps=reps))]


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--smoke", action="store_true", help="tiny shapes; runs on CPU (interpret)")
  parser.add_argument("--shapes", default="", help="comma-separated subset of shape names")
  parser.add_argument("--reps", type=int, default=20)
  args = parser.parse_args(argv)
  backend = jax.default_backend()
  if not args.smoke and backend != "gpu":
    print(f"moejax.bench.kernels: the GPU figures need a GPU (backend here: {backend}). Run "
          "`python -m moejax.bench.kernels` on a GPU machine, or `--smoke` to check the code paths.")
    return 0
  shapes = SMOKE_SHAPES if args.smoke else SHAPES
  if args.shapes:
    wanted = set(args.shapes.split(","))
    shapes = tuple(s for s in shapes if s.name in wanted)
  interpret = backend == "cpu"
  reps = 2 if args.smoke else args.reps
  dtype = jnp.float32 if interpret else jnp.bfloat16
  print(f"# device: {jax.devices()[0].device_kind} ({backend}), jax {jax.__version__}, "
        f"dtype {jnp.dtype(dtype).name}, reps {reps}{', INTERPRET MODE (no speed meaning)' if interpret else ''}")
  for shape in shapes:
    print(f"\n## {shape.name}: T={shape.t} D={shape.d} F={shape.f} E={shape.e} k={shape.k} "
          f"(GEMM [T*k, D] x [E, D, F], Dirichlet(1) group sizes)")
    print("| implementation | fwd TFLOP/s | fwd+bwd TFLOP/s |\n|---|---|---|")
    for name, fwd, both in bench_gmm(shape, dtype, reps, interpret):
      print(f"| {name} | {fwd:.4g} | {both:.4g} |")
    print("| router | time (us) |\n|---|---|")
    for name, micros in bench_router(shape, reps, interpret):
      print(f"| {name} | {micros:.1f} |")
  return 0


if __name__ == "__main__":
  sys.exit(main())
