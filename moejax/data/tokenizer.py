"""Byte-level BPE tokenizer: trained on the training split and cached, or loaded from a file.

Byte-level BPE as in GPT-2 (Radford et al. 2019): text is mapped to bytes, pre-split with the
GPT-2 regex, and merges are learned with the `tokenizers` BpeTrainer. Ids 0 and 1 are the special
tokens `<|pad|>` and `<|endoftext|>`; ids 2..257 are the 256 bytes, then the learned merges.
Special-token strings inside documents are encoded as plain text (`encode_special_tokens`), so a
literal "<|endoftext|>" in a corpus never becomes a document boundary.
"""

from __future__ import annotations

import os
import tempfile

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from moejax.data.corpus import DataConfig, DataError, load_split

PAD = "<|pad|>"
EOS = "<|endoftext|>"
SPECIAL_TOKENS = (PAD, EOS)
CACHE_NAME = "tokenizer.json"
# BPE training reads at most this many characters of the training split (documents in corpus
# order): the whole stdlib (~11 M characters on 3.11) fits; bigger corpora train in bounded time.
MAX_TRAIN_CHARS = 16 << 20
# Fallback names for user tokenizers that do not use the GPT-2 special tokens.
_EOS_NAMES = (EOS, "</s>", "<|end_of_text|>", "<eos>", "[SEP]")
_PAD_NAMES = (PAD, "<pad>", "[PAD]")


def train_tokenizer(texts, vocab_size: int) -> Tokenizer:
  """Trains a byte-level BPE of exactly `vocab_size` tokens on an iterable of strings."""
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  tok.train_from_iterator(texts, trainer)
  return tok


def _capped_texts(docs, max_chars: int):
  used = 0
  for doc in docs:
    if used >= max_chars:
      return
    yield doc.text
    used += len(doc.text)


def _load(path: str, field: str) -> Tokenizer:
  if not os.path.isfile(path):
    raise DataError(f"data.{field}: tokenizer file {path!r} does not exist")
  try:
    return Tokenizer.from_file(path)
  except Exception as e:  # tokenizers raises a bare Exception on malformed JSON.
    raise DataError(f"data.{field}: {path!r} is not a valid tokenizers JSON file ({e})") from None


def _save_atomic(tok: Tokenizer, path: str) -> None:
  fd, tmp = tempfile.mkstemp(prefix=".tokenizer-", suffix=".json", dir=os.path.dirname(path))
  os.close(fd)
  try:
    tok.save(tmp)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def build_tokenizer(cfg: DataConfig, workdir: str) -> Tokenizer:
  """The run's tokenizer: `cfg.tokenizer` if set, else `<workdir>/tokenizer.json`, trained on the
  training split (at most `MAX_TRAIN_CHARS` characters) the first time and reused after."""
  if cfg.tokenizer:
    tok = _load(cfg.tokenizer, "tokenizer")
    if tok.get_vocab_size() > cfg.vocab_size:
      raise DataError(f"data.vocab_size={cfg.vocab_size} is smaller than the {tok.get_vocab_size()} "
                      f"tokens of data.tokenizer={cfg.tokenizer!r}")
  else:
    path = os.path.join(workdir, CACHE_NAME)
    if os.path.exists(path):
      tok = _load(path, "tokenizer (cached in the workdir)")
      if tok.get_vocab_size() != cfg.vocab_size:
        raise DataError(f"data.vocab_size={cfg.vocab_size} but the cached tokenizer {path!r} has "
                        f"{tok.get_vocab_size()} tokens; delete it or use a fresh workdir")
    else:
      tok = train_tokenizer(_capped_texts(load_split(cfg, "train"), MAX_TRAIN_CHARS),
                            cfg.vocab_size)
      if tok.get_vocab_size() != cfg.vocab_size:
        raise DataError(f"data.vocab_size={cfg.vocab_size}: BPE found only {tok.get_vocab_size()} "
                        f"tokens in the training split of data.source={cfg.source!r}; use a "
                        "smaller vocabulary or more data (data.max_files)")
      os.makedirs(workdir, exist_ok=True)
      _save_atomic(tok, path)
  eos_id(tok)  # fails early, naming the file, if there is no end-of-text token.
  tok.encode_special_tokens = True
  return tok


def _first_id(tok: Tokenizer, names) -> int | None:
  for name in names:
    i = tok.token_to_id(name)
    if i is not None:
      return i
  return None


def eos_id(tok: Tokenizer) -> int:
  """Id of the end-of-text token appended after every document."""
  i = _first_id(tok, _EOS_NAMES)
  if i is None:
    raise DataError(f"tokenizer has none of the end-of-text tokens {_EOS_NAMES}")
  return i


def pad_id(tok: Tokenizer) -> int:
  """Id used for padding (segment 0); the end-of-text id if the tokenizer has no pad token."""
  i = _first_id(tok, _PAD_NAMES)
  return eos_id(tok) if i is None else i
