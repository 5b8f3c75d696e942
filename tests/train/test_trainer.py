"""Trainer: config validation, resume bitwise, metrics files, NaN handling, load(), balancing."""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from moejax.model.config import ConfigError
from moejax.train import checkpoint, config_lib
from moejax.train.trainer import NonFiniteLossError, train_and_evaluate
from tests.train.conftest import REPO, seed_workdir, tiny_config

# finetune.py needs a source run (its own test below); every other config trains from scratch.
ALL_CONFIGS = sorted(f[:-3] for f in os.listdir(os.path.join(REPO, "configs"))
                     if f.endswith(".py") and not f.startswith("_") and f != "finetune.py")


def _params(workdir):
  model, _ = checkpoint.load(str(workdir))
  from flax import nnx
  return jax.tree.leaves(nnx.state(model))


@pytest.mark.parametrize("override,field", [
    ({"moe.top_k": 99}, "moe.top_k"),
    ({"moe.balance": "aux_loss,magic"}, "moe.balance"),
    ({"moe.n_groups": 3, "moe.topk_groups": 1}, "moe.n_groups"),
    ({"moe.n_groups": 2, "moe.topk_groups": 3}, "moe.topk_groups"),
    ({"train.batch_size": 0}, "train.batch_size"),
    ({"train.seq_len": 4096}, "train.seq_len"),
    ({"opt.lr": -1.0}, "opt.lr"),
    ({"model.num_heads": 3}, "model.num_heads"),
    ({"mesh.expert": 0}, "mesh.expert"),
])
def test_config_validation_names_the_field(override, field):
  config = tiny_config("base", **override)
  with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
    config_lib.validate(config)


