"""Metric writers: TensorBoard event files (no TensorFlow needed) and a JSONL log, side by side.

`MetricWriter(logdir, jsonl_path)` writes every scalar both to `<logdir>/events.out.tfevents.*` and as
one JSON object per call (`{"step": s, ...}`) to `jsonl_path`. Images (expert-load heatmaps) and
TensorBoard hparams go to the event file only. Only the chief process should construct a writer; the
others use `NullWriter`.
"""

from __future__ import annotations

import json
import math
import os
import struct
import time
import zlib
from typing import Any, Mapping

import numpy as np
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.event_file_writer import EventFileWriter


def encode_png(image_HxWx3: np.ndarray) -> bytes:
  """Minimal RGB8 PNG encoder (so no image library is needed)."""
  img = np.ascontiguousarray(image_HxWx3, dtype=np.uint8)
  h, w, _ = img.shape
  raw = b"".join(b"\x00" + img[row].tobytes() for row in range(h))

  def chunk(tag: bytes, data: bytes) -> bytes:
    body = tag + data
    return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body) & 0xFFFFFFFF)

  header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
  return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 6))
          + chunk(b"IEND", b""))


def load_heatmap(load_LxE: np.ndarray, cell: int = 12) -> np.ndarray:
  """Expert-load heatmap, rows = MoE layers, columns = experts; colour = load / mean load.

  Blue (underloaded, 0) -> white (balanced, 1) -> red (>= 2x the mean). Returns uint8 [H, W, 3].
  """
  load = np.asarray(load_LxE, dtype=np.float64)
  ratio = load / np.maximum(load.mean(axis=1, keepdims=True), 1e-9)
  under = np.clip(ratio, 0.0, 1.0)
  over = np.clip(ratio - 1.0, 0.0, 1.0)
  r = np.where(ratio < 1.0, under, 1.0)
  g = np.where(ratio < 1.0, under, 1.0 - over)
  b = np.where(ratio < 1.0, 1.0, 1.0 - over)
  rgb = (np.stack([r, g, b], axis=-1) * 255).astype(np.uint8)
  return np.kron(rgb, np.ones((cell, cell, 1), dtype=np.uint8))


class MetricWriter:
  """Writes scalars to TensorBoard and JSONL; images and hparams to TensorBoard."""

  def __init__(self, logdir: str, jsonl_path: str | None = None):
    os.makedirs(logdir, exist_ok=True)
    self._events = EventFileWriter(logdir)
    self._jsonl = open(jsonl_path, "a", encoding="utf-8") if jsonl_path else None

  def _write(self, step: int, values: list[summary_pb2.Summary.Value]) -> None:
    event = event_pb2.Event(wall_time=time.time(), step=int(step),
                            summary=summary_pb2.Summary(value=values))
    self._events.add_event(event)

  def scalars(self, step: int, metrics: Mapping[str, Any]) -> None:
    clean = {k: float(v) for k, v in metrics.items()}
    self._write(step, [summary_pb2.Summary.Value(tag=k, simple_value=v) for k, v in clean.items()])
    if self._jsonl is not None:
      row = {"step": int(step)}
      row.update({k: (v if math.isfinite(v) else str(v)) for k, v in clean.items()})
      self._jsonl.write(json.dumps(row) + "\n")
      self._jsonl.flush()

  def image(self, step: int, tag: str, image_HxWx3: np.ndarray) -> None:
    h, w, _ = image_HxWx3.shape
    img = summary_pb2.Summary.Image(height=h, width=w, colorspace=3,
                                    encoded_image_string=encode_png(image_HxWx3))
    self._write(step, [summary_pb2.Summary.Value(tag=tag, image=img)])

  def hparams(self, hparams: Mapping[str, Any]) -> None:
    from tensorboard.plugins.hparams import summary_v2  # pylint: disable=g-import-not-at-top
    flat = {k: (v if isinstance(v, (bool, int, float, str)) else str(v)) for k, v in hparams.items()}
    pb = summary_v2.hparams_pb(flat)
    self._events.add_event(event_pb2.Event(wall_time=time.time(), step=0, summary=pb))

  def flush(self) -> None:
    self._events.flush()

  def close(self) -> None:
    self._events.close()
    if self._jsonl is not None:
      self._jsonl.close()


class NullWriter:
  """Stands in for `MetricWriter` on non-chief processes."""

  def scalars(self, step, metrics):
    del step, metrics

  def image(self, step, tag, image_HxWx3):
    del step, tag, image_HxWx3

  def hparams(self, hparams):
    del hparams

  def flush(self):
    pass

  def close(self):
    pass


def read_scalars(logdir: str) -> dict[str, list[tuple[int, float]]]:
  """Reads back every scalar of the event files in `logdir` with tensorboard's own event reader."""
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  acc = event_accumulator.EventAccumulator(logdir, size_guidance={"scalars": 0, "images": 0})
  acc.Reload()
  return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
