"""Isolated execution of model-written code.

Every run goes through ``_launch.py`` (see its docstring for the isolation steps): its own
session and process group, PID/mount/network namespaces where the kernel allows, a read-only
view of the host with a fresh size-capped tmpfs as the only writable place, an unprivileged uid,
rlimits on CPU time, address space, file size and process count, a wall-clock deadline and a cap
on captured output. When time is up or the output cap is hit, the whole process group is killed
with SIGKILL; the PID namespace takes everything else down with it.

    res = run_python("print(input()[::-1])", stdin="abc")
    res.status, res.stdout   # ("ok", "cba\\n")

``run`` returns a :class:`Result` whose ``status`` is one of ``ok`` (exit 0), ``error`` (non-zero
exit), ``timeout`` (wall clock), ``cpu_time`` (RLIMIT_CPU), ``memory`` (MemoryError under
RLIMIT_AS), ``output_limit`` (more output than the cap), ``signal`` (killed by another signal)
or ``sandbox_error`` (the launcher itself failed).
"""

from __future__ import annotations

import json
import os
import selectors
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

HERE = Path(__file__).resolve().parent
LAUNCHER = str(HERE / "_launch.py")
RUNNER_SRC = (HERE / "_runner.py").read_text()


@dataclass(frozen=True)
class Limits:
    wall_s: float = 10.0  # wall clock, enforced by the parent
    cpu_s: int = 10  # RLIMIT_CPU (SIGXCPU, then SIGKILL one second later); 0 = none
    memory_mb: int = 1024  # RLIMIT_AS per process
    fsize_mb: int = 16  # RLIMIT_FSIZE: largest file a process may write
    tmpfs_mb: int = 64  # size of the writable /tmp inside the sandbox
    nproc: int = 16  # RLIMIT_NPROC for the sandbox's own uid
    output_bytes: int = 1 << 20  # stdout + stderr kept; more than this kills the run


@dataclass
class Result:
    status: str
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float


# ---------------------------------------------------------------------------
# Unprivileged uids: one per concurrent run of this process, so one run's fork bomb (counted by
# RLIMIT_NPROC per uid) never starves another run. The range is derived from the pid so that two
# processes on one machine rarely share uids.

_UID_SLOTS = 64
_slot_lock = threading.Lock()
_free_slots = list(range(_UID_SLOTS))


def _uid_base() -> int:
    return 200_000 + (os.getpid() % 20_000) * _UID_SLOTS


class _Slot:
    def __enter__(self) -> int:
        while True:
            with _slot_lock:
                if _free_slots:
                    self.slot = _free_slots.pop()
                    return _uid_base() + self.slot
            time.sleep(0.01)

    def __exit__(self, *exc) -> None:
        with _slot_lock:
            _free_slots.append(self.slot)


def _expose_paths() -> list[str]:
    """Folders the interpreter needs; the launcher re-exposes them if the uid cannot reach them."""
    paths = {sys.base_prefix, sys.prefix, sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"],
             os.path.dirname(os.path.realpath(sys.executable)), os.path.dirname(os.path.abspath(sys.executable))}
    return sorted({os.path.realpath(p) for p in paths if p})


def _spec(argv: list[str], files: dict[str, str], limits: Limits, uid: int, workdir: str | None,
          probe: bool = False) -> bytes:
    spec = {"argv": [sys.executable, *argv], "files": files, "limits": asdict(limits), "uid": uid, "gid": uid,
            "tmpfs_mb": limits.tmpfs_mb, "expose": _expose_paths(), "host_workdir": workdir, "probe": probe}
    body = json.dumps(spec).encode()
    return f"{len(body)}\n".encode() + body


