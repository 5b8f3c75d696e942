"""moejax.data: corpora, byte-level BPE tokenizer and packed, resumable grain batches.

    cfg = DataConfig(source="stdlib", vocab_size=4096)
    tok = build_tokenizer(cfg, workdir)
    it = make_train_iterator(cfg, tok, batch_size=8, seq_len=128, seed=0)
    batch = next(it)   # {"tokens", "segment_ids", "positions"}: int32 [8, 128]
"""

from moejax.data.corpus import DataConfig, DataError, Document, load_split, split_of
from moejax.data.pipeline import TrainIterator, make_eval_batches, make_train_iterator
from moejax.data.tokenizer import build_tokenizer, eos_id, pad_id

__all__ = [
    "DataConfig", "DataError", "Document", "TrainIterator", "build_tokenizer", "eos_id",
    "load_split", "make_eval_batches", "make_train_iterator", "pad_id", "split_of",
]
