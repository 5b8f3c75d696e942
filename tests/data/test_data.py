"""moejax.data: corpus sources and split, tokenizer cache, packed resumable grain batches.

Packing is checked against a plain-python concat-then-split packer written here; the document
order is recovered from the batches themselves (each synthetic document is unique).
"""

import json
import os

import numpy as np
import pytest

from moejax.data import (DataConfig, DataError, build_tokenizer, eos_id, load_split,
                         make_eval_batches, make_train_iterator, pad_id, split_of)
from moejax.data import corpus as corpus_lib

VOCAB = 512
L = 32
WORDS = ("alpha beta gamma delta import return lambda class yield value index while self "
         "print range numpy token expert router").split()


def _write_jsonl(path, texts, field="text"):
  with open(path, "w", encoding="utf-8") as f:
    for t in texts:
      f.write(json.dumps({field: t}) + "\n")
  return str(path)


def _synthetic_texts(n=40, seed=0):
  rng = np.random.default_rng(seed)
  lengths = rng.integers(1, 60, size=n)
  lengths[[3, 17]] = 150  # documents longer than several rows.
  return [f"doc{i}: " + " ".join(rng.choice(WORDS, size=k)) for i, k in enumerate(lengths)]


@pytest.fixture(scope="module")
def stdlib_setup(tmp_path_factory):
  cfg = DataConfig(max_files=30, vocab_size=VOCAB, val_fraction=0.1)
  workdir = str(tmp_path_factory.mktemp("work"))
  return cfg, build_tokenizer(cfg, workdir), workdir


@pytest.fixture(scope="module")
def synth(tmp_path_factory, stdlib_setup):
  """A jsonl corpus of unique documents, tokenized with the stdlib tokenizer."""
  _, tok, _ = stdlib_setup
  path = _write_jsonl(tmp_path_factory.mktemp("synth") / "docs.jsonl", _synthetic_texts())
  cfg = DataConfig(source=path, vocab_size=VOCAB, val_fraction=0.0)
  docs = load_split(cfg, "train")
  ids = [tuple(e.ids) for e in tok.encode_batch([d.text for d in docs], add_special_tokens=False)]
  assert len(set(ids)) == len(ids)
  return cfg, tok, ids


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_same(xs, ys):
  assert len(xs) == len(ys)
  for x, y in zip(xs, ys):
    assert x.keys() == y.keys() == {"tokens", "segment_ids", "positions"}
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def _rows(batches, key):
  return np.concatenate([b[key] for b in batches], axis=0)


def _doc_order(stream, eos, ids):
  """Document indices of the complete documents in a token stream (reference decoding)."""
  index = {d: i for i, d in enumerate(ids)}
  order, start = [], 0
  for j in np.flatnonzero(np.asarray(stream) == eos):
    order.append(index[tuple(int(t) for t in stream[start:j])])
    start = j + 1
  return order


def _reference_pack(order, ids, eos, seq_len, num_rows):
  """Plain-python concat-then-split: pieces get segment ids 1,2,.. and positions from 0 per row."""
  rows, cur = [], ([], [], [])
  for d in order:
    piece = list(ids[d]) + [eos]
    while piece and len(rows) < num_rows:
      take = min(len(piece), seq_len - len(cur[0]))
      seg = (cur[1][-1] + 1) if cur[1] else 1
      cur[0].extend(piece[:take])
      cur[1].extend([seg] * take)
      cur[2].extend(range(take))
      piece = piece[take:]
      if len(cur[0]) == seq_len:
        rows.append(cur)
        cur = ([], [], [])
  assert len(rows) == num_rows, "reference ran out of documents"
  return tuple(np.array([r[i] for r in rows]) for i in range(3))


# ----- Config -----

def test_config_validation_names_fields():
  for kw, field in [({"vocab_size": 100}, "vocab_size"), ({"val_fraction": 1.0}, "val_fraction"),
                    ({"max_files": -1}, "max_files"), ({"source": ""}, "source"),
                    ({"seed": -3}, "seed"), ({"text_field": ""}, "text_field")]:
    with pytest.raises(DataError, match=f"data.{field}"):
      DataConfig(**kw)
  with pytest.raises(DataError, match="bogus"):
    DataConfig.from_mapping({"source": "stdlib", "bogus": 1})
  cfg = DataConfig.from_mapping({"vocab_size": 300, "val_fraction": 0})
  assert cfg.vocab_size == 300 and cfg.val_fraction == 0.0 and cfg.source == "stdlib"
  assert DataConfig(tokenizer="x.json", vocab_size=100).vocab_size == 100  # user vocab: any size.


