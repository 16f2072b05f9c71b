"""Isolated execution of model-written code.

Every run goes through ``_launch.py`` (see its docstring for the isolation steps): new mount,
PID, network, IPC and UTS namespaces (as root, or inside an unprivileged user namespace for
everyone else), a read-only view of the host with a fresh size-capped tmpfs as the only writable
place, a uid that is not root, no capabilities, a seccomp filter, rlimits on CPU time, address
space, file size and process count, a wall-clock deadline and a cap on captured output. When
time is up or the output cap is hit, the whole process group is killed with SIGKILL; the PID
namespace takes everything else down with it.

    res = run_python("print(input()[::-1])", stdin="abc")
    res.status, res.stdout   # ("ok", "cba\\n")

``run`` returns a :class:`Result` whose ``status`` is one of ``ok`` (exit 0), ``error`` (non-zero
exit), ``timeout`` (wall clock), ``cpu_time`` (RLIMIT_CPU), ``memory`` (MemoryError under
RLIMIT_AS), ``output_limit`` (more output than the cap), ``signal`` (killed by another signal)
or ``sandbox_error`` (the launcher itself failed).

Where no isolation can be built, model code does not run: :func:`require_isolation` raises
:class:`SandboxUnavailable` with what is missing, unless :func:`configure` (the config's
``sandbox.allow_unconfined=true``) or ``THINKRL_SANDBOX_ALLOW_UNCONFINED=1`` opts out, which is
logged. ``python -m thinkrl sandbox check`` prints what is in force (:func:`capabilities`).
"""

from __future__ import annotations

import json
import logging
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

log = logging.getLogger(__name__)

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
# Runs at once: beyond two per core, more only stretch every run's wall clock toward its
# deadline (a burst of 200 on 2 cores timed out a fifth of correct programs); the rest queue.
_running = threading.BoundedSemaphore(2 * (os.cpu_count() or 1))
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
    paths = {
        sys.base_prefix,
        sys.prefix,
        sysconfig.get_paths()["purelib"],
        sysconfig.get_paths()["platlib"],
        os.path.dirname(os.path.realpath(sys.executable)),
        os.path.dirname(os.path.abspath(sys.executable)),
    }
    return sorted({os.path.realpath(p) for p in paths if p})


METHODS = ("root", "userns")


def _methods() -> list[str]:
    """Isolation methods the launcher may use. ``THINKRL_SANDBOX_METHODS`` narrows them, so that
    tests can play a machine that has fewer (``none``: a machine with no isolation at all)."""
    raw = os.environ.get("THINKRL_SANDBOX_METHODS", ",".join(METHODS))
    return [m for m in raw.split(",") if m in METHODS]


def _spec(
    argv: list[str], files: dict[str, str], limits: Limits, uid: int, workdir: str | None, probe: bool = False
) -> bytes:
    spec = {
        "argv": [sys.executable, *argv],
        "files": files,
        "limits": asdict(limits),
        "uid": uid,
        "tmpfs_mb": limits.tmpfs_mb,
        "expose": _expose_paths(),
        "host_workdir": workdir,
        "probe": probe,
        "methods": _methods(),
        "allow_unconfined": workdir is not None,
    }
    body = json.dumps(spec).encode()
    return f"{len(body)}\n".encode() + body


_WORKDIR_PREFIX = "thinkrl-sbx-"


def _host_workdir() -> str:
    """A host folder for an unconfined run (the pid in its name lets a later run sweep it up)."""
    return tempfile.mkdtemp(prefix=f"{_WORKDIR_PREFIX}{os.getpid()}-")


def sweep_stale_workdirs() -> int:
    """Remove work folders left by processes that no longer exist (a run killed with SIGKILL)."""
    removed = 0
    for p in Path(tempfile.gettempdir()).glob(f"{_WORKDIR_PREFIX}*-*"):
        try:
            pid = int(p.name[len(_WORKDIR_PREFIX) :].split("-")[0])
        except ValueError:
            continue
        if pid != os.getpid() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(p, ignore_errors=True)
            removed += 1
    return removed


def _spawn(
    argv: list[str],
    files: dict[str, str],
    limits: Limits,
    uid: int,
    probe: bool = False,
    unconfined_ok: bool | None = None,
):
    """Start the launcher. A host work folder exists only where an unconfined run is allowed;
    an isolated run works in its own tmpfs and leaves nothing on the host."""
    if unconfined_ok is None:
        unconfined_ok = _policy["allow_unconfined"]
    workdir = _host_workdir() if unconfined_ok else None
    proc = subprocess.Popen(
        [sys.executable, "-I", "-S", LAUNCHER],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
        close_fds=True,
    )
    return proc, workdir, _spec(argv, files, limits, uid, workdir, probe)


def _remove(workdir: str | None) -> None:
    if workdir is not None:
        shutil.rmtree(workdir, ignore_errors=True)


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