def test_cli_rejects_bad_override_before_compiling(tmp_path):
  workdir = tmp_path / "run"
  proc = subprocess.run(
      [sys.executable, "-m", "moejax.train", "--config=configs/base.py:smoke",
       f"--workdir={workdir}", "--config.moe.top_k=99"],
      cwd=REPO, capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0
  assert "moe.top_k=99" in proc.stderr
  assert not (workdir / "checkpoints").exists()
  proc = subprocess.run(
      [sys.executable, "-m", "moejax.train", "--config=configs/base.py:smoke",
       f"--workdir={workdir}", "--config.moe.top_k=two"],
      cwd=REPO, capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0 and "top_k" in proc.stderr


@pytest.mark.parametrize("name", ALL_CONFIGS)
def test_every_config_trains_two_smoke_steps(name, tmp_path, tokenizer_dir):
  config = tiny_config(name)
  seed_workdir(tmp_path, tokenizer_dir, config)
  result = train_and_evaluate(config, str(tmp_path), progress=False)
  assert result["step"] == 2
  assert np.isfinite(result["loss"]) and np.isfinite(result["val_loss"])


def test_resume_is_bitwise_identical(tmp_path, tokenizer_dir):
  config = tiny_config("alf_lb", **{"train.num_steps": 6, "train.checkpoint_every": 100,
                                    "train.eval_every": 100})
  straight, chunked = tmp_path / "straight", tmp_path / "chunked"
  for w in (straight, chunked):
    seed_workdir(w, tokenizer_dir, config)
  train_and_evaluate(config, str(straight), progress=False)
  first = train_and_evaluate(config, str(chunked), max_steps_this_run=3, progress=False)
  assert first["step"] == 3
  assert checkpoint.manager(str(chunked), read_only=True).latest_step() == 3
  train_and_evaluate(config, str(chunked), progress=False)
  a, b = _params(straight), _params(chunked)
  assert len(a) == len(b)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _train_cli(workdir, *flags):
  """`python -m moejax.train` on the aux_loss smoke config in a fresh process (as a user runs it)."""
  return [sys.executable, "-m", "moejax.train", "--config=configs/aux_loss.py:smoke",
          f"--workdir={workdir}", "--config.train.num_steps=400",
          "--config.train.checkpoint_every=1000", "--config.train.eval_every=1000",
          "--config.train.log_every=1", *flags]


def test_sigterm_saves_and_resume_matches(tmp_path, tokenizer_dir):
  """SIGTERM mid-run saves; resuming gives bitwise the parameters of an uninterrupted run.

  Every run is its own fresh `python -m moejax.train` process: this pytest process may hold JAX
  settings of other tests (e.g. `jax_disable_most_optimizations`, which changes the float bits), so
  comparing a subprocess with an in-process run would test the harness, not the trainer.
  """
  config = tiny_config("aux_loss", **{"train.num_steps": 400, "train.checkpoint_every": 1000,
                                      "train.eval_every": 1000, "train.log_every": 1})
  killed, straight = tmp_path / "killed", tmp_path / "straight"
  for w in (killed, straight):
    seed_workdir(w, tokenizer_dir, config)
  proc = subprocess.Popen(_train_cli(killed), cwd=REPO, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT)
  try:
    deadline = time.time() + 180
    metrics = killed / "metrics.jsonl"
    while time.time() < deadline:
      if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
        break
      assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
      time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
  finally:
    if proc.poll() is None:
      proc.kill()
  stopped_at = checkpoint.manager(str(killed), read_only=True).latest_step()
  assert stopped_at is not None and 2 <= stopped_at < 400, stopped_at
  # Resume for 2 more steps; an uninterrupted run of as many steps (same num_steps, so the same LR
  # schedule), both at once (2 cores).
  runs = [subprocess.Popen(_train_cli(w, f"--max_steps_this_run={n}"), cwd=REPO,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
          for w, n in ((killed, 2), (straight, stopped_at + 2))]
  try:
    for p in runs:
      out, _ = p.communicate(timeout=300)
      assert p.returncode == 0, out.decode()[-3000:]
  finally:
    for p in runs:
      if p.poll() is None:
        p.kill()
  for w in (killed, straight):
    assert checkpoint.manager(str(w), read_only=True).latest_step() == stopped_at + 2
  for x, y in zip(_params(killed), _params(straight)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_metrics_files_have_the_contract_keys(tmp_path, tokenizer_dir):
  config = tiny_config("alf_lb", **{"train.num_steps": 4})
  seed_workdir(tmp_path, tokenizer_dir, config)
  train_and_evaluate(config, str(tmp_path), progress=False)
  rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  keys = set().union(*rows)
  expected = {"step", "loss", "val_loss", "lr", "grad_norm", "tokens_per_sec", "step_time_s", "mfu",
              "aux_loss", "z_loss", "max_vio_batch", "max_vio_global", "dropped_fraction",
              "max_vio_batch/layer_0", "max_vio_global/layer_0"}
  assert expected <= keys, expected - keys
  from moejax.summary import read_scalars
  scalars = read_scalars(str(tmp_path / "tb"))
  assert expected - {"step"} <= set(scalars), (expected - {"step"}) - set(scalars)
  assert [s for s, _ in scalars["loss"]] == [1, 2, 3, 4]
  from tensorboard.backend.event_processing import event_accumulator
  acc = event_accumulator.EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0})
  acc.Reload()
  assert "expert_load/train" in acc.Tags()["images"]


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, tokenizer_dir):
  config = tiny_config("base", **{"train.num_steps": 5, "train.checkpoint_every": 1,
                                  "opt.lr": 1e30, "opt.warmup_steps": 0, "opt.grad_clip": 0.0})
  seed_workdir(tmp_path, tokenizer_dir, config)
  with pytest.raises(NonFiniteLossError, match=r"non-finite loss .* step in \(\d+, \d+\]"):
    train_and_evaluate(config, str(tmp_path), progress=False)
  latest = checkpoint.manager(str(tmp_path), read_only=True).latest_step()
  assert latest is not None and latest >= 1
  model, _ = checkpoint.load(str(tmp_path))   # the last good checkpoint still loads
  assert model is not None


def test_load_gives_a_callable_model(tmp_path, tokenizer_dir):
  config = tiny_config("base")
  seed_workdir(tmp_path, tokenizer_dir, config)
  train_and_evaluate(config, str(tmp_path), progress=False)
  import moejax
  model, loaded_config = moejax.load(str(tmp_path))
  tokens = np.arange(12, dtype=np.int32).reshape(2, 6) % config.model.vocab_size
  logits = model(tokens)
  assert logits.shape == (2, 6, config.model.vocab_size)
  assert loaded_config.moe.num_experts == config.moe.num_experts
  again, _ = moejax.load(str(tmp_path / "checkpoints" / "2"))
  np.testing.assert_array_equal(np.asarray(again(tokens)), np.asarray(logits))
  with pytest.raises(FileNotFoundError, match="run directory"):
    moejax.load(str(tmp_path / "nope"))
  out = moejax.generate(model, loaded_config, ["def add(a, b):", "import os"], max_new_tokens=4)
  assert len(out) == 2 and all(len(g.tokens) <= 4 and isinstance(g.text, str) for g in out)


def _run_balance(tmp_path, tokenizer_dir, balance, name):
  config = tiny_config("alf_lb", **{
      "train.num_steps": 40, "train.batch_size": 4, "train.log_every": 1, "train.eval_every": 40,
      "moe.balance": balance, "moe.bias_update_rate": 5e-2, "moe.num_experts": 8})
  workdir = tmp_path / name
  seed_workdir(workdir, tokenizer_dir, config)
  train_and_evaluate(config, str(workdir), progress=False)
  rows = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  vio = [r["max_vio_batch"] for r in rows if "max_vio_batch" in r]
  return float(np.mean(vio[-15:]))


def test_alf_lb_lowers_max_vio_vs_no_balancing(tmp_path, tokenizer_dir):
  unbalanced = _run_balance(tmp_path, tokenizer_dir, "none", "none")
  alf = _run_balance(tmp_path, tokenizer_dir, "alf_lb", "alf")
  assert alf < unbalanced, (alf, unbalanced)


def test_loss_decreases_on_default_corpus(tmp_path, tokenizer_dir):
  config = tiny_config("base", **{"train.num_steps": 30, "train.log_every": 1,
                                  "train.batch_size": 4, "train.eval_every": 30})
  seed_workdir(tmp_path, tokenizer_dir, config)
  train_and_evaluate(config, str(tmp_path), progress=False)
  losses = [json.loads(l)["loss"] for l in (tmp_path / "metrics.jsonl").read_text().splitlines()
            if "loss" in json.loads(l)]
  assert np.mean(losses[-5:]) < np.mean(losses[:3]) - 0.5, losses


def test_sweep_dry_run_prints_one_command_per_point(tmp_path):
  proc = subprocess.run(
      [sys.executable, "launch/sweep.py", "--config=configs/alf_lb.py:smoke",
       f"--study_dir={tmp_path}", "--dry_run", "--config.train.num_steps=3"],
      cwd=REPO, capture_output=True, text=True, timeout=60)
  assert proc.returncode == 0, proc.stderr
  lines = [l for l in proc.stdout.splitlines() if "moejax.train" in l]
  assert len(lines) == 6
  assert all("--config.train.num_steps=3" in l and "--config.moe.top_k=" in l for l in lines)
  assert len({l.split("--workdir=")[1].split()[0] for l in lines}) == 6


def _finetune_config(source, **train):
  config = config_lib.load_config_file(os.path.join(REPO, "configs", "finetune.py") + f":{source}")
  config.train.update(num_steps=1, batch_size=2, seq_len=32, eval_every=1, eval_batches=1,
                      checkpoint_every=1, log_every=1, **train)
  config.opt.update(lr=1e-3, warmup_steps=0)
  config.train.seed = 1   # not the source's seed: a random init would be far from its weights.
  return config


def test_finetune_starts_from_the_source_weights(tmp_path, tokenizer_dir):
  """init_from a trained run and from a model-only (imported) checkpoint: after one AdamW step of
  lr 1e-3 every weight is within lr of the source's (a random init would be ~init_std away), each
  ALF-LB bias within u of the source's, and the source run is untouched."""
  from flax import nnx
  config = tiny_config("alf_lb", **{"train.num_steps": 2})
  source = tmp_path / "source"
  seed_workdir(source, tokenizer_dir, config)
  train_and_evaluate(config, str(source), progress=False)
  model, _ = checkpoint.load(str(source))
  imported = tmp_path / "imported"   # what moejax.convert writes: config + model item only.
  imported.mkdir()
  (imported / "config.json").write_text((source / "config.json").read_text())
  (imported / "tokenizer.json").write_text((source / "tokenizer.json").read_text())
  _, params, model_state = nnx.split(model, nnx.Param, ...)
  checkpoint.save_model_only(str(imported), 0, params, model_state)
  before = sorted(os.listdir(source / "checkpoints"))
  u = config.moe.bias_update_rate
  for name, src in (("from_run", source), ("from_import", imported),
                    ("from_step_dir", source / "checkpoints" / "2")):
    ft = _finetune_config(str(src))
    assert ft.data.tokenizer == str(source / "tokenizer.json") or name == "from_import"
    result = train_and_evaluate(ft, str(tmp_path / name), progress=False)
    assert result["step"] == 1 and np.isfinite(result["loss"])
    tuned, _ = checkpoint.load(str(tmp_path / name))
    deltas = [np.abs(np.asarray(a) - np.asarray(b)).max() for a, b in zip(
        jax.tree.leaves(nnx.state(tuned, nnx.Param)), jax.tree.leaves(nnx.state(model, nnx.Param)))]
    assert len(deltas) == len(jax.tree.leaves(params)) and max(deltas) <= 1.01e-3, (name, deltas)
    biases = [np.abs(np.asarray(a) - np.asarray(b)).max() for a, b in zip(
        jax.tree.leaves(nnx.state(tuned, nnx.Not(nnx.Param))),
        jax.tree.leaves(nnx.state(model, nnx.Not(nnx.Param))))]
    assert biases and max(biases) <= u * 1.0001, (name, biases)
  assert sorted(os.listdir(source / "checkpoints")) == before


def test_finetune_bad_source_names_the_field(tmp_path, tokenizer_dir):
  with pytest.raises(ConfigError, match="finetune.py"):
    config_lib.load_config_file(os.path.join(REPO, "configs", "finetune.py"))
  with pytest.raises(ConfigError, match="no config.json"):
    _finetune_config(str(tmp_path / "nowhere"))
  source = tmp_path / "source"
  config = tiny_config("alf_lb")
  seed_workdir(source, tokenizer_dir, config)
  train_and_evaluate(config, str(source), progress=False)
  bigger = _finetune_config(str(source))
  bigger.model.d_model = 64
  seed_workdir(tmp_path / "ft", tokenizer_dir, bigger)
  with pytest.raises(ConfigError, match=r"train.init_from=.*do not fit"):
    train_and_evaluate(bigger, str(tmp_path / "ft"), progress=False)
  empty = tiny_config("alf_lb", **{"train.init_from": str(tmp_path / "ft")})
  seed_workdir(tmp_path / "ft2", tokenizer_dir, empty)
  with pytest.raises(FileNotFoundError, match="train.init_from"):
    train_and_evaluate(empty, str(tmp_path / "ft2"), progress=False)
