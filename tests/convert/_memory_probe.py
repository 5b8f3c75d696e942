"""Peak extra RSS of `import_hf` and `export_run`, measured in a fresh process (used by
`test_streaming_memory.py`; run by hand as below to see the numbers).

    MALLOC_MMAP_THRESHOLD_=1048576 python -m tests.convert._memory_probe \
        WARMUP_HF_DIR HF_DIR WORK_DIR MAX_SHARD_BYTES

The warm-up import/export of a tiny model loads every module and starts JAX, orbax and tensorstore,
so what is measured afterwards is the conversion itself. Before each measured step the kernel's peak
RSS mark is reset (`/proc/self/clear_refs` 5) and the RSS at that moment taken as the base; the
result (JSON on stdout) is `VmHWM - base` in bytes, i.e. every allocation (numpy, XLA buffers,
tensorstore) plus any file pages mapped at the time. The fixed glibc mmap threshold makes freed
blocks >= 1 MiB go back to the kernel at once, so RSS follows live memory; without it, glibc's
per-thread free lists add a run-to-run varying retention (about one to two layers more here).
"""

from __future__ import annotations

import json
import os
import sys


def _status_bytes(field: str) -> int:
  with open("/proc/self/status", encoding="ascii") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1]) * 1024
  raise KeyError(field)


def _reset_peak() -> int:
  with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
    f.write("5")
  return _status_bytes("VmRSS")


def main(warmup_hf_dir: str, hf_dir: str, work_dir: str, max_shard_bytes: int) -> dict:
  from moejax.convert import export_run, import_hf
  import_hf(warmup_hf_dir, os.path.join(work_dir, "warmup_run"))
  export_run(os.path.join(work_dir, "warmup_run"), os.path.join(work_dir, "warmup_export"),
             max_shard_bytes=max_shard_bytes)
  base = _reset_peak()
  import_hf(hf_dir, os.path.join(work_dir, "run"))
  peak_import = _status_bytes("VmHWM") - base
  base = _reset_peak()
  export_run(os.path.join(work_dir, "run"), os.path.join(work_dir, "export"),
             max_shard_bytes=max_shard_bytes)
  peak_export = _status_bytes("VmHWM") - base
  return {"import_peak_bytes": peak_import, "export_peak_bytes": peak_export}


if __name__ == "__main__":
  print(json.dumps(main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))))
