"""A real multi-controller run: 2 processes x 2 CPU devices joined by jax.distributed on 127.0.0.1
(gloo collectives) train 3 steps with expert parallelism across the processes (mesh data=2 x
expert=2); the final loss and parameters must match one process driving 4 devices.

Run as a script, this file is the worker: `python test_multiprocess.py PORT PROCESS_ID NPROC OUT`.
"""
import os
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SIZES = {"data": 2, "expert": 2}
NPROC, DEVICES_PER_PROC = 2, 2


def _worker(port: int, process_id: int, nproc: int, out: str) -> None:
  sys.path.insert(0, REPO)
  from moejax.parallel import distributed
  distributed.initialize(f"127.0.0.1:{port}", nproc, process_id)
  import jax
  from jax.experimental import multihost_utils
  jax.config.update("jax_disable_most_optimizations", True)
  from moejax.parallel import mesh as mesh_lib
  from tests.parallel import fixed_batch, run_sharded, tiny_cfg
  assert jax.process_count() == nproc and jax.device_count() == nproc * DEVICES_PER_PROC
  losses, state, _, _ = run_sharded(tiny_cfg(), fixed_batch(), mesh_lib.make_mesh(SIZES),
                                    mesh_lib.DEFAULT_RULES)
  params = multihost_utils.process_allgather(state.params, tiled=True)
  if process_id == 0:
    leaves = [np.asarray(x) for x in jax.tree.leaves(params)]
    np.savez(out, losses=losses, **{f"p{i}": x for i, x in enumerate(leaves)})
  multihost_utils.sync_global_devices("done")


def test_two_processes_match_one_process(tmp_path):
  import jax
  import portpicker
  port = portpicker.pick_unused_port()
  out = str(tmp_path / "result.npz")
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO,
             XLA_FLAGS=f"--xla_force_host_platform_device_count={DEVICES_PER_PROC}")
  logs = [open(tmp_path / f"worker_{i}.log", "w") for i in range(NPROC)]
  procs = []
  try:
    for i in range(NPROC):
      procs.append(subprocess.Popen([sys.executable, os.path.abspath(__file__), str(port), str(i),
                                     str(NPROC), out], env=env, stdout=logs[i],
                                    stderr=subprocess.STDOUT, cwd=REPO))
    # The single-process, 4-device reference, computed while the workers run.
    prev = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    try:
      from moejax.parallel import mesh as mesh_lib
      from tests.parallel import fixed_batch, run_sharded, tiny_cfg, to_numpy
      mesh = mesh_lib.make_mesh(SIZES, devices=jax.devices()[:NPROC * DEVICES_PER_PROC])
      ref_losses, ref_state, _, _ = run_sharded(tiny_cfg(), fixed_batch(), mesh,
                                                mesh_lib.DEFAULT_RULES)
      ref_params = [np.asarray(x) for x in jax.tree.leaves(to_numpy(ref_state.params))]
    finally:
      jax.config.update("jax_disable_most_optimizations", prev)
    deadline = time.monotonic() + 300
    for i, p in enumerate(procs):
      rc = p.wait(timeout=max(deadline - time.monotonic(), 1))
      if rc != 0:
        logs[i].flush()
        raise AssertionError(f"worker {i} exited with {rc}:\n"
                             + (tmp_path / f"worker_{i}.log").read_text()[-4000:])
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
    for f in logs:
      f.close()
  got = np.load(out)
  np.testing.assert_allclose(got["losses"], ref_losses, rtol=1e-5)
  assert len(ref_params) == len([k for k in got.files if k.startswith("p")])
  for i, want in enumerate(ref_params):
    np.testing.assert_allclose(got[f"p{i}"], want, atol=2e-6)


if __name__ == "__main__":
  _worker(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
