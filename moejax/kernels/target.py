"""Which platform the Pallas kernels are built for: the running backend, or one named for lowering.

`backend()` is what `gmm` and the fused router consult to choose between Triton (GPU), Mosaic (TPU)
and interpret mode (CPU). `lowering_for("gpu" | "tpu")` overrides it while tracing, so that a CPU-only
machine can lower the real GPU and TPU kernels with `jax.export(..., platforms=["cuda" | "tpu"])`:
the Pallas -> Triton / Mosaic lowering runs in full (block-shape rules, dtypes, unsupported ops all
fail there), only compiling and running need the device. Autotuning still follows the running backend.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import jax

PLATFORMS = ("cpu", "gpu", "tpu")
_override: Optional[str] = None


def backend() -> str:
  """'cpu' | 'gpu' | 'tpu': the platform the kernels are being built for."""
  return _override or jax.default_backend()


@contextlib.contextmanager
def lowering_for(platform: str) -> Iterator[None]:
  """Build the kernels for `platform` inside this block (pair with `jax.export` on that platform)."""
  global _override  # pylint: disable=global-statement
  if platform not in PLATFORMS:
    raise ValueError(f"platform={platform!r}: expected one of {PLATFORMS}")
  previous, _override = _override, platform
  try:
    yield
  finally:
    _override = previous
