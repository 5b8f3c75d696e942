"""Engine: greedy == naive full-forward loop under left padding, no recompiles in a bucket,
sampling filters against a numpy reference, stop sequences / EOS, throughput and NLL pieces."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax.infer import Engine, SamplingParams, bucket_length, generate, sampling
from moejax.model import ModelConfig, Transformer

CODE = """def add(a, b):
    return a + b

def mul(a, b):
    \"\"\"Multiply two numbers.\"\"\"
    return a * b

class Point:
    def __init__(self, x, y):
        self.x = x
        self.y = y

for i in range(10):
    print(i, add(i, i), mul(i, 2))
"""


def tiny_tokenizer(vocab_size: int = 320):
  """A byte-level BPE with `<|pad|>` = 0 and `<|endoftext|>` = 1, trained on a few snippets."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|pad|>", "<|endoftext|>"],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  tok.train_from_iterator([CODE] * 4, trainer)
  return tok


DENSE = ModelConfig(vocab_size=320, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, ff_dim=64,
                    max_seq_len=64, compute_dtype="float32", init_std=0.3, num_experts=0)
MOE = DENSE.replace(num_experts=4, top_k=2, expert_ff_dim=32, balance=("aux_loss",))


pytestmark = pytest.mark.usefixtures("fast_compiles")   # tests/conftest.py


def _model(cfg, seed=0):
  return Transformer(cfg, rngs=nnx.Rngs(seed))


def _naive_greedy(model, prompts, n, width=32):
  """Reference: a full causal forward (no cache) over each whole unpadded sequence per new token.

  Rows are right-padded to a fixed width (causal attention: later slots cannot change earlier
  logits) so the reference compiles once; each row's logits are read at its own last token.
  """
  fwd = nnx.jit(lambda m, t: m(t))
  seqs = [list(p) for p in prompts]
  margins = []
  for _ in range(n):
    tokens = np.zeros((len(seqs), width), np.int32)
    for i, s in enumerate(seqs):
      tokens[i, :len(s)] = s
    logits = np.asarray(fwd(model, jnp.asarray(tokens)))
    for i, s in enumerate(seqs):
      row = logits[i, len(s) - 1]
      top2 = np.sort(row)[-2:]
      margins.append(top2[1] - top2[0])
      s.append(int(np.argmax(row)))
  return [s[len(p):] for s, p in zip(seqs, prompts)], min(margins)


@pytest.mark.parametrize("device_loop", [False, True], ids=["host_loop", "device_loop"])
@pytest.mark.parametrize("cfg", [DENSE, MOE], ids=["dense", "moe"])
def test_greedy_matches_naive_loop_with_left_padding(cfg, device_loop):
  model = _model(cfg)
  rng = np.random.default_rng(0)
  prompts = [list(rng.integers(2, cfg.vocab_size, size=n)) for n in (3, 9, 1, 6)]
  engine = Engine(model, None, batch_size=4, min_bucket=8, eos_ids=(), pad_id=0)
  gens = engine.generate(prompts, max_new_tokens=6, device_loop=device_loop)
  expected, margin = _naive_greedy(model, prompts, 6)
  assert margin > 1e-4, "reference has a near-tie; pick another seed"
  for g, want in zip(gens, expected):
    assert g.tokens == want
    assert g.finish_reason == "length"
    assert len(g.token_latencies_s) == 5 and g.ttft_s > 0


@pytest.mark.parametrize("device_loop", [False, True], ids=["host_loop", "device_loop"])
def test_same_bucket_does_not_recompile(device_loop):
  model = _model(DENSE.replace(rope_theta=1234.0 + device_loop))  # a graph no other test compiled
  engine = Engine(model, None, batch_size=2, min_bucket=16, eos_ids=(), pad_id=0)
  step = "loop" if device_loop else "decode"
  engine.generate([[5, 6, 7]], max_new_tokens=4, device_loop=device_loop)
  counts = dict(engine.trace_counts)
  assert counts == {"prefill": 1, step: 1}
  engine.generate([[5, 6, 7, 8, 9, 10, 11, 12, 13], [4] * 15], max_new_tokens=3, temperature=0.7,
                  top_k=5, top_p=0.9, seed=3, device_loop=device_loop)
  engine.eos_ids = frozenset({3})
  engine.generate([[5, 6]], max_new_tokens=4, ignore_eos=True, device_loop=device_loop)
  # other lengths, same bucket, other knobs, EOS ids and max_new_tokens: no retrace
  assert dict(engine.trace_counts) == counts
  engine.generate([[5] * 17], max_new_tokens=4, device_loop=device_loop)  # next bucket: one more
  assert dict(engine.trace_counts) == {"prefill": 2, step: 2}
  assert bucket_length(17, 16) == 32 and bucket_length(3, 16) == 16 and bucket_length(16, 16) == 16