# ----- Corpus and split -----

def test_stdlib_corpus_excludes_tests_and_is_sorted():
  files = corpus_lib.stdlib_files()
  ids = [i for i, _ in files]
  assert ids == sorted(ids) and len(ids) > 300
  assert {"os.py", "json/decoder.py", "collections/__init__.py"} <= set(ids)
  banned = {"test", "tests", "idlelib", "site-packages", "turtledemo"}
  assert not [i for i in ids if banned & set(i.split("/")[:-1])]
  assert not [i for i in ids if i.startswith("lib2to3/tests")]
  assert all(p.endswith(".py") and os.path.isfile(p) for _, p in files[:50])


def test_split_is_deterministic_and_disjoint(stdlib_setup):
  ids = [i for i, _ in corpus_lib.stdlib_files()]
  val = {i for i in ids if split_of(i, 0.1) == "val"}
  assert val == {i for i in ids if split_of(i, 0.1) == "val"}
  assert 0.04 < len(val) / len(ids) < 0.2
  assert {i for i in ids if split_of(i, 0.0) == "val"} == set()
  cfg, _, _ = stdlib_setup
  train, valid = load_split(cfg, "train"), load_split(cfg, "val")
  assert len(train) == 30 and 0 < len(valid) <= 30
  assert not {d.doc_id for d in train} & {d.doc_id for d in valid}
  assert all(d.doc_id in val for d in valid) and all(d.doc_id not in val for d in train)
  # max_files keeps the first documents of the full split, in corpus order.
  full_train = [i for i in ids if i not in val]
  assert [d.doc_id for d in train] == full_train[:30]


