"""Long-lived sandboxed workers with a per-request deadline.

Some checks are not model-written programs but still chew on model-written input with code that
can hang or blow up: math-verify hands answers to sympy, and ``9**9**9**9`` evaluates forever.
math-verify's own timeout uses ``signal.alarm`` (main thread only), so instead the check runs in
a worker process inside the sandbox (same namespaces, uid, memory limit) that speaks JSON lines
on stdin/stdout. A request that misses its deadline gets the worker killed (process group and
PID namespace) and replaced; the caller sees :class:`WorkerTimeout`.

These workers run the checker's own code on model-written *text*, not model-written programs,
so where no isolation can be built they still start (rlimits, own session, never as root) and
say so once in the log, instead of refusing as the code reward does.
"""

from __future__ import annotations

import atexit
import json
import os
import queue
import selectors
import threading
import time

from thinkrl.sandbox import Limits, _remove, _Slot, _spawn, capabilities, log, stop

_warned = []


def _warn_if_unconfined() -> None:
    if not _warned and not capabilities()["isolated"]:
        log.warning("sandbox: no isolation on this machine; checker workers run with rlimits only")
        _warned.append(True)


class WorkerTimeout(Exception):
    pass


class WorkerCrashed(Exception):
    pass


class Worker:
    """One sandboxed process running ``script`` (which must print one line ``ready`` first)."""

    def __init__(self, script: str, limits: Limits, start_timeout: float = 120.0):
        _warn_if_unconfined()
        self.slot = _Slot()
        uid = self.uid = self.slot.__enter__()
        self.proc, self.workdir, head = _spawn(
            ["-I", "-B", "worker.py"], {"worker.py": script}, limits, uid, unconfined_ok=True
        )
        self.proc.stdin.write(head)
        self.proc.stdin.flush()
        self.buf = b""
        self.sel = selectors.DefaultSelector()
        os.set_blocking(self.proc.stdout.fileno(), False)
        self.sel.register(self.proc.stdout, selectors.EVENT_READ)
        if self._readline(time.monotonic() + start_timeout) != "ready":
            self.close()
            raise WorkerCrashed(
                "worker did not start: " + self.proc.stderr.read().decode(errors="replace")[-500:]
            )

    def _readline(self, deadline: float) -> str:
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise WorkerTimeout
            if self.sel.select(timeout=left):
                chunk = os.read(self.proc.stdout.fileno(), 65536)
                if not chunk:
                    raise WorkerCrashed("worker exited")
                self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line.decode()

    def call(self, request: dict, timeout: float) -> dict:
        try:
            self.proc.stdin.write(json.dumps(request).encode() + b"\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            raise WorkerCrashed("worker exited") from None
        return json.loads(self._readline(time.monotonic() + timeout))

    def close(self) -> None:
        stop(self.proc, self.uid)
        self.sel.close()
        for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            try:
                f.close()
            except OSError:
                pass
        self.slot.__exit__(None, None, None)
        _remove(self.workdir)


class WorkerPool:
    """``size`` workers, started lazily; a worker that times out or crashes is replaced."""

    def __init__(self, script: str, size: int, limits: Limits):
        self.script, self.size, self.limits = script, size, limits
        self.idle: queue.Queue = queue.Queue()
        self.started = 0
        self.lock = threading.Lock()
        self.restarts = 0
        atexit.register(self.close)

    def _take(self) -> Worker:
        with self.lock:
            if self.idle.empty() and self.started < self.size:
                self.started += 1
                fresh = True
            else:
                fresh = False
        if fresh:
            try:
                return Worker(self.script, self.limits)
            except Exception:
                with self.lock:
                    self.started -= 1
                raise
        return self.idle.get()

    def call(self, request: dict, timeout: float) -> dict:
        w = self._take()
        try:
            out = w.call(request, timeout)
        except (WorkerTimeout, WorkerCrashed, ValueError):
            w.close()
            with self.lock:
                self.started -= 1
                self.restarts += 1
            raise
        self.idle.put(w)
        return out

    def close(self) -> None:
        while True:
            try:
                w = self.idle.get_nowait()
            except queue.Empty:
                break
            w.close()
            with self.lock:
                self.started -= 1
