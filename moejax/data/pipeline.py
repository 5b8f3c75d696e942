"""Packed LM batches on grain: shuffle documents, tokenize lazily, concatenate, cut into rows.

The token stream of a split is `tokens(d_0) + [EOS] + tokens(d_1) + [EOS] + ...` where
`d_0, d_1, ...` is a grain `MapDataset` of document indices: for training
`MapDataset.range(n).shuffle(seed).repeat()` (grain re-seeds the shuffle every epoch, so epoch e is
a fresh permutation) sliced `[process_index::process_count]`; for evaluation the identity order,
repeated. Row r is the window `stream[r*L:(r+1)*L]` ("concat-then-split" packing, as in T5's
`pack` and grain's `ConcatThenSplitIterDataset`):

  * `segment_ids` number the document pieces in the row 1, 2, 3, ... (0 would be padding; the
    stream is infinite, so rows are always full);
  * `positions` count from 0 at the start of every piece, so a document split across rows
    restarts at position 0 in the next row (attention never crosses rows anyway);
  * the trainer's targets are `tokens` shifted left, masked where the segment changes; the EOS
    closing a document is thus predicted from that document's last token.

Iterator state is the stream position `{"next_document": k, "offset": o}` (k-th document of this
process's order, o tokens of it already emitted): restoring it reproduces the next batch exactly.
`make_train_iterator` wraps it with a fingerprint of everything the stream depends on, so a state
from another seed, corpus, tokenizer or batch layout is refused instead of silently misapplied.
Documents are tokenized lazily in chunks (`encode_batch`) and kept in memory per process.
"""

from __future__ import annotations

import atexit
import hashlib
import logging
import threading
import weakref
from typing import Any

import grain
import numpy as np
from tokenizers import Tokenizer

from moejax.data.corpus import DataConfig, DataError, Document, corpus_digest, load_split
from moejax.data.tokenizer import eos_id, pad_id

log = logging.getLogger(__name__)

STATE_VERSION = 1
# On a cache miss the next documents are tokenized together (one parallel encode_batch call), up
# to this many documents or characters: big enough to keep the cores busy, small enough that the
# first batch comes at once.
_LOOKAHEAD_DOCS = 64
_LOOKAHEAD_CHARS = 1 << 18


class TokenStore:
  """Lazily tokenized documents (int32 ids, EOS appended), shared by the iterators of a process."""

  def __init__(self, docs: tuple[Document, ...], tok: Tokenizer):
    self._texts = [d.text for d in docs]
    self._tok = tok
    self._eos = eos_id(tok)
    self._ids: list[np.ndarray | None] = [None] * len(docs)
    self._lock = threading.Lock()

  def __len__(self) -> int:
    return len(self._ids)

  def num_chars(self, index: int) -> int:
    return len(self._texts[index])

  def ensure(self, indices) -> None:
    """Tokenizes the not-yet-cached documents among `indices` in one parallel `encode_batch`."""
    with self._lock:
      missing = [i for i in dict.fromkeys(indices) if self._ids[i] is None]
      if not missing:
        return
      encodings = self._tok.encode_batch([self._texts[i] for i in missing],
                                         add_special_tokens=False)
      for i, enc in zip(missing, encodings):
        ids = np.empty(len(enc.ids) + 1, np.int32)
        ids[:-1] = enc.ids
        ids[-1] = self._eos
        self._ids[i] = ids

  def get(self, index: int) -> np.ndarray:
    ids = self._ids[index]
    if ids is None:
      self.ensure([index])
      ids = self._ids[index]
    return ids

  def is_cached(self, index: int) -> bool:
    return self._ids[index] is not None


class PackedRowsIterDataset(grain.IterDataset):
  """Infinite rows of `seq_len` tokens cut from the stream of documents `order[0], order[1], ...`."""

  def __init__(self, order: grain.MapDataset, store: TokenStore, seq_len: int, pad: int):
    super().__init__()
    self.order, self.store, self.seq_len, self.pad = order, store, seq_len, pad

  def __iter__(self) -> "_PackedRowsIterator":
    return _PackedRowsIterator(self)

  def __str__(self) -> str:
    return f"PackedRowsIterDataset(seq_len={self.seq_len})"