def test_jsonl_source_and_errors(tmp_path):
  good = _write_jsonl(tmp_path / "a.jsonl", ["first doc", "second doc", "  "])
  docs = load_split(DataConfig(source=good, val_fraction=0.0), "train")
  assert [d.text for d in docs] == ["first doc", "second doc"]  # blank document dropped.
  assert docs[0].doc_id == f"{good}:1"
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"text": "ok"}\n{"text": broken\n')
  with pytest.raises(DataError, match=r"bad\.jsonl:2"):
    load_split(DataConfig(source=str(bad), val_fraction=0.0), "train")
  missing = tmp_path / "missing.jsonl"
  missing.write_text('{"text": "ok"}\n{"body": "no text field"}\n')
  with pytest.raises(DataError, match=r"missing\.jsonl:2.*'text'"):
    load_split(DataConfig(source=str(missing), val_fraction=0.0), "train")
  other = _write_jsonl(tmp_path / "b.jsonl", ["by body"], field="body")
  docs = load_split(DataConfig(source=other, text_field="body", val_fraction=0.0), "train")
  assert [d.text for d in docs] == ["by body"]


def test_text_globs_and_missing_glob(tmp_path):
  (tmp_path / "x.txt").write_text("hello text")
  (tmp_path / "y.py").write_text("print('hi')\n")
  (tmp_path / "z.bin").write_bytes(b"\xff\xfe")
  docs = load_split(DataConfig(source=f"{tmp_path}/*.txt,{tmp_path}/*.py", val_fraction=0.0),
                    "train")
  assert [d.text for d in docs] == ["hello text", "print('hi')\n"]
  with pytest.raises(DataError, match=r"nothing_here/\*\.jsonl.*matched no files"):
    load_split(DataConfig(source=f"{tmp_path}/nothing_here/*.jsonl"), "train")
  with pytest.raises(DataError, match=r"z\.bin"):
    load_split(DataConfig(source=f"{tmp_path}/*", val_fraction=0.0), "train")


def test_array_record_source(tmp_path):
  from array_record.python import array_record_module
  path = str(tmp_path / "docs.array_record")
  writer = array_record_module.ArrayRecordWriter(path, "group_size:1")
  for rec in [b"plain text record", json.dumps({"text": "json record"}).encode()]:
    writer.write(rec)
  writer.close()
  docs = load_split(DataConfig(source=path, val_fraction=0.0), "train")
  assert [d.text for d in docs] == ["plain text record", "json record"]
  assert docs[1].doc_id == f"{path}#1"


# ----- Tokenizer -----

def test_tokenizer_cache_reload_and_specials(stdlib_setup):
  cfg, tok, workdir = stdlib_setup
  path = os.path.join(workdir, "tokenizer.json")
  mtime = os.stat(path).st_mtime_ns
  again = build_tokenizer(cfg, workdir)
  assert os.stat(path).st_mtime_ns == mtime  # loaded, not retrained.
  text = "def f(x):\n    return x ** 2  # héllo <|endoftext|>\n"
  ids = tok.encode(text, add_special_tokens=False).ids
  assert again.encode(text, add_special_tokens=False).ids == ids
  assert tok.decode(ids) == text  # byte-level BPE is lossless.
  assert eos_id(tok) not in ids  # special-token text inside documents stays text.
  assert (pad_id(tok), eos_id(tok), tok.get_vocab_size()) == (0, 1, VOCAB)
  with pytest.raises(DataError, match="data.vocab_size=600.*512"):
    build_tokenizer(cfg.replace(vocab_size=600), workdir)


def test_user_tokenizer_path(stdlib_setup, tmp_path):
  cfg, tok, workdir = stdlib_setup
  user_cfg = cfg.replace(tokenizer=os.path.join(workdir, "tokenizer.json"))
  user = build_tokenizer(user_cfg, str(tmp_path))
  assert not os.path.exists(tmp_path / "tokenizer.json")
  text = "import os\nprint(os.getcwd())\n"
  assert user.encode(text).ids == tok.encode(text).ids
  with pytest.raises(DataError, match="data.tokenizer.*does not exist"):
    build_tokenizer(cfg.replace(tokenizer=str(tmp_path / "nope.json")), str(tmp_path))
  (tmp_path / "corrupt.json").write_text("{not json")
  with pytest.raises(DataError, match="data.tokenizer.*corrupt.json"):
    build_tokenizer(cfg.replace(tokenizer=str(tmp_path / "corrupt.json")), str(tmp_path))
  with pytest.raises(DataError, match="data.vocab_size=300"):
    build_tokenizer(user_cfg.replace(vocab_size=300), str(tmp_path))


# ----- Pipeline -----

def test_batches_shape_and_seed_determinism(stdlib_setup):
  cfg, tok, _ = stdlib_setup
  a = _take(make_train_iterator(cfg, tok, batch_size=4, seq_len=L, seed=0), 3)
  b = _take(make_train_iterator(cfg, tok, batch_size=4, seq_len=L, seed=0, prefetch=0), 3)
  _assert_same(a, b)
  for k in ("tokens", "segment_ids", "positions"):
    assert a[0][k].shape == (4, L) and a[0][k].dtype == np.int32
  c = _take(make_train_iterator(cfg, tok, batch_size=4, seq_len=L, seed=1), 3)
  assert not np.array_equal(_rows(a, "tokens"), _rows(c, "tokens"))


@pytest.mark.parametrize("prefetch", [0, 2])
def test_resume_continues_exactly(synth, prefetch):
  cfg, tok, _ = synth
  make = lambda: make_train_iterator(cfg, tok, batch_size=2, seq_len=L, seed=3, prefetch=prefetch)
  it = make()
  _take(it, 7)  # mid-document and past the first epoch's first rows.
  state = json.loads(json.dumps(it.get_state()))
  expected = _take(it, 5)
  resumed = make()
  _take(resumed, 2)  # a used iterator must also jump back exactly.
  resumed.set_state(state)
  _assert_same(_take(resumed, 5), expected)
  other = make_train_iterator(cfg, tok, batch_size=2, seq_len=L, seed=4)
  with pytest.raises(DataError, match="shuffle_seed"):
    other.set_state(state)


def test_packing_matches_reference(synth):
  cfg, tok, ids = synth
  eos, n = eos_id(tok), len(ids)
  total = sum(len(d) + 1 for d in ids)
  num_rows = 2 * total // L + 4  # a bit more than two epochs.
  batches = _take(make_train_iterator(cfg, tok, batch_size=4, seq_len=L, seed=0),
                  -(-num_rows // 4))
  tokens, segs, pos = (_rows(batches, k) for k in ("tokens", "segment_ids", "positions"))
  stream = tokens.reshape(-1)
  order = _doc_order(stream, eos, ids)
  assert sorted(order[:n]) == list(range(n)) and sorted(order[n:2 * n]) == list(range(n))
  assert order[:n] != order[n:2 * n] and order[:n] != list(range(n))  # shuffled per epoch.
  # The stream ends inside a document: any document with that prefix packs identically.
  tail = [int(t) for t in stream[np.flatnonzero(stream == eos)[-1] + 1:]]
  tail_doc = [i for i, d in enumerate(ids) if list(d[:len(tail)]) == tail][:1] if tail else []
  assert len(tail_doc) == (1 if tail else 0)
  # Token counts add up: complete documents + EOS each, plus the unfinished tail.
  assert tokens.size == sum(len(ids[d]) + 1 for d in order) + len(tail)
  assert (tokens == eos).sum() == len(order)
  ref_tokens, ref_segs, ref_pos = _reference_pack(order + tail_doc, ids, eos, L, len(tokens))
  np.testing.assert_array_equal(tokens, ref_tokens)
  np.testing.assert_array_equal(segs, ref_segs)
  np.testing.assert_array_equal(pos, ref_pos)
  # Invariants: no padding in an infinite stream; segments 1, 2, ... per row with positions
  # restarting at 0; every segment that ends inside a row ends with EOS.
  assert (segs[:, 0] == 1).all() and (pos[:, 0] == 0).all() and (tokens != pad_id(tok)).all()
  change = segs[:, 1:] != segs[:, :-1]
  assert ((segs[:, 1:] - segs[:, :-1]) == change).all()
  assert (pos[:, 1:][change] == 0).all() and (pos[:, 1:][~change] == pos[:, :-1][~change] + 1).all()
  assert (tokens[:, :-1][change] == eos).all()


def test_process_shards_disjoint(synth):
  cfg, tok, ids = synth
  eos, n = eos_id(tok), len(ids)
  orders = []
  num_batches = sum(len(d) + 1 for d in ids) // (2 * L) + 2  # > half an epoch per process.
  for p in range(2):
    make = lambda: make_train_iterator(cfg, tok, batch_size=4, seq_len=L, seed=0,
                                       process_index=p, process_count=2)
    batches = _take(make(), num_batches)
    assert batches[0]["tokens"].shape == (2, L)
    _assert_same(_take(make(), 3), batches[:3])
    orders.append(_doc_order(_rows(batches, "tokens").reshape(-1), eos, ids))
  first0, first1 = orders[0][:n // 2], orders[1][:n // 2]  # the first epoch, split by position.
  assert not set(first0) & set(first1)
  assert sorted(first0 + first1) == list(range(n))
  with pytest.raises(DataError, match="batch_size"):
    make_train_iterator(cfg, tok, batch_size=3, seq_len=L, process_index=0, process_count=2)


def test_eval_batches_fixed_and_from_validation(stdlib_setup):
  cfg, tok, _ = stdlib_setup
  a = make_eval_batches(cfg, tok, batch_size=4, seq_len=L, num_batches=3)
  b = make_eval_batches(cfg, tok, batch_size=4, seq_len=L, num_batches=3)
  assert len(a) == 3 and a[0]["tokens"].shape == (4, L)
  _assert_same(a, b)
  first_val = load_split(cfg, "val")[0].text
  expect = tok.encode(first_val, add_special_tokens=False).ids + [eos_id(tok)]
  got = _rows(a, "tokens").reshape(-1)
  k = min(len(expect), got.size)
  np.testing.assert_array_equal(got[:k], expect[:k])
  with pytest.raises(DataError, match="data.val_fraction"):
    make_eval_batches(cfg.replace(val_fraction=0.0), tok, batch_size=4, seq_len=L, num_batches=1)
