"""moejax.convert: import Hugging Face MoE checkpoints (Mixtral, OLMoE, Qwen3-MoE, DeepSeek-V3) as
moejax run directories and export them back (`python -m moejax.convert.hf`), streaming tensor by
tensor (`moejax.convert.streaming`) so host memory stays near one layer.

`import_hf`, `export_hf` and `export_run` are resolved lazily from `moejax.convert.hf`, so running
that module with `-m` does not import it twice.
"""

from moejax.convert.mapping import ARCHITECTURES, UnsupportedError

__all__ = ["ARCHITECTURES", "UnsupportedError", "export_hf", "export_run", "import_hf"]


def __getattr__(name):
  if name in ("export_hf", "export_run", "import_hf"):
    from moejax.convert import hf  # pylint: disable=import-outside-toplevel
    return getattr(hf, name)
  raise AttributeError(f"module 'moejax.convert' has no attribute {name!r}")
