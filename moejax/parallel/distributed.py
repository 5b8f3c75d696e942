"""Multi-controller start-up: `jax.distributed.initialize` from flags, environment, SLURM or TPU VMs.

One Python process per host (or per GPU) runs the same program; `jax.distributed.initialize`
connects them through a coordinator so that `jax.devices()` lists every device of the job and jit
programs span them (JAX multi-controller runtime, as in MaxText).

Sources, first match wins:
  1. flags `--coordinator_address=host:port --num_processes=N --process_id=i` (this module defines
     them; importing it before `app.run` parses argv registers them);
  2. the same values from `MOEJAX_COORDINATOR_ADDRESS`, `MOEJAX_NUM_PROCESSES`, `MOEJAX_PROCESS_ID`;
  3. `MOEJAX_DISTRIBUTED=auto` (set by launch/tpu_pod.sh), a SLURM job step with more than one
     task, or TPU_WORKER_HOSTNAMES listing several hosts: jax's own cluster auto-detection
     (`jax.distributed.initialize()` with no arguments; SLURM, Cloud TPU VMs, ...);
  4. otherwise nothing: a single-process run.
On CPU, cross-process collectives use gloo (`jax_cpu_collectives_implementation`).
"""

from __future__ import annotations

import os

import jax
from absl import flags

_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0's coordinator (multi-process runs).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Total number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in [0, num_processes).")

ENV_PREFIX = "MOEJAX_"


def _flag(holder):
  try:
    return holder.value
  except flags.UnparsedFlagAccessError:
    return None


def _settings_from(coordinator, num_processes, process_id) -> dict | None:
  given = {"coordinator_address": coordinator, "num_processes": num_processes,
           "process_id": process_id}
  if all(v is None for v in given.values()):
    return None
  missing = [k for k, v in given.items() if v is None]
  if missing:
    raise ValueError(f"jax.distributed: {sorted(missing)} not set; --coordinator_address, "
                     "--num_processes and --process_id go together")
  n, i = int(num_processes), int(process_id)
  if n < 1 or not 0 <= i < n:
    raise ValueError(f"jax.distributed: process_id={i} must be in [0, num_processes={n})")
  if ":" not in str(coordinator):
    raise ValueError(f"jax.distributed: coordinator_address={coordinator!r}: expected host:port")
  return {"coordinator_address": str(coordinator), "num_processes": n, "process_id": i}


def resolve(env: dict | None = None) -> dict | None:
  """The explicit initialize() arguments from flags or MOEJAX_* env, else None."""
  env = os.environ if env is None else env
  from_flags = _settings_from(_flag(_COORDINATOR), _flag(_NUM_PROCESSES), _flag(_PROCESS_ID))
  if from_flags is not None:
    return from_flags
  return _settings_from(env.get(ENV_PREFIX + "COORDINATOR_ADDRESS"),
                        env.get(ENV_PREFIX + "NUM_PROCESSES"), env.get(ENV_PREFIX + "PROCESS_ID"))


def cluster_detected(env: dict | None = None) -> str | None:
  """'auto' / 'slurm' / 'tpu' when jax's cluster auto-detection should run, else None."""
  env = os.environ if env is None else env
  if env.get(ENV_PREFIX + "DISTRIBUTED") == "auto":
    return "auto"
  if "SLURM_JOB_ID" in env and int(env.get("SLURM_NTASKS", env.get("SLURM_NPROCS", "1"))) > 1:
    return "slurm"
  hosts = env.get("TPU_WORKER_HOSTNAMES", "")
  if "," in hosts or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
    return "tpu"
  return None


def use_gloo_on_cpu() -> None:
  """Cross-process CPU collectives (all-reduce, all-to-all) need gloo; set before initialize."""
  try:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  except (AttributeError, ValueError):   # option renamed/removed in a future jax: keep the default.
    pass


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
  """Initializes jax.distributed (explicit arguments, or auto-detection when all are None).

  Returns True when a multi-process runtime was started.
  """
  use_gloo_on_cpu()
  if coordinator_address is None:
    jax.distributed.initialize()
  else:
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
  return True


def initialize_from_flags() -> bool:
  """Called by `python -m moejax.train` before anything touches devices. False = single process."""
  settings = resolve()
  if settings is not None:
    if settings["num_processes"] == 1:
      return False
    return initialize(**settings)
  if cluster_detected() is not None:
    return initialize()
  return False