class _PackedRowsIterator(grain.DatasetIterator):
  """State: `next_document` (index into the order) and `offset` (tokens of it already emitted)."""

  def __init__(self, ds: PackedRowsIterDataset):
    super().__init__()
    self._ds = ds
    self._doc, self._offset = 0, 0
    self._arange = np.arange(ds.seq_len, dtype=np.int32)

  def _doc_tokens(self, k: int) -> np.ndarray:
    order, store = self._ds.order, self._ds.store
    d = order[k]
    if not store.is_cached(d):
      chunk, chars = [], 0
      for j in range(k, k + _LOOKAHEAD_DOCS):
        chunk.append(order[j])
        chars += store.num_chars(chunk[-1])
        if chars >= _LOOKAHEAD_CHARS:
          break
      store.ensure(chunk)
    return store.get(d)

  def __next__(self) -> dict[str, np.ndarray]:
    length = self._ds.seq_len
    tokens_L = np.full(length, self._ds.pad, np.int32)
    segment_ids_L = np.zeros(length, np.int32)
    positions_L = np.zeros(length, np.int32)
    filled, segment = 0, 0
    while filled < length:
      ids = self._doc_tokens(self._doc)
      take = min(len(ids) - self._offset, length - filled)
      segment += 1
      tokens_L[filled:filled + take] = ids[self._offset:self._offset + take]
      segment_ids_L[filled:filled + take] = segment
      positions_L[filled:filled + take] = self._arange[:take]
      filled += take
      self._offset += take
      if self._offset == len(ids):
        self._doc, self._offset = self._doc + 1, 0
    return {"tokens": tokens_L, "segment_ids": segment_ids_L, "positions": positions_L}

  def get_state(self) -> dict[str, Any]:
    return {"next_document": self._doc, "offset": self._offset}

  def set_state(self, state: dict[str, Any]) -> None:
    doc, offset = int(state["next_document"]), int(state["offset"])
    if doc < 0 or offset < 0 or offset >= len(self._doc_tokens(doc)):
      raise DataError(f"data iterator state {state}: offset outside document {doc}")
    self._doc, self._offset = doc, offset


# ----- Public API -----

def _require(cond: bool, name: str, expected: str, value: Any) -> None:
  if not cond:
    raise DataError(f"{name}={value!r}: expected {expected}")


def _check_layout(batch_size: int, seq_len: int, process_index: int = 0,
                  process_count: int = 1) -> None:
  _require(isinstance(seq_len, int) and seq_len >= 1, "seq_len", "an int >= 1", seq_len)
  _require(isinstance(process_count, int) and process_count >= 1, "process_count", "an int >= 1",
           process_count)
  _require(isinstance(process_index, int) and 0 <= process_index < process_count, "process_index",
           f"an int in [0, {process_count})", process_index)
  _require(isinstance(batch_size, int) and batch_size >= 1 and batch_size % process_count == 0,
           "batch_size", f"a positive multiple of process_count={process_count}", batch_size)


_STORES: dict[tuple[str, str], TokenStore] = {}


def _tokenizer_digest(tok: Tokenizer) -> str:
  return hashlib.sha1(tok.to_str().encode("utf-8")).hexdigest()[:16]


def _store_for(docs: tuple[Document, ...], tok: Tokenizer) -> tuple[TokenStore, str, str]:
  """The process-wide `TokenStore` of (docs, tokenizer), so iterators share tokenized documents."""
  key = (_tokenizer_digest(tok), corpus_digest(docs))
  if key not in _STORES:
    while len(_STORES) >= 4:
      _STORES.pop(next(iter(_STORES)))
    _STORES[key] = TokenStore(docs, tok)
  return _STORES[key], key[0], key[1]


def shuffle_seed(data_seed: int, seed: int) -> int:
  """32-bit grain shuffle seed from the data seed and the run seed (hashed, so nearby seeds do not
  share epochs: grain shuffles epoch e with seed + e)."""
  digest = hashlib.sha1(f"moejax.data:{data_seed}:{seed}".encode()).digest()
  return int.from_bytes(digest[:4], "little")


