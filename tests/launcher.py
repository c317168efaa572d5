"""One warm interpreter for the commands a test must kill: ``WarmLauncher``.

Starting ``python -m bottlecache`` costs TensorFlow's import (about 10 s of CPU here) before the
command does anything. A test that kills a build twenty times would pay it twenty-one times. The
launcher starts one server process that imports TensorFlow, Keras, h5py and bottlecache's command
line once, runs no TensorFlow operation (so no runtime thread pool exists yet), and then forks one
child per command. A child is a real process of its own (its own pid, files, signals and exit
status): the test kills it as it would kill any process.

Fork safety after the import is checked, not assumed: the fault tests that use the launcher
(tests/test_reliability.py, tests/test_build.py) compare what forked children built with an
in-process clean build, array for array, and
``test_the_warm_launcher_runs_each_command_as_a_process_of_its_own`` checks exit codes and output.

The protocol is a JSON line per request on the server's stdin (argv, cwd, environment, the files
for stdout and stderr, an optional file-size limit), answered by a JSON line with the child's pid.
The server reaps its children and writes each exit status to ``<status dir>/<pid>`` (written under
a temporary name, then renamed), which ``WarmProcess.poll`` reads.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

SERVER = r"""
import json, os, resource, select, signal, sys
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
import numpy, h5py, tensorflow, keras  # the slow imports, once
import bottlecache.cli, bottlecache.cache.build, bottlecache.models.engines, bottlecache.train.finetune, bottlecache.train.heads
status_dir = sys.argv[1]
requests = sys.stdin.buffer
children = set()

def reap():
    while children:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        children.discard(pid)
        code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        tmp = os.path.join(status_dir, f".{pid}.tmp")
        with open(tmp, "w") as handle:
            handle.write(str(code))
        os.replace(tmp, os.path.join(status_dir, str(pid)))

def child(request):
    os.setpgid(0, 0)  # a group of its own: a test may kill it and whatever it started
    fd = os.open(os.devnull, os.O_RDONLY)
    os.dup2(fd, 0)
    for target, path in ((1, request["stdout"]), (2, request["stderr"])):
        if path is None:  # stderr to stdout's file
            os.dup2(1, target)
            continue
        fd = os.open(path, os.O_WRONLY | os.O_APPEND)  # made empty by the client before the request
        os.dup2(fd, target)
        os.close(fd)
    if request.get("fsize") is not None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() fails with EFBIG instead of a kill
        resource.setrlimit(resource.RLIMIT_FSIZE, (request["fsize"], request["fsize"]))
    os.environ.clear()
    os.environ.update(request["env"])
    os.chdir(request["cwd"])
    sys.argv = ["bottlecache", *request["argv"]]
    code = 0
    try:
        bottlecache.cli.main()
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    except BaseException:
        import traceback
        traceback.print_exc()
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)

sys.stdout.write(json.dumps({"ready": os.getpid()}) + "\n")
sys.stdout.flush()
while True:
    ready, _, _ = select.select([requests], [], [], 0.02)
    reap()
    if not ready:
        continue
    line = requests.readline()
    if not line:
        break
    request = json.loads(line)
    pid = os.fork()
    if pid == 0:
        child(request)
    children.add(pid)
    sys.stdout.write(json.dumps({"pid": pid}) + "\n")
    sys.stdout.flush()
while children:
    try:
        os.waitpid(-1, 0)
    except ChildProcessError:
        break
    reap()
"""


class WarmProcess:
    """A command run by the launcher: the parts of ``subprocess.Popen`` the tests use."""

    def __init__(self, pid: int, status: Path):
        self.pid, self._status, self.returncode = pid, status, None

    def poll(self) -> int | None:
        if self.returncode is None and self._status.exists():
            self.returncode = int(self._status.read_text())
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"warm child {self.pid}", timeout)
            time.sleep(0.005)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:  # ended between the look and the signal
                pass

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class WarmLauncher:
    """The server: ``launcher.start(argv, stdout=PATH, stderr=PATH)`` runs ``bottlecache ARGV`` in a
    forked child of a process that has TensorFlow imported already."""

    def __init__(self, folder: Path, env: dict | None = None):
        folder.mkdir(parents=True, exist_ok=True)
        self.status_dir = folder
        self.env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **(env or {})}
        with open(folder / "server.log", "wb") as log:  # TensorFlow's start-up lines, once
            self._server = subprocess.Popen([sys.executable, "-c", SERVER, str(folder)], stdin=subprocess.PIPE,
                                            stdout=subprocess.PIPE, stderr=log, env=self.env)
        ready = self._server.stdout.readline()
        if not ready:
            log = (folder / "server.log").read_text(errors="replace")[-3000:]
            raise RuntimeError(f"the warm launcher did not start (exit {self._server.wait()}): {log}")

    def start(self, argv, *, stdout: Path, stderr: Path | None = None, env: dict | None = None,
              cwd: Path | None = None, fsize: int | None = None) -> WarmProcess:
        """Run ``bottlecache ARGV``; ``stderr`` None: into ``stdout``'s file; ``fsize``: the child's
        file-size limit (RLIMIT_FSIZE, SIGXFSZ ignored)."""
        for path in (stdout, stderr):  # they exist (empty) when start returns, as with Popen
            if path is not None:
                Path(path).write_bytes(b"")
        request = {"argv": [str(a) for a in argv], "stdout": str(stdout),
                   "stderr": None if stderr is None else str(stderr),
                   "env": {**self.env, **(env or {})}, "cwd": str(cwd or os.getcwd()), "fsize": fsize}
        self._server.stdin.write((json.dumps(request) + "\n").encode())
        self._server.stdin.flush()
        answer = self._server.stdout.readline()
        if not answer:
            raise RuntimeError(f"the warm launcher ended (exit {self._server.wait()})")
        pid = json.loads(answer)["pid"]
        return WarmProcess(pid, self.status_dir / str(pid))

    def close(self) -> None:
        if self._server.poll() is None:
            self._server.stdin.close()
            try:
                self._server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self._server.kill()
                self._server.wait()
