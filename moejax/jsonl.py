"""JSON Lines reading, one object a line, shared by every reader of `.jsonl` files in moejax.

`parse_objects(text, where)` is the single place that splits a `.jsonl` text into objects and
decides what a bad line means: benchmark data and sample files reject it (naming the file and line),
the metrics and eval-results files written by appenders may end in a torn line (a crash mid-append).
"""

from __future__ import annotations

import json
import os
from typing import Literal

TornPolicy = Literal["raise", "last", "skip"]


def parse_objects(text: str, where: str, *, error: type[Exception] = ValueError,
                  torn: TornPolicy = "raise") -> tuple[list[tuple[int, dict]], int]:
  """(line number, object) for every non-blank line of `text`, and how many lines were skipped.

  `where` names the source in error messages (`<where>:<line>: ...`). `error` is the exception
  class raised. `torn`: "raise" rejects every line that is not a JSON object; "last" forgives an
  unparsable *last* non-blank line (a writer may be mid-append) and rejects the others; "skip"
  drops every unparsable line and counts it. A line that parses to a non-object always raises.
  """
  numbered = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
  rows: list[tuple[int, dict]] = []
  skipped = 0
  for i, (lineno, line) in enumerate(numbered):
    try:
      obj = json.loads(line)
    except json.JSONDecodeError as e:
      if torn == "skip" or (torn == "last" and i == len(numbered) - 1):
        skipped += 1
        continue
      raise error(f"{where}:{lineno}: invalid JSON: {e.msg}") from e
    if not isinstance(obj, dict):
      raise error(f"{where}:{lineno}: expected a JSON object, got {type(obj).__name__}")
    rows.append((lineno, obj))
  return rows, skipped


def read_numbered(path: str, *, error: type[Exception] = ValueError,
                  torn: TornPolicy = "raise") -> list[tuple[int, dict]]:
  """(line number, object) for the `.jsonl` file at `path` (see `parse_objects`); absent: error."""
  if not os.path.isfile(path):
    raise error(f"{path}: no such file")
  try:
    with open(path, encoding="utf-8") as f:
      text = f.read()
  except (OSError, UnicodeDecodeError) as e:
    raise error(f"{path}: cannot read: {e}") from e
  return parse_objects(text, path, error=error, torn=torn)[0]


def read_objects(path: str, *, error: type[Exception] = ValueError, torn: TornPolicy = "raise",
                 missing_ok: bool = False) -> list[dict]:
  """The objects of the `.jsonl` file at `path`; [] if it is absent and `missing_ok`."""
  if missing_ok and not os.path.isfile(path):
    return []
  return [obj for _, obj in read_numbered(path, error=error, torn=torn)]