def _np_filtered_probs(logits, temperature, top_k, top_p):
  z = logits / temperature
  order = np.argsort(-z, kind="stable")
  keep = np.zeros_like(z, bool)
  k = top_k if top_k > 0 else len(z)
  keep[order[:k]] = True
  p = np.where(keep, np.exp(z - z.max()), 0.0)
  p /= p.sum()
  mass = 0.0
  nucleus = np.zeros_like(keep)
  for i in order[:k]:
    if mass < top_p or not nucleus.any():
      nucleus[i] = True
    mass += p[i]
  q = np.where(nucleus, p, 0.0)
  return q / q.sum()


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 3, 1.0), (1.3, 0, 0.6),
                                                     (1.0, 4, 0.8)])
def test_sampling_distribution_matches_numpy(temperature, top_k, top_p):
  logits = np.array([2.0, 1.5, 1.0, 0.2, -0.5, 0.9, -1.0, 0.0], np.float32)
  n = 20000
  keys = jax.random.split(jax.random.key(1), n)
  params = sampling.SamplingParams(temperature, top_k, top_p)
  draws = jax.jit(lambda k: sampling.sample(jnp.broadcast_to(logits, (n, 8)), k, *params.as_arrays())
                  )(keys)
  freq = np.bincount(np.asarray(draws), minlength=8) / n
  expected = _np_filtered_probs(logits.astype(np.float64), temperature, top_k, top_p)
  assert np.all(freq[expected == 0] == 0)
  np.testing.assert_allclose(freq, expected, atol=0.015)


def test_greedy_and_degenerate_filters_pick_argmax():
  logits = jax.random.normal(jax.random.key(0), (16, 50))
  keys = jax.random.split(jax.random.key(2), 16)
  argmax = np.asarray(jnp.argmax(logits, -1))
  for t, k, p in ((0.0, 0, 1.0), (1.0, 1, 1.0), (1.0, 0, 1e-6)):
    got = sampling.sample(logits, keys, *sampling.SamplingParams(t, k, p).as_arrays())
    np.testing.assert_array_equal(np.asarray(got), argmax)
  with pytest.raises(ValueError, match="top_p"):
    sampling.SamplingParams(1.0, 0, 0.0)


def test_sampling_is_seeded_and_independent_of_batching():
  model = _model(DENSE)
  prompts = [[3, 4, 5], [9, 8, 7, 6, 5], [11]]
  opts = dict(max_new_tokens=5, temperature=1.0, top_p=0.95, seed=7)
  a = Engine(model, None, batch_size=4, min_bucket=8, eos_ids=(), pad_id=0).generate(prompts, **opts)
  b = Engine(model, None, batch_size=1, min_bucket=8, eos_ids=(), pad_id=0).generate(prompts, **opts)
  assert [g.tokens for g in a] == [g.tokens for g in b]
  engine = Engine(model, None, batch_size=4, min_bucket=8, eos_ids=(), pad_id=0)
  assert [g.tokens for g in engine.generate(prompts, **opts)] == [g.tokens for g in a]
  c = engine.generate(prompts, **dict(opts, seed=8))
  assert [g.tokens for g in a] != [g.tokens for g in c]


