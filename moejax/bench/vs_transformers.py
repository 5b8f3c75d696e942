"""moejax vs Hugging Face `transformers` on the same weights (issue 8 benchmark; not a test).

    python -m moejax.bench.vs_transformers [--models olmoe,deepseek] [--impls eager,grouped_mm]
                                           [--rounds N] [--compile] [--gpu]

For each model a random `transformers` model is saved with `save_pretrained`, converted with
`moejax.convert.import_hf` and both are measured, each framework/setting in its own subprocess (so
the peak resident memory, `ru_maxrss`, is that framework's alone):
  train    tokens/s of one training step: forward + backward + AdamW (moejax: the trainer's
           `make_train_step` with clipping and the ALF-LB bias update; torch: `labels=` loss,
           `backward`, grad clipping, `torch.optim.AdamW`), batch B x L, after a warm-up step.
  prefill  tokens/s of a cache-filling forward over the same B x L batch that returns the next
           token's logits (the last position's only, as generation does; transformers
           `logits_to_keep=1`, moejax `forward_hidden` then `logits` of the last position).
  decode   greedy tokens/s at batch 1 and 16 after a 16-token prompt, N-1 decode steps after the
           first token (moejax: `moejax.infer.Engine.run_batch`, the decode steps' time; the table
           shows the on-device `while_loop` decode (`device_loop=True`), the JSON line also the
           host loop of one jitted step per token as decode_b*_host; torch:
           `generate(do_sample=False)`, measured as generate(1 + N tokens) - generate(1 token)).
moejax's train step is checked not to retrace or recompile after its warm-up step (the state is
committed to the device first, so the donated outputs have the inputs' placement).
transformers settings: `experts_implementation` "eager" (the per-expert loop), "grouped_mm",
"batched_mm", and with --compile `torch.compile` of the model (training and prefill) and
`generate`'s compiled decoding (static cache + `CompileConfig`, forced on for CPU).
CPU shapes follow the issue: d_model 256, 4 layers, 16 experts of ff 128, top-4, vocab 8192,
batch 8 x 256, fp32. --gpu uses the issue's GPU OLMoE shape (d_model 2048, 64 experts of ff 1024,
top-8, vocab 50304, batch 8 x 2048, bf16).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

SHAPES = {
    "cpu": dict(d=256, layers=4, heads=4, experts=16, ff=128, top_k=4, vocab=8192, batch=8, seq=256,
                dtype="float32"),
    "gpu": dict(d=2048, layers=4, heads=16, experts=64, ff=1024, top_k=8, vocab=50304, batch=8,
                seq=2048, dtype="bfloat16"),
}


def hf_config(model: str, s: dict):
  import transformers  # pylint: disable=import-outside-toplevel
  common = dict(vocab_size=s["vocab"], hidden_size=s["d"], num_hidden_layers=s["layers"],
                num_attention_heads=s["heads"], num_key_value_heads=s["heads"],
                max_position_embeddings=4096, tie_word_embeddings=False, bos_token_id=None,
                eos_token_id=None, pad_token_id=0, num_experts_per_tok=s["top_k"])
  if model == "olmoe":
    return transformers.OlmoeConfig(**common, intermediate_size=s["ff"], num_experts=s["experts"])
  hd = s["d"] // s["heads"]
  return transformers.DeepseekV3Config(
      **common, intermediate_size=4 * s["ff"], moe_intermediate_size=s["ff"],
      n_routed_experts=s["experts"], n_shared_experts=1, first_k_dense_replace=1, n_group=4,
      topk_group=2, q_lora_rank=s["d"] // 2, kv_lora_rank=s["d"] // 4, qk_nope_head_dim=hd // 2,
      qk_rope_head_dim=hd // 4, v_head_dim=hd // 2)


def _timed(fn, repeats: int) -> float:
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - t0)
  return best


def run_moejax(run_dir: str, s: dict, args) -> dict:
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  import moejax  # pylint: disable=import-outside-toplevel
  from moejax.infer import Engine, SamplingParams  # pylint: disable=import-outside-toplevel
  from moejax.train import step as step_lib  # pylint: disable=import-outside-toplevel

  model, config = moejax.load(run_dir)
  cfg = model.cfg
  b, l = s["batch"], s["seq"]
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(1, s["vocab"], (b, l)), jnp.int32)
  batch = dict(tokens=tokens, segment_ids=jnp.ones((b, l), jnp.int32),
               positions=jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (b, l)))
  tx, schedule = step_lib.make_optimizer(config.opt, 1000)
  graphdef, params, model_state = nnx.split(model, nnx.Param, ...)
  # Committed to the device: the step's donated outputs are committed too, so the second call
  # reuses the first call's executable instead of compiling again for the new placement.
  state = jax.device_put(step_lib.TrainState(jnp.zeros((), jnp.int32), params, model_state,
                                             tx.init(params), jax.random.key(0)), jax.devices()[0])
  traces = [0]
  step_fn = step_lib.make_train_step(graphdef, tx, cfg, schedule)

  def counted(st, bt):
    traces[0] += 1  # Python side effect: once per trace.
    return step_fn(st, bt)

  train = jax.jit(counted, donate_argnums=(0,))
  holder = [state]

  def one_step():
    holder[0], metrics = train(holder[0], batch)
    jax.block_until_ready(metrics["loss"])

  one_step()
  compiled = train._cache_size()  # pylint: disable=protected-access
  out = {"train": b * l / _timed(one_step, args.repeats)}
  if traces[0] != 1 or train._cache_size() != compiled:  # pylint: disable=protected-access
    raise RuntimeError(f"moejax train step retraced ({traces[0]} traces) or recompiled while timed")
  model = nnx.merge(graphdef, holder[0].params, holder[0].model_state)
  graphdef, weights = nnx.split(model)

  @functools.partial(jax.jit, donate_argnums=(4,))
  def fwd(w, t, p, seg, cache):  # jax.jit on split state: no per-call nnx graph traversal.
    m = nnx.merge(graphdef, w)
    h, _, cache = m.forward_hidden(t, positions_BxL=p, segment_ids_BxL=seg, cache=cache)
    return jnp.argmax(m.logits(h[:, -1:])[:, 0], axis=-1).astype(jnp.int32), cache

  def prefill():
    nxt, _ = fwd(weights, batch["tokens"], batch["positions"], batch["segment_ids"],
                 model.init_cache(b, l))
    nxt.block_until_ready()

  prefill()
  out["prefill"] = b * l / _timed(prefill, args.repeats)
  n, p = args.decode_tokens, 16
  for db in (1, 16):
    prompts = rng.integers(1, s["vocab"], (db, p)).tolist()
    engine = Engine(model, None, batch_size=db, min_bucket=p, eos_ids=(), pad_id=0)
    for device_loop, key in ((True, f"decode_b{db}"), (False, f"decode_b{db}_host")):
      def decode(device_loop=device_loop, engine=engine, prompts=prompts, db=db):
        stats = engine.run_batch(prompts, list(range(db)), max_new_tokens=n,
                                 params=SamplingParams(), ignore_eos=True,
                                 device_loop=device_loop)[1]
        assert len(stats.step_s) == n - 1
        return sum(stats.step_s)

      decode()
      out[key] = db * (n - 1) / min(decode() for _ in range(args.repeats))
  return out


def run_torch(hf_dir: str, s: dict, impl: str, args) -> dict:
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel

  device = "cuda" if args.gpu else "cpu"
  dtype = torch.bfloat16 if s["dtype"] == "bfloat16" else torch.float32
  model = transformers.AutoModelForCausalLM.from_pretrained(
      hf_dir, dtype=dtype, attn_implementation="sdpa", experts_implementation=impl).to(device)
  b, l = s["batch"], s["seq"]
  g = torch.Generator().manual_seed(0)
  tokens = torch.randint(1, s["vocab"], (b, l), generator=g).to(device)
  opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
  fwd = torch.compile(model) if args.compile else model
  sync = torch.cuda.synchronize if args.gpu else (lambda: None)

  def one_step():
    loss = fwd(input_ids=tokens, labels=tokens).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    sync()

  model.train()
  one_step()
  out = {"train": b * l / _timed(one_step, args.repeats)}
  model.eval()

  def prefill():
    with torch.no_grad():
      fwd(input_ids=tokens, use_cache=True, logits_to_keep=1)
    sync()

  prefill()
  out["prefill"] = b * l / _timed(prefill, args.repeats)
  n, p = args.decode_tokens, 16
  compiled = {}
  if args.compile:  # generate's own torch.compile path: a static cache and a compiled forward.
    config = transformers.CompileConfig(fullgraph=False)
    config._compile_all_devices = True  # pylint: disable=protected-access  # off CUDA too (CPU)
    compiled = dict(cache_implementation="static", compile_config=config)
  for db in (1, 16):
    prompt = torch.randint(1, s["vocab"], (db, p), generator=g).to(device)

    def gen(k):
      with torch.no_grad():
        t0 = time.perf_counter()
        model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=k,
                       min_new_tokens=k, do_sample=False, eos_token_id=None, pad_token_id=0,
                       **compiled)
        sync()
        return time.perf_counter() - t0

    gen(n)  # warm-up (with --compile: compiles the decode step for this cache shape)
    pairs = [(gen(n), gen(1)) for _ in range(args.repeats)]  # interleaved: same load for both
    t_n, t_1 = min(p[0] for p in pairs), min(p[1] for p in pairs)
    if t_n > t_1:  # else the machine's noise exceeded the decode time: no number
      out[f"decode_b{db}"] = db * (n - 1) / (t_n - t_1)
  return out


def child(args) -> None:
  s = SHAPES["gpu" if args.gpu else "cpu"]
  if args.child == "moejax":
    out = run_moejax(args.run_dir, s, args)
  else:
    out = run_torch(args.hf_dir, s, args.child, args)
  peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  out["peak_mem_mb"] = peak_kb / 1024.0
  print("RESULT " + json.dumps(out))


def prepare(model: str, s: dict, root: str) -> tuple[str, str, int]:
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  from moejax.convert import import_hf  # pylint: disable=import-outside-toplevel
  torch.manual_seed(0)
  hf = transformers.AutoModelForCausalLM.from_config(hf_config(model, s))
  n_params = sum(p.numel() for p in hf.parameters())
  hf_dir, run_dir = os.path.join(root, model, "hf"), os.path.join(root, model, "run")
  hf.save_pretrained(hf_dir)
  import_hf(hf_dir, run_dir, param_dtype=s["dtype"], compute_dtype=s["dtype"])
  return hf_dir, run_dir, n_params


def _best(results: list[dict]) -> dict:
  """Per metric over rounds: the highest tok/s, the lowest peak RSS."""
  keys = {k for r in results for k in r}
  return {k: (min if k == "peak_mem_mb" else max)(r[k] for r in results if k in r) for k in keys}


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--models", default="olmoe,deepseek")
  ap.add_argument("--impls", default="eager,grouped_mm",
                  help="transformers experts_implementation list (batched_mm: ~5 min per model on CPU)")
  ap.add_argument("--compile", action="store_true", help="also torch.compile (grouped_mm)")
  ap.add_argument("--gpu", action="store_true")
  ap.add_argument("--repeats", type=int, default=2)
  ap.add_argument("--rounds", type=int, default=1,
                  help="run every framework/setting this many times, interleaved, and report the best "
                       "of each metric (transient load on a shared machine hits all alike)")
  ap.add_argument("--decode_tokens", type=int, default=16)
  ap.add_argument("--child", help=argparse.SUPPRESS)
  ap.add_argument("--hf_dir", help=argparse.SUPPRESS)
  ap.add_argument("--run_dir", help=argparse.SUPPRESS)
  args = ap.parse_args(argv)
  if args.child:
    child(args)
    return
  import jax, torch, transformers  # pylint: disable=import-outside-toplevel,multiple-imports
  s = SHAPES["gpu" if args.gpu else "cpu"]
  print(f"# jax {jax.__version__}, torch {torch.__version__}, transformers "
        f"{transformers.__version__}; {os.cpu_count()} CPUs; shape {s}")
  cols = ("train", "prefill", "decode_b1", "decode_b16", "peak_mem_mb")
  print("| model | framework | train tok/s | prefill tok/s | decode b=1 tok/s | decode b=16 tok/s "
        "| peak RSS MB |\n|---|---|---|---|---|---|---|")
  with tempfile.TemporaryDirectory() as root:
    for model in args.models.split(","):
      hf_dir, run_dir, n_params = prepare(model, s, root)
      runs = [("moejax", [])] + [(impl, []) for impl in args.impls.split(",")]
      if args.compile:
        runs.append(("grouped_mm", ["--compile"]))
      results = {i: [] for i in range(len(runs))}
      notes = {i: [] for i in range(len(runs))}
      for _ in range(args.rounds):
        for i, (impl, extra) in enumerate(runs):
          cmd = [sys.executable, "-m", "moejax.bench.vs_transformers", "--child", impl,
                 "--hf_dir", hf_dir, "--run_dir", run_dir, "--repeats", str(args.repeats),
                 "--decode_tokens", str(args.decode_tokens)] + extra + (["--gpu"] if args.gpu else [])
          t0 = time.time()
          proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
          lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
          if lines:
            results[i].append(json.loads(lines[0][7:]))
            notes[i].append(f"{time.time() - t0:.0f}s load {os.getloadavg()[0]:.1f}")
          else:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            notes[i].append(f"failed: {tail[0][:80]}")
      for i, (impl, extra) in enumerate(runs):
        name = ("moejax" if impl == "moejax" else f"transformers {impl}") + (" +compile" if extra else "")
        if not results[i]:
          print(f"| {model} ({n_params / 1e6:.1f}M) | {name} | {notes[i][-1]} |||||")
          continue
        r = _best(results[i])
        vals = " | ".join(f"{r[c]:,.0f}" if c in r else "-" for c in cols)
        host = "".join(f" decode_b{db}_host {r[f'decode_b{db}_host']:,.0f};" for db in (1, 16)
                       if f"decode_b{db}_host" in r)
        print(f"| {model} ({n_params / 1e6:.1f}M) | {name} | {vals} |  <!--{host} "
              f"{', '.join(notes[i])} -->", flush=True)


if __name__ == "__main__":
  main()
