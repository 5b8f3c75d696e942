"""The sandbox child's bootstrap: run as `python -I -S -B -u -c <this file's text> ...`.

Never imported: `moejax.evals.sandbox` reads this file's text and passes it with `-c` to a fresh
interpreter (isolated mode, no site), so it may use nothing outside the standard library.
argv: verdict_fd timeout_s memory_bytes fsize_bytes nofile program_path isolate_net
site_dirs(os.pathsep-joined). Everything it needs after the program starts is bound to a local first,
so patching builtins/os/sys from the program changes nothing here. See `moejax.evals.sandbox` for the
protocol (verdict token over stdin, verdict pipe, audit hook).
"""
# pylint: skip-file
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


if __name__ == "__main__":
  _boot()
