"""Decode-sized routed experts on XLA CPU: seven ways to write them, timed (a benchmark).

    python -m moejax.bench.decode_experts                     # the OLMoE-like CPU shape, batch 16
    python -m moejax.bench.decode_experts --tokens 1 --layers 1

A decode step of batch B sends T = B tokens x top-k to E experts: a few rows per expert, so the
expert matmuls are weight-streaming GEMVs. This times one MoE layer's routed SwiGLU experts
(SwiGLU arXiv 2002.05202 Eq. 6, router softmax top-k) inside a `--steps`-step `fori_loop` over
`--layers` layers with distinct weights (4 layers of the CPU shape, 25 MB, do not fit this machine's
L3, as in the real decode loop), written as:

  tile_loop   `moejax.model.dispatch.sorted_experts` with the XLA ops (what `dropless` runs for
              T*K > E/2: sort, the fused tile loop of `moejax.kernels.xla`, unsort)
  gathered    `moejax.model.dispatch.gathered` (what `dropless` runs on CPU for T*K <= E/2): every
              copy's expert weights gathered, three batched matrix-vector products
  gathered_mul_reduce  the same gathered weights, the products as multiply + reduce
  padded      every expert's rows padded to C slots, three batched matmuls over [E, C, D] (no weight
              copies; exact only while no expert gets more than C rows)
  dense_flat  every token through every expert, weights laid out once outside the loop as [D, 2EF]
              and [EF, D] (one GEMM per projection), outputs weighted by the gates
  unrolled    one matmul per expert (static slices), rows padded to C
  mul_reduce  the matmuls as multiply + reduce (XLA loop fusions instead of GEMM calls)

and prints microseconds per layer call and the weight bytes read per microsecond (GB/s), next to
numpy's read bandwidth. All forms give the same output (`max_abs_diff` vs tile_loop) unless an
expert gets more than C rows (the padded forms then drop copies in GShard priority order).
Results of the 2-core CPU are in docs/benchmarks.md ("Decode at batch 16, looked at again").
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from moejax.kernels import get_ops
from moejax.model import dispatch


def make_layers(num_layers: int, e: int, d: int, f: int, seed: int = 0):
  """[(router_DxE, w_gate_EDF, w_up_EDF, w_down_EFD)] with distinct random weights per layer."""
  keys = jax.random.split(jax.random.key(seed), 4 * num_layers)
  layers = []
  for i in range(num_layers):
    k = keys[4 * i:4 * i + 4]
    layers.append((jax.random.normal(k[0], (d, e)), 0.05 * jax.random.normal(k[1], (e, d, f)),
                   0.05 * jax.random.normal(k[2], (e, d, f)),
                   0.05 * jax.random.normal(k[3], (e, f, d))))
  return layers


def _route(x_TxD, router_DxE, top_k: int):
  gates_TxK, idx_TxK = jax.lax.top_k(jax.nn.softmax(x_TxD @ router_DxE), top_k)
  return idx_TxK, gates_TxK


def _padded_rows(x_TxD, idx_TxK, num_experts: int, capacity: int):
  """x gathered into [E, C, D] (zeros in empty slots) and each copy's flat slot [T, K]; copies past
  C in GShard priority order (`dispatch.priority_positions`) go to the dump slot E * C."""
  t, k = idx_TxK.shape
  position_TxK, _ = dispatch.priority_positions(idx_TxK, num_experts)
  slot_TxK = jnp.where(position_TxK < capacity, idx_TxK * capacity + position_TxK,
                       num_experts * capacity)
  source = jnp.full((num_experts * capacity + 1,), t, jnp.int32).at[slot_TxK.reshape(-1)].set(
      jnp.arange(t * k, dtype=jnp.int32) // k)
  x_pad = jnp.concatenate([x_TxD, jnp.zeros_like(x_TxD[:1])])
  return x_pad[source[:-1]].reshape(num_experts, capacity, -1), slot_TxK


def _padded_form(experts_fn):
  """A form over padded rows: route, pad to [E, C, D], experts_fn(x_ExCxD, wg, wu, wd) ->
  out [E, C, D], combine with the gates (dump-slot copies get zeros)."""
  def form(x, layer, top_k, capacity):
    router, wg, wu, wd = layer
    idx, gates = _route(x, router, top_k)
    x_ExCxD, slot_TxK = _padded_rows(x, idx, wg.shape[0], capacity)
    out_ExCxD = experts_fn(x_ExCxD, wg, wu, wd)
    e, c, d = out_ExCxD.shape
    flat = jnp.concatenate([out_ExCxD.reshape(e * c, d), jnp.zeros((1, d), out_ExCxD.dtype)])
    return jnp.einsum("tkd,tk->td", flat[slot_TxK], gates)
  return form


def tile_loop(x, layer, top_k, capacity):
  del capacity
  router, wg, wu, wd = layer
  idx, gates = _route(x, router, top_k)
  return dispatch.sorted_experts(x, idx, gates, wg, wu, wd, get_ops("xla"))


@_padded_form
def padded(x_ExCxD, wg, wu, wd):
  h = jax.nn.silu(jnp.einsum("ecd,edf->ecf", x_ExCxD, wg)) * jnp.einsum("ecd,edf->ecf", x_ExCxD, wu)
  return jnp.einsum("ecf,efd->ecd", h, wd)


@_padded_form
def unrolled(x_ExCxD, wg, wu, wd):
  return jnp.stack([(jax.nn.silu(x_ExCxD[i] @ wg[i]) * (x_ExCxD[i] @ wu[i])) @ wd[i]
                    for i in range(wg.shape[0])])


@_padded_form
def mul_reduce(x_ExCxD, wg, wu, wd):
  xb = x_ExCxD[:, :, :, None]
  h = jax.nn.silu(jnp.sum(xb * wg[:, None], axis=2)) * jnp.sum(xb * wu[:, None], axis=2)
  return jnp.sum(h[:, :, :, None] * wd[:, None], axis=2)


def gathered_mul_reduce(x, layer, top_k, capacity):
  del capacity
  router, wg, wu, wd = layer
  idx, gates = _route(x, router, top_k)
  xb = x[:, None, :, None]                                  # [T, 1, D, 1]
  h = jax.nn.silu(jnp.sum(xb * wg[idx], axis=2)) * jnp.sum(xb * wu[idx], axis=2)   # [T, K, F]
  return jnp.einsum("tkd,tk->td", jnp.sum(h[..., None] * wd[idx], axis=2), gates)


def gathered(x, layer, top_k, capacity):
  del capacity
  router, wg, wu, wd = layer
  idx, gates = _route(x, router, top_k)
  return dispatch.gathered(x, idx, gates, wg, wu, wd)


def flat_layout(layer):
  """(router, [D, 2EF] gate|up, [EF, D] down): the dense_flat layout, built once per call."""
  router, wg, wu, wd = layer
  e, d, f = wg.shape
  gate_up = jnp.concatenate([wg.transpose(1, 0, 2).reshape(d, e * f),
                             wu.transpose(1, 0, 2).reshape(d, e * f)], axis=1)
  return router, gate_up, wd.reshape(e * f, d), e


def dense_flat(x, layer, top_k, capacity):
  del capacity
  router, gate_up, down, e = layer
  idx, gates = _route(x, router, top_k)
  ef = down.shape[0]
  gate_TxE = jnp.sum(jax.nn.one_hot(idx, e) * gates[..., None], axis=1)
  gu = x @ gate_up
  h = (jax.nn.silu(gu[:, :ef]) * gu[:, ef:]).reshape(x.shape[0], e, ef // e)
  return (h * gate_TxE[..., None]).reshape(x.shape[0], ef) @ down


FORMS = {"tile_loop": tile_loop, "padded": padded, "dense_flat": dense_flat, "unrolled": unrolled,
         "mul_reduce": mul_reduce, "gathered": gathered, "gathered_mul_reduce": gathered_mul_reduce}


def run_form(name: str, top_k: int, capacity: int, steps: int):
  """A jitted function: `steps` decode-like steps through every layer (residual updates)."""
  form = FORMS[name]

  @jax.jit
  def run(x, layers):
    if name == "dense_flat":
      layers = [flat_layout(layer) for layer in layers]

    def body(_, x):
      for layer in layers:
        x = x + 0.1 * form(x, layer, top_k, capacity)
      return x

    return jax.lax.fori_loop(0, steps, body, x)

  return run


def numpy_read_gbps(megabytes: int = 64) -> float:
  a = np.ones(megabytes * 2**20 // 4, np.float32)
  best = min(_seconds(a.sum) for _ in range(5))
  return megabytes / 1024 / best


def _seconds(fn) -> float:
  t0 = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - t0


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--tokens", type=int, default=16, help="decode batch (tokens per step)")
  ap.add_argument("--experts", type=int, default=16)
  ap.add_argument("--top_k", type=int, default=4)
  ap.add_argument("--d_model", type=int, default=256)
  ap.add_argument("--expert_ff", type=int, default=128)
  ap.add_argument("--layers", type=int, default=4)
  ap.add_argument("--capacity", type=int, default=8, help="slots per expert (the padded forms)")
  ap.add_argument("--steps", type=int, default=16)
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--forms", default=",".join(FORMS))
  args = ap.parse_args(argv)
  forms = args.forms.split(",")
  unknown = [f for f in forms if f not in FORMS]
  if unknown:
    ap.error(f"--forms: unknown {unknown}; expected names from {list(FORMS)}")
  layers = make_layers(args.layers, args.experts, args.d_model, args.expert_ff)
  x = jax.random.normal(jax.random.key(1), (args.tokens, args.d_model))
  weight_mb = 3 * args.experts * args.d_model * args.expert_ff * 4 / 2**20
  print(f"# T={args.tokens} tokens, E={args.experts}, top-{args.top_k}, D={args.d_model}, "
        f"F={args.expert_ff}, {args.layers} layers of {weight_mb:.1f} MB expert weights, C="
        f"{args.capacity}; numpy read {numpy_read_gbps():.1f} GB/s (one thread)")
  print("| form | us per layer | GB/s (all E experts' weights / time) | max_abs_diff vs tile_loop |"
        "\n|---|---|---|---|")
  compiled = {n: run_form(n, args.top_k, args.capacity, args.steps) for n in forms}
  outputs = {n: jax.block_until_ready(fn(x, layers)) for n, fn in compiled.items()}
  best = {n: float("inf") for n in forms}
  for _ in range(args.repeats):   # interleaved: this VM drifts by ~20% over minutes.
    for n, fn in compiled.items():
      best[n] = min(best[n], _seconds(lambda fn=fn: fn(x, layers)))
  reference = outputs.get("tile_loop")
  for n in forms:
    us = best[n] / (args.steps * args.layers) * 1e6
    diff = "-" if reference is None else f"{float(jnp.max(jnp.abs(outputs[n] - reference))):.1e}"
    print(f"| {n} | {us:,.0f} | {weight_mb * 2**20 / 1e9 / (us * 1e-6):.1f} | {diff} |")


if __name__ == "__main__":
  main()