def _spawn(argv: list[str], files: dict[str, str], limits: Limits, uid: int, probe: bool = False):
    workdir = tempfile.mkdtemp(prefix="thinkrl-sbx-")  # used only where no mount namespace exists
    proc = subprocess.Popen([sys.executable, "-I", "-S", LAUNCHER], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                            close_fds=True)
    return proc, workdir, _spec(argv, files, limits, uid, workdir, probe)


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _uid_of(pid_dir: Path) -> int | None:
    """Real uid of a live process (None for zombies: they hold nothing and cannot be killed)."""
    try:
        for line in (pid_dir / "status").read_text().splitlines():
            if line.startswith("State:") and line.split()[1] == "Z":
                return None
            if line.startswith("Uid:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def kill_uid(uid: int, patience: float = 5.0) -> None:
    """SIGKILL every process running as ``uid`` until none is left (uids are per-run, see _Slot)."""
    end = time.monotonic() + patience
    while time.monotonic() < end:
        pids = [int(d.name) for d in Path("/proc").iterdir() if d.name.isdigit() and _uid_of(d) == uid]
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        time.sleep(0.01)


def run(argv: list[str], files: dict[str, str], stdin: str = "", limits: Limits = Limits()) -> Result:
    """Run ``python <argv>`` in a fresh sandbox whose work folder holds ``files``."""
    t0 = time.monotonic()
    with _Slot() as uid:
        proc, workdir, head = _spawn(argv, files, limits, uid)
        try:
            return _collect(proc, head + stdin.encode(), limits, t0)
        finally:
            _kill(proc)
            proc.wait()
            kill_uid(uid)  # whatever left the group (setsid) or is still dying in the PID namespace
            shutil.rmtree(workdir, ignore_errors=True)


def _feed(proc: subprocess.Popen, data: bytes) -> None:
    try:
        proc.stdin.write(data)
        proc.stdin.close()
    except (BrokenPipeError, OSError):
        pass


def _collect(proc: subprocess.Popen, data: bytes, limits: Limits, t0: float) -> Result:
    writer = threading.Thread(target=_feed, args=(proc, data), daemon=True)
    writer.start()
    sel = selectors.DefaultSelector()
    bufs = {proc.stdout: bytearray(), proc.stderr: bytearray()}
    for f in bufs:
        os.set_blocking(f.fileno(), False)
        sel.register(f, selectors.EVENT_READ)
    deadline = t0 + limits.wall_s
    status = None
    while sel.get_map():
        left = deadline - time.monotonic()
        if left <= 0:
            status = "timeout"
            break
        for key, _ in sel.select(timeout=min(left, 0.5)):
            chunk = os.read(key.fileobj.fileno(), 65536)
            if not chunk:
                sel.unregister(key.fileobj)
                continue
            bufs[key.fileobj] += chunk
        if sum(len(b) for b in bufs.values()) > limits.output_bytes:
            status = "output_limit"
            break
    sel.close()
    if status is None:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            status = "timeout"
    if status is not None:
        _kill(proc)
    rc = proc.wait()
    out = bytes(bufs[proc.stdout][: limits.output_bytes]).decode("utf-8", "replace")
    err = bytes(bufs[proc.stderr][: limits.output_bytes]).decode("utf-8", "replace")
    if status is None:
        status = _classify(rc, err)
    return Result(status, rc, out, err, time.monotonic() - t0)


def _classify(rc: int, stderr: str) -> str:
    if rc == 0:
        return "ok"
    if rc == -signal.SIGXCPU:
        return "cpu_time"
    if rc < 0:
        return "signal"
    if rc == 125 and stderr.startswith("sandbox launcher:"):
        return "sandbox_error"
    if "MemoryError" in stderr[-2000:]:
        return "memory"
    return "error"


def run_python(code: str, stdin: str = "", limits: Limits = Limits()) -> Result:
    """Run ``code`` as a script (``__name__ == "__main__"``) with ``stdin`` as its input."""
    return run(["-I", "-B", "runner.py", "io"], {"runner.py": RUNNER_SRC, "solution.py": code}, stdin, limits)


def run_check(code: str, tests: str, entry_point: str, limits: Limits = Limits()) -> tuple[int, int, Result]:
    """HumanEval-style: exec ``code``, then each asserting statement of ``check(candidate)`` in ``tests``
    with ``candidate = <entry_point>``. Returns ``(passed, total, result)``; (0, 0) if no verdict."""
    nonce = os.urandom(16).hex()
    files = {"runner.py": RUNNER_SRC, "solution.py": code, "tests.py": tests, ".nonce": nonce}
    res = run(["-I", "-B", "runner.py", "check", entry_point], files, "", limits)
    for line in reversed(res.stdout.splitlines()):
        parts = line.split()
        if len(parts) == 3 and parts[0] == nonce:
            return int(parts[1]), int(parts[2]), res
    return 0, 0, res


# ---------------------------------------------------------------------------
# A pool sized to the machine


@lru_cache(maxsize=1)
def pool() -> ThreadPoolExecutor:
    """Threads only wait on sandbox processes, so one per core keeps every core busy."""
    return ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="sandbox")


@lru_cache(maxsize=1)
def capabilities() -> dict:
    """What isolation this machine gives: ``{"netns", "mountns", "pidns", "uid", ...}``."""
    with _Slot() as uid:
        proc, workdir, head = _spawn([], {}, Limits(), uid, probe=True)
        try:
            out, err = proc.communicate(head, timeout=30)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    try:
        return json.loads(out.decode().strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {"error": err.decode(errors="replace")[-500:]}