@pytest.mark.parametrize("device_loop", [False, True], ids=["host_loop", "device_loop"])
def test_stop_sequences_and_eos_on_text(device_loop):
  tok = tiny_tokenizer()
  model = _model(DENSE.replace(rope_theta=4321.0 + device_loop))
  prompt = "def add(a, b):"
  engine = Engine(model, tok, batch_size=1, min_bucket=16, eos_ids=())
  engine.loop_chunk = 5  # several device loops per batch
  free = engine.generate([prompt], max_new_tokens=12, device_loop=device_loop)[0]
  assert free.finish_reason == "length" and len(free.tokens) == 12
  assert free.prompt_tokens == tok.encode(prompt).ids
  text = tok.decode(free.tokens, skip_special_tokens=True)
  assert free.text == text
  # Stop at a substring that appears in the free-running text: cut before it, tokens end there.
  needle = text[len(text) // 2:len(text) // 2 + 2]
  assert needle
  stopped = engine.generate([prompt], max_new_tokens=12, stop=["@@never@@", needle],
                            device_loop=device_loop)[0]
  assert stopped.finish_reason == "stop"
  assert stopped.text == text[:text.find(needle)]
  assert free.tokens[:len(stopped.tokens)] == stopped.tokens
  assert needle in tok.decode(stopped.tokens) and needle not in tok.decode(stopped.tokens[:-1])
  # EOS: declare the 4th greedy token to be the end-of-text id; it ends the row, not included.
  eos = free.tokens[3]
  first = free.tokens.index(eos)
  engine.eos_ids = frozenset({eos})
  ended = engine.generate([prompt], max_new_tokens=12, device_loop=device_loop)[0]
  assert ended.finish_reason == "eos" and ended.tokens == free.tokens[:first]
  assert ended.text == tok.decode(free.tokens[:first])
  assert engine.generate([prompt], max_new_tokens=12, ignore_eos=True,
                         device_loop=device_loop)[0].tokens == free.tokens
  assert dict(engine.trace_counts) == {"prefill": 1, "loop" if device_loop else "decode": 1}


@pytest.mark.parametrize("cfg", [DENSE, MOE], ids=["dense", "moe"])
@pytest.mark.parametrize("sampling_opts", [dict(), dict(temperature=1.0, top_p=0.9, seed=5),
                                           dict(temperature=0.8, seed=2)], ids=["greedy", "top_p", "plain"])
def test_device_loop_equals_host_loop(cfg, sampling_opts):
  """Same tokens, finish reasons, latency counts and expert counts as one jitted call per token,
  with chunks shorter than the generation, EOS inside a chunk, and dummy rows in the last batch."""
  model = _model(cfg, seed=3)
  rng = np.random.default_rng(1)
  prompts = [list(rng.integers(2, cfg.vocab_size, size=n)) for n in (4, 11, 2, 7, 5)]
  engine = Engine(model, None, batch_size=3, min_bucket=8, eos_ids=(), pad_id=0)
  engine.loop_chunk = 4
  host = engine.generate(prompts, max_new_tokens=13, device_loop=False, **sampling_opts)
  dev = engine.generate(prompts, max_new_tokens=13, device_loop=True, **sampling_opts)
  assert [g.tokens for g in dev] == [g.tokens for g in host]
  assert [len(g.token_latencies_s) for g in dev] == [len(g.token_latencies_s) for g in host]
  engine.eos_ids = frozenset({host[1].tokens[5], host[3].tokens[2]})  # rows end mid-chunk
  host = engine.generate(prompts, max_new_tokens=13, device_loop=False, **sampling_opts)
  dev = engine.generate(prompts, max_new_tokens=13, device_loop=True, **sampling_opts)
  assert [(g.tokens, g.finish_reason) for g in dev] == [(g.tokens, g.finish_reason) for g in host]
  assert "eos" in [g.finish_reason for g in dev]
  stats = [engine.run_batch(prompts[:2], [0, 1], max_new_tokens=9, params=SamplingParams(),
                            ignore_eos=True, collect_experts=True, device_loop=d)[1]
           for d in (False, True)]
  assert len(stats[0].step_s) == len(stats[1].step_s) == 8
  np.testing.assert_array_equal(np.stack(stats[0].experts_per_step),
                                np.stack(stats[1].experts_per_step))


def test_convenience_generate_truncates_long_prompts_and_caches_engine():
  model = _model(DENSE)
  g = generate(model, None, [list(range(2, 100))], batch_size=1, max_new_tokens=8)[0]
  assert g.truncated_prompt and len(g.prompt_tokens) == 64 - 7 and len(g.tokens) == 8
  assert g.prompt_tokens == list(range(2, 100))[-(64 - 7):]
  again = generate(model, None, [list(range(2, 90))], batch_size=1, max_new_tokens=8)[0]
  assert len(again.tokens) == 8
  with pytest.raises(ValueError, match="empty prompt"):
    generate(model, None, [[]], batch_size=1, max_new_tokens=8)
