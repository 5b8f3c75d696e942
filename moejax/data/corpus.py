"""Text corpora for language-model training: the data config, document sources and the split.

A corpus is an ordered list of `Document(doc_id, text)`. Sources (`DataConfig.source`):

  * `"stdlib"` (default): the `.py` files of the running interpreter's standard library
    (`sysconfig.get_paths()["stdlib"]`) minus test packages, `idlelib`, `turtledemo`,
    `site-packages` and the like; ids are paths relative to the stdlib root, so the split is the
    same on every machine with the same Python version.
  * comma-separated paths / globs (`**` allowed) / directories of user files:
      - `.py`, `.txt`: one document per file;
      - `.jsonl`: one document per line, the string `text_field` of each JSON object;
      - ArrayRecord (`*.array_record*`): one document per record, utf-8 text or a JSON object
        with `text_field`.

Empty (whitespace-only) documents are dropped; unreadable or non-utf-8 text files are skipped
with a warning. The train/validation split is a stable hash of the document id (sha1), so it
never depends on seeds, file order or `max_files`.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import hashlib
import json
import logging
import os
import sysconfig
from collections.abc import Iterator, Mapping
from typing import Any, Callable

log = logging.getLogger(__name__)

SPLITS = ("train", "val")
TEXT_SUFFIXES = (".py", ".txt")
# Stdlib directories that are tests, GUIs/demos or third-party code rather than library source.
STDLIB_EXCLUDED_DIRS = frozenset({
    "test", "tests", "idle_test", "idlelib", "turtledemo", "site-packages", "dist-packages",
    "__pycache__", "lib-dynload",
})
MIN_TRAINED_VOCAB = 256 + 2  # byte-level alphabet + <|pad|> + <|endoftext|>.


class DataError(ValueError):
  """Bad data configuration or input; the message names the `data.<field>` or file at fault."""


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Where the text comes from and how it is tokenized and split (validated on construction).

  `seed` is the data seed; `make_train_iterator(seed=...)` is mixed with it for the shuffle.
  `max_files > 0` keeps only the first N documents of each split (small runs, tests).
  """

  source: str = "stdlib"
  text_field: str = "text"
  tokenizer: str = ""          # "" -> train a byte-level BPE into the workdir; else tokenizer.json.
  vocab_size: int = 4096
  max_files: int = 0
  val_fraction: float = 0.02
  seed: int = 0

  def __post_init__(self):
    if isinstance(self.val_fraction, int) and not isinstance(self.val_fraction, bool):
      object.__setattr__(self, "val_fraction", float(self.val_fraction))
    _check(isinstance(self.source, str) and self.source.strip() != "", "source",
           "'stdlib' or comma-separated paths/globs", self.source)
    _check(isinstance(self.text_field, str) and self.text_field != "", "text_field",
           "a non-empty JSON key", self.text_field)
    _check(isinstance(self.tokenizer, str), "tokenizer", "'' or a path to a tokenizer.json",
           self.tokenizer)
    min_vocab = 1 if self.tokenizer else MIN_TRAINED_VOCAB
    _check(_is_int(self.vocab_size) and min_vocab <= self.vocab_size < 2**31, "vocab_size",
           f"an int >= {min_vocab}", self.vocab_size)
    _check(_is_int(self.max_files) and self.max_files >= 0, "max_files", "an int >= 0 (0 = all)",
           self.max_files)
    _check(isinstance(self.val_fraction, float) and 0.0 <= self.val_fraction < 1.0,
           "val_fraction", "a float in [0, 1)", self.val_fraction)
    _check(_is_int(self.seed) and 0 <= self.seed < 2**32, "seed", "an int in [0, 2**32)",
           self.seed)

  @classmethod
  def from_mapping(cls, mapping: Mapping[str, Any]) -> "DataConfig":
    """Builds a config from a dict / ConfigDict; unknown keys are an error naming them."""
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(mapping) - set(names))
    if unknown:
      raise DataError(f"data: unknown keys {unknown}; expected a subset of {names}")
    return cls(**{k: mapping[k] for k in mapping})

  def replace(self, **kw: Any) -> "DataConfig":
    return dataclasses.replace(self, **kw)


def _is_int(x: Any) -> bool:
  return isinstance(x, int) and not isinstance(x, bool)


def _check(cond: bool, field: str, expected: str, value: Any) -> None:
  if not cond:
    raise DataError(f"data.{field}={value!r}: expected {expected}")


@dataclasses.dataclass(frozen=True)
class Document:
  doc_id: str
  text: str


def split_of(doc_id: str, val_fraction: float) -> str:
  """'val' iff the first 8 bytes of sha1(doc_id), read as a fraction of 2**64, are < val_fraction."""
  h = int.from_bytes(hashlib.sha1(doc_id.encode("utf-8")).digest()[:8], "big")
  return "val" if h < val_fraction * 2.0**64 else "train"


# ----- Sources -----

def stdlib_files(root: str | None = None) -> list[tuple[str, str]]:
  """Sorted `(relative id, path)` of the stdlib `.py` files outside test/GUI/third-party dirs."""
  root = root or sysconfig.get_paths()["stdlib"]
  out = []
  for dirpath, dirnames, filenames in os.walk(root):
    rel_dir = os.path.relpath(dirpath, root)
    parts = [] if rel_dir == "." else rel_dir.split(os.sep)
    if parts and (parts[0].startswith("config-") or parts[-1] in STDLIB_EXCLUDED_DIRS):
      dirnames[:] = []
      continue
    dirnames[:] = [d for d in dirnames if d not in STDLIB_EXCLUDED_DIRS]
    for name in filenames:
      if name.endswith(".py"):
        rel = "/".join(parts + [name])
        out.append((rel, os.path.join(dirpath, name)))
  return sorted(out)


