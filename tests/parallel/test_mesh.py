"""Mesh from config, logical rules -> shardings, batch assembly, distributed settings (no model compile)."""
import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, PartitionSpec as P

from moejax.model.config import ConfigError
from moejax.parallel import distributed, mesh as mesh_lib, train_sharding as ts
from tests.parallel import BATCH, fixed_batch, init_state, tiny_cfg


@pytest.mark.parametrize("sizes,expected", [
    ({"data": -1}, (8, 1, 1, 1)),
    ({"data": 2, "expert": 4}, (2, 1, 4, 1)),
    ({"data": -1, "expert": 8}, (1, 1, 8, 1)),
    ({"data": 1, "fsdp": 2, "expert": -1}, (1, 2, 4, 1)),
    ({"data": 2, "fsdp": 2, "expert": 1, "tensor": 2}, (2, 2, 1, 2)),
])
def test_mesh_shape_resolves_rest(sizes, expected):
  mesh = mesh_lib.make_mesh(sizes)
  assert tuple(mesh.shape[a] for a in mesh_lib.MESH_AXES) == expected
  assert mesh.devices.size == 8


@pytest.mark.parametrize("sizes,match", [
    ({"data": 4, "expert": 4}, r"needs 16 devices but 8 are available"),
    ({"data": 3, "expert": -1}, r"mesh\.expert=-1.*3 devices.*does not divide the 8"),
    ({"data": -1, "expert": -1}, r"only one axis may be -1"),
    ({"data": 0}, r"mesh\.data=0: expected a positive int or -1"),
    ({"data": 2.0}, r"mesh\.data=2\.0"),
    ({"pipeline": 2}, r"unknown axes \['pipeline'\]"),
])
def test_mesh_errors_name_the_field(sizes, match):
  with pytest.raises(ConfigError, match=match):
    mesh_lib.make_mesh(sizes)


def test_explicit_and_auto_axis_types():
  explicit = mesh_lib.make_mesh({"data": 2, "expert": 4}, explicit=True)
  assert set(explicit.axis_types) == {AxisType.Explicit}
  auto = ts.auto_mesh(explicit)
  assert set(auto.axis_types) == {AxisType.Auto}
  assert auto.axis_names == explicit.axis_names
  assert (auto.devices == explicit.devices).all()
  assert ts.auto_mesh(auto) is auto


def test_experts_and_batch_must_divide():
  mesh = mesh_lib.make_mesh({"data": 2, "expert": 4})
  mesh_lib.check_model_fits(mesh, 8, batch_size=8)
  with pytest.raises(ConfigError, match=r"moe\.num_experts=6: expected a multiple of the expert mesh "
                     r"axis \(mesh\.expert=4\)"):
    mesh_lib.check_model_fits(mesh, 6)
  with pytest.raises(ConfigError, match=r"train\.batch_size=4: expected a multiple of the 8 batch shards"):
    mesh_lib.check_model_fits(mesh, 8, batch_size=4)


def test_from_config_uses_rules_key_and_checks_experts():
  from moejax.train import config_lib
  config = config_lib.default_config()
  config.mesh.update(data=2, expert=4)
  mesh, rules = mesh_lib.from_config(config, num_experts=8, batch_size=16)
  assert rules == mesh_lib.DEFAULT_RULES and mesh.shape["expert"] == 4
  with pytest.raises(ConfigError, match="moe.num_experts=6"):
    mesh_lib.from_config(config, num_experts=6)
  assert mesh_lib.rules_from_config({"rules": [("batch", "data"), ("expert", None)]}) == (
      ("batch", "data"), ("expert", None))
  with pytest.raises(ConfigError, match=r"mesh\.rules: 'batch' maps to unknown mesh axes \['pod'\]"):
    mesh_lib.rules_from_config({"rules": [("batch", ("pod", "data"))]})
  assert len(mesh_lib.DEFAULT_RULES) <= 12


def test_default_mesh_shrinks_to_the_batch_but_explicit_meshes_must_fit():
  from moejax.train import config_lib
  config = config_lib.default_config()          # mesh data=-1: "every device"
  mesh, _ = mesh_lib.from_config(config, num_experts=8, batch_size=16)
  assert mesh.devices.size == 8
  mesh, _ = mesh_lib.from_config(config, num_experts=8, batch_size=2)   # 2 rows, 8 devices
  assert mesh.shape["data"] == 2 and mesh.devices.size == 2
  config.mesh.update(data=-1, expert=2)          # set explicitly: no silent shrinking.
  with pytest.raises(ConfigError, match=r"train\.batch_size=2: expected a multiple of the 8 batch"):
    mesh_lib.from_config(config, num_experts=8, batch_size=2)


