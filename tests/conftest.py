"""Eight simulated CPU devices for every test, set before JAX initialises its backends."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()


import pytest  # noqa: E402  (after the environment above, before JAX is initialised by a test)


@pytest.fixture(scope="module")
def fast_compiles():
  """XLA's optimisation passes off for a module (as flax's own tests do): ~2x faster compiles of
  tiny shapes on a 2-core CPU. The math is the same; the float bits may differ from an optimised
  build, so never compare against a run made in another process under other settings.
  Use with `pytestmark = pytest.mark.usefixtures("fast_compiles")`."""
  import jax  # pylint: disable=import-outside-toplevel
  previous = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", previous)