class TrainIterator:
  """`next()` -> batch dict; `get_state()` / `set_state()` with a JSON-serialisable dict."""

  def __init__(self, grain_iter: grain.DatasetIterator, fingerprint: dict[str, Any]):
    self._it = grain_iter
    self.fingerprint = fingerprint
    _LIVE_ITERATORS.add(self)

  def close(self) -> None:
    """Stops the prefetch thread and releases the pipeline (also done at interpreter exit)."""
    if self._it is not None:
      self._it.close()
      self._it = None  # collected now, while grain's modules are still alive.

  def __iter__(self) -> "TrainIterator":
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._it is None:
      raise DataError("the data iterator was closed")
    return next(self._it)

  def get_state(self) -> dict[str, Any]:
    return {"version": STATE_VERSION, "fingerprint": dict(self.fingerprint),
            "stream": dict(self._it.get_state())}

  def set_state(self, state: dict[str, Any]) -> None:
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
      raise DataError(f"data iterator state: expected a dict with version={STATE_VERSION}, got "
                      f"{str(state)[:120]}")
    saved = state.get("fingerprint", {})
    diff = {k: (saved.get(k), v) for k, v in self.fingerprint.items() if saved.get(k) != v}
    if diff:
      raise DataError("data iterator state was saved by a different pipeline; (saved, now): "
                      + ", ".join(f"{k}={a!r} vs {b!r}" for k, (a, b) in diff.items()))
    self._it.set_state(state["stream"])


_LIVE_ITERATORS: "weakref.WeakSet[TrainIterator]" = weakref.WeakSet()


@atexit.register
def _close_live_iterators() -> None:
  for it in list(_LIVE_ITERATORS):
    it.close()


def make_train_iterator(cfg: DataConfig, tok: Tokenizer, *, batch_size: int, seq_len: int,
                        seed: int = 0, process_index: int = 0, process_count: int = 1,
                        prefetch: int = 2) -> TrainIterator:
  """Infinite packed training batches of `batch_size // process_count` rows for this process.

  Process i reads the documents at positions i, i + P, i + 2P, ... of the shuffled, repeated
  order: shards are disjoint within an epoch and deterministic. `prefetch` > 0 builds that many
  batches ahead in a grain background thread (state stays exact).
  """
  _check_layout(batch_size, seq_len, process_index, process_count)
  docs = load_split(cfg, "train")
  store, tok_digest, docs_digest = _store_for(docs, tok)
  sseed = shuffle_seed(cfg.seed, seed)
  order = grain.MapDataset.range(len(docs)).shuffle(seed=sseed).repeat()
  if process_count > 1:
    order = order[process_index::process_count]
  ds = PackedRowsIterDataset(order, store, seq_len, pad_id(tok)).batch(batch_size // process_count)
  if prefetch > 0:
    ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=prefetch)
  fingerprint = {"shuffle_seed": sseed, "batch_size": batch_size, "seq_len": seq_len,
                 "process_index": process_index, "process_count": process_count,
                 "corpus": docs_digest, "tokenizer": tok_digest}
  return TrainIterator(iter(ds), fingerprint)


def make_eval_batches(cfg: DataConfig, tok: Tokenizer, *, batch_size: int, seq_len: int,
                      num_batches: int) -> list[dict[str, np.ndarray]]:
  """The first `num_batches` global batches of the validation split in corpus order (fixed).

  If the split holds fewer than `num_batches * batch_size * seq_len` tokens it is cycled (a
  warning says so).
  """
  _check_layout(batch_size, seq_len)
  _require(isinstance(num_batches, int) and num_batches >= 1, "num_batches", "an int >= 1",
           num_batches)
  docs = load_split(cfg, "val")
  store, _, _ = _store_for(docs, tok)
  order = grain.MapDataset.range(len(docs)).repeat()
  it = iter(PackedRowsIterDataset(order, store, seq_len, pad_id(tok)).batch(batch_size))
  batches = [next(it) for _ in range(num_batches)]
  if it.get_state()["next_document"] > len(docs):
    log.warning("validation split (%d documents) is smaller than %d eval batches of %dx%d "
                "tokens; it was cycled", len(docs), num_batches, batch_size, seq_len)
  return batches