def _children(pid: int) -> list[int]:
    """Host pids of ``pid``'s live children (the launcher's: the sandbox's init)."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                out.append(int(d.name))
    return out


def _wait_gone(pids: list[int], patience: float = 5.0) -> None:
    """Wait until each of ``pids`` has exited. A PID namespace's init finishes exiting only after
    the kernel has killed and reaped everything else inside, so this waits for the whole sandbox."""
    end = time.monotonic() + patience
    while pids and time.monotonic() < end:
        pids = [p for p in pids if _uid_of(Path(f"/proc/{p}")) is not None]
        time.sleep(0.002)


def _end(proc: subprocess.Popen) -> int:
    """Kill a launcher's process group, wait for its sandbox to be gone; the launcher's status."""
    inits = _children(proc.pid) if proc.poll() is None else []  # a launcher that ended waited for its init
    _kill(proc)
    rc = proc.wait()
    _wait_gone(inits)
    return rc


def stop(proc: subprocess.Popen, uid: int) -> None:
    """End a launcher and everything it started, and return only once all of it is gone."""
    _end(proc)
    kill_uid(uid)  # as root: whatever of the program's fresh uid is left (setsid escapees)


def run(argv: list[str], files: dict[str, str], stdin: str = "", limits: Limits = Limits()) -> Result:
    """Run ``python <argv>`` in a fresh sandbox whose work folder holds ``files``."""
    require_isolation()
    with _running, _Slot() as uid:
        t0 = time.monotonic()  # the deadline counts the program's own run, not its wait in the queue
        proc, workdir, head = _spawn(argv, files, limits, uid)
        try:
            return _collect(proc, head + stdin.encode(), limits, t0)
        finally:
            stop(proc, uid)
            _remove(workdir)


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
    rc = _end(proc) if status is not None else proc.wait()
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


def run_check(
    code: str, tests: str, entry_point: str, limits: Limits = Limits(), prompt: str = ""
) -> tuple[int, int, Result]:
    """HumanEval-style: each asserting statement of ``check(candidate)`` in ``tests``, with
    ``candidate`` calling ``<entry_point>`` of ``code``. The tests run in a harness process that
    the program cannot reach; only plain data crosses back (see ``_runner.py``). ``prompt`` (the
    task's own, trusted text) gives the tests the helpers it defines. Returns
    ``(passed, total, result)``; (0, 0) if no verdict."""
    nonce = os.urandom(16).hex()
    files = {
        "runner.py": RUNNER_SRC,
        "solution.py": code,
        "tests.py": tests,
        "prompt.py": prompt,
        ".nonce": nonce,
    }
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


_policy = {"allow_unconfined": os.environ.get("THINKRL_SANDBOX_ALLOW_UNCONFINED") == "1", "warned": False}


class SandboxUnavailable(RuntimeError):
    """No isolation can be built on this machine, and unconfined runs were not allowed."""


def configure(allow_unconfined: bool) -> None:
    """Set the policy for machines without isolation (the config's ``sandbox.allow_unconfined``)."""
    _policy["allow_unconfined"] = (
        bool(allow_unconfined) or os.environ.get("THINKRL_SANDBOX_ALLOW_UNCONFINED") == "1"
    )
    _policy["warned"] = False
    if _policy["allow_unconfined"]:
        sweep_stale_workdirs()


def capabilities() -> dict:
    """What the sandbox enforces on this machine, as reported from inside a probe run:
    ``method`` (root | userns | unconfined | None), ``netns``, ``mountns``, ``pidns``, ``ipcns``,
    ``own_proc``, ``readonly_mounts``, ``uid``, ``capabilities`` (the effective set, 0 = none),
    ``no_new_privs``, ``seccomp_mode`` (2 = filter) and ``seccomp_rules``, ``errors`` (why a
    method failed), plus ``isolated``: whether model code may run without an opt-out."""
    return dict(_capabilities(tuple(_methods())))


@lru_cache(maxsize=8)
def _capabilities(methods: tuple) -> dict:
    with _Slot() as uid:
        proc, workdir, head = _spawn([], {}, Limits(), uid, probe=True, unconfined_ok=True)
        try:
            out, err = proc.communicate(head, timeout=30)
        finally:
            _remove(workdir)
    try:
        caps = json.loads(out.decode().strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {"method": None, "isolated": False, "errors": [err.decode(errors="replace")[-500:]]}
    caps["isolated"] = bool(
        caps.get("method") in METHODS
        and caps.get("mountns")
        and caps.get("pidns")
        and caps.get("netns")
        and caps.get("uid") != 0
        and caps.get("capabilities") == 0
    )
    return caps


HOW_TO_ISOLATE = (
    "the sandbox needs unprivileged user namespaces (check `sysctl user.max_user_namespaces` > 0 and, "
    "on Debian before 11, `kernel.unprivileged_userns_clone=1`; Ubuntu 23.10+ also restricts them "
    "through AppArmor: `kernel.apparmor_restrict_unprivileged_userns=0`), or root with CAP_SYS_ADMIN "
    "(in Docker: --cap-add SYS_ADMIN, or a seccomp profile that allows unshare)"
)


def require_isolation() -> None:
    """Raise :class:`SandboxUnavailable` unless model code will run isolated, or the user opted
    out (then log, once per policy, that it runs unconfined)."""
    caps = capabilities()
    if caps["isolated"]:
        return
    if _policy["allow_unconfined"]:
        if not _policy["warned"]:
            log.warning(
                "sandbox: no isolation on this machine (%s); model code runs UNCONFINED, with rlimits "
                "only, because sandbox.allow_unconfined=true",
                "; ".join(caps.get("errors", [])) or "?",
            )
            _policy["warned"] = True
        return
    raise SandboxUnavailable(
        "thinkrl will not run model-written code here: no isolation can be built on this machine ("
        + ("; ".join(caps.get("errors", [])) or "no method allowed")
        + "). "
        + HOW_TO_ISOLATE
        + ". To run it unconfined anyway, at your own risk, set sandbox.allow_unconfined=true."
    )
