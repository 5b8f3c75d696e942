"""moejax.parallel: device meshes from config, expert parallelism (shard_map all-to-all),
TrainState/batch sharding for jit, and multi-process start-up (`jax.distributed`).

Modules: `mesh` (mesh + logical rules), `expert_parallel` (EP routed experts), `train_sharding`
(NamedShardings, global batches), `distributed` (flags/env/SLURM/TPU initialize). Import the
submodules directly; this package imports nothing eagerly (so `distributed`'s absl flags are only
defined by the programs that use them).
"""