def _is_array_record(path: str) -> bool:
  return ".array_record" in os.path.basename(path) or ".arrayrecord" in os.path.basename(path)


def _supported(path: str) -> bool:
  return path.endswith(TEXT_SUFFIXES + (".jsonl",)) or _is_array_record(path)


def resolve_paths(source: str) -> list[str]:
  """Expands comma-separated paths/globs/directories in order (each pattern's matches sorted)."""
  paths: list[str] = []
  for pattern in (p.strip() for p in source.split(",")):
    if not pattern:
      continue
    if os.path.isdir(pattern):
      matches = sorted(p for p in glob.glob(os.path.join(pattern, "**", "*"), recursive=True)
                       if os.path.isfile(p) and _supported(p))
      if not matches:
        raise DataError(f"data.source: directory {pattern!r} holds no .py/.txt/.jsonl/"
                        ".array_record files")
    else:
      matches = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
      if not matches:
        raise DataError(f"data.source: {pattern!r} matched no files")
      bad = [p for p in matches if not _supported(p)]
      if bad:
        raise DataError(f"data.source: {bad[0]!r} (from {pattern!r}) is not a .py/.txt/.jsonl/"
                        ".array_record file")
    paths.extend(p for p in matches if p not in paths)
  if not paths:
    raise DataError(f"data.source={source!r}: expected 'stdlib' or comma-separated paths/globs")
  return paths


def _read_text_file(path: str) -> str | None:
  try:
    with open(path, "rb") as f:
      return f.read().decode("utf-8")
  except (OSError, UnicodeDecodeError) as e:
    log.warning("skipping unreadable text file %s: %s", path, e)
    return None


def _text_of_json(obj: Any, text_field: str, where: str) -> str:
  if not isinstance(obj, dict) or not isinstance(obj.get(text_field), str):
    raise DataError(f"{where}: expected a JSON object with a string field {text_field!r} "
                    f"(data.text_field), got {str(obj)[:80]!r}")
  return obj[text_field]


def _jsonl_documents(path: str, text_field: str) -> Iterator[Document]:
  with open(path, "rb") as f:
    for lineno, raw in enumerate(f, 1):
      where = f"{path}:{lineno}"
      if not raw.strip():
        continue
      try:
        obj = json.loads(raw.decode("utf-8"))
      except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{where}: not a valid utf-8 JSON line ({e})") from None
      yield Document(where, _text_of_json(obj, text_field, where))


def _array_record_documents(path: str, text_field: str) -> Iterator[Document]:
  from array_record.python import array_record_module  # pylint: disable=import-outside-toplevel
  try:
    reader = array_record_module.ArrayRecordReader(path)
  except Exception as e:  # the C++ reader raises plain RuntimeError/ValueError.
    raise DataError(f"{path}: not a readable ArrayRecord file ({e})") from None
  try:
    for index, record in enumerate(reader.read_all()):
      where = f"{path}#{index}"
      try:
        text = record.decode("utf-8")
      except UnicodeDecodeError:
        raise DataError(f"{where}: record is not utf-8 text") from None
      if text.lstrip().startswith("{"):
        try:
          text = _text_of_json(json.loads(text), text_field, where)
        except json.JSONDecodeError:
          pass  # plain text that happens to start with '{'.
      yield Document(where, text)
  finally:
    reader.close()


def _candidates(source: str, text_field: str) -> Iterator[tuple[str, Callable[[], Any]]]:
  """(doc_id, thunk) in corpus order; a thunk returns the text or None (skip). Files are only
  read when their id is kept by the split, so small runs never read the whole stdlib."""
  if source == "stdlib":
    for rel, path in stdlib_files():
      yield rel, functools.partial(_read_text_file, path)
    return
  for path in resolve_paths(source):
    if path.endswith(TEXT_SUFFIXES):
      yield path, functools.partial(_read_text_file, path)
    else:
      docs = (_jsonl_documents if path.endswith(".jsonl") else _array_record_documents)(
          path, text_field)
      for doc in docs:
        yield doc.doc_id, functools.partial(lambda t: t, doc.text)


@functools.lru_cache(maxsize=8)
def _load_split_cached(source: str, text_field: str, val_fraction: float, max_files: int,
                       split: str) -> tuple[Document, ...]:
  docs = []
  for doc_id, read in _candidates(source, text_field):
    if split_of(doc_id, val_fraction) != split:
      continue
    text = read()
    if text is None or not text.strip():
      continue
    docs.append(Document(doc_id, text))
    if max_files and len(docs) >= max_files:
      break
  return tuple(docs)


def load_split(cfg: DataConfig, split: str) -> tuple[Document, ...]:
  """The documents of `split` ('train' | 'val') in corpus order (cached per process)."""
  if split not in SPLITS:
    raise ValueError(f"split={split!r}: expected one of {SPLITS}")
  docs = _load_split_cached(cfg.source, cfg.text_field, cfg.val_fraction, cfg.max_files, split)
  if not docs:
    raise DataError(f"data.source={cfg.source!r}: the {split} split is empty "
                    f"(data.val_fraction={cfg.val_fraction}, data.max_files={cfg.max_files})")
  return docs


def corpus_digest(docs: tuple[Document, ...]) -> str:
  """A short content hash of a document list (ids and texts), for iterator-state checks."""
  h = hashlib.sha1()
  for d in docs:
    h.update(d.doc_id.encode("utf-8") + b"\0" + d.text.encode("utf-8") + b"\0")
  return h.hexdigest()[:16]