def test_param_shardings_follow_logical_axes():
  cfg = tiny_cfg(num_zero_experts=4)     # router over 12 routed experts: 12 % 8 != 0.
  _, _, _, state = init_state(cfg)
  mesh = mesh_lib.make_mesh({"fsdp": 2, "expert": 4})
  sh = ts.state_shardings(state, mesh, mesh_lib.DEFAULT_RULES)
  ffn = sh.params["blocks"][0]["ffn"]
  spec = lambda v: v.get_value().spec if hasattr(v, "get_value") else v.value.spec
  assert spec(ffn["w_gate_EDF"]) == P("expert", "fsdp", "tensor")
  assert spec(ffn["w_down_EFD"]) == P("expert", "tensor", "fsdp")
  assert spec(sh.params["embed"]["embedding_VxD"]) == P("tensor", "fsdp")
  assert spec(ffn["router"]["w_DxE"]) == P("fsdp", "expert")           # 12 % 4 == 0
  mesh8 = mesh_lib.make_mesh({"expert": 8})
  sh8 = ts.state_shardings(state, mesh8, mesh_lib.DEFAULT_RULES)
  assert spec(sh8.params["blocks"][0]["ffn"]["router"]["w_DxE"]) == P("fsdp", None)  # 12 % 8 != 0
  # AdamW moments mirror the params; step/rng are replicated.
  for path, s in jax.tree_util.tree_leaves_with_path(sh):
    if "w_gate_EDF" in jax.tree_util.keystr(path):
      assert s.spec == P("expert", "fsdp", "tensor"), jax.tree_util.keystr(path)
  assert sum("w_gate_EDF" in jax.tree_util.keystr(p) for p, _ in
             jax.tree_util.tree_leaves_with_path(sh.opt_state)) == 3 * cfg.num_layers   # grads, mu, nu
  leaves = jax.tree.leaves(sh)
  assert all(isinstance(s, jax.sharding.NamedSharding) for s in leaves)
  assert sh.step.spec == P() and sh.rng.spec == P()
  placed = ts.shard_state(state, sh)
  w = placed.params["blocks"][0]["ffn"]["w_gate_EDF"]
  w = w.get_value() if hasattr(w, "get_value") else w.value
  assert w.sharding.shard_shape(w.shape) == (2, 16, 16)
  np.testing.assert_array_equal(np.asarray(w), np.asarray(nnx.to_pure_dict(state.params)
                                                          ["blocks"][0]["ffn"]["w_gate_EDF"]))


def test_global_batch_from_process_local_rows():
  mesh = mesh_lib.make_mesh({"data": 2, "expert": 4}, explicit=True)
  batch = fixed_batch()
  g = ts.global_batch(batch, mesh)
  assert g["tokens"].shape == (BATCH, 16)
  assert g["tokens"].sharding.spec == P(("data", "fsdp", "expert"), None)
  np.testing.assert_array_equal(np.asarray(g["tokens"]), batch["tokens"])
  with pytest.raises(ValueError, match=r"'tokens' has 4 global rows .* not a multiple of the 8"):
    ts.global_batch({"tokens": batch["tokens"][:4]}, mesh)


def test_distributed_settings_from_env_and_errors():
  env = {"MOEJAX_COORDINATOR_ADDRESS": "127.0.0.1:1234", "MOEJAX_NUM_PROCESSES": "2",
         "MOEJAX_PROCESS_ID": "1"}
  assert distributed.resolve(env) == {"coordinator_address": "127.0.0.1:1234", "num_processes": 2,
                                      "process_id": 1}
  assert distributed.resolve({}) is None
  with pytest.raises(ValueError, match=r"\['process_id'\] not set"):
    distributed.resolve({k: v for k, v in env.items() if "PROCESS_ID" not in k})
  with pytest.raises(ValueError, match=r"process_id=2 must be in \[0, num_processes=2\)"):
    distributed.resolve({**env, "MOEJAX_PROCESS_ID": "2"})
  with pytest.raises(ValueError, match="expected host:port"):
    distributed.resolve({**env, "MOEJAX_COORDINATOR_ADDRESS": "localhost"})
  assert distributed.cluster_detected({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}) == "slurm"
  assert distributed.cluster_detected({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}) is None
  assert distributed.cluster_detected({"MOEJAX_DISTRIBUTED": "auto"}) == "auto"
  assert distributed.cluster_detected({}) is None
