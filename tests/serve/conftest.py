"""A real ``thinkrl serve`` process on tiny-random, one per test module."""

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with contextlib.closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(*args: str, timeout: float = 120.0):
    """Start ``python -m thinkrl serve model=tiny-random ...`` on a free port; yields its
    base URL (``http://127.0.0.1:PORT``) once /health answers; stops it afterwards."""
    from thinkrl.models import resolve

    resolve("tiny-random")  # build the model before the server starts, so its start is quick
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(
        [sys.executable, "-m", "thinkrl", "serve", "model=tiny-random", f"port={port}", "dtype=fp32", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"thinkrl serve exited with {proc.returncode}:\n{proc.stdout.read()}")
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("thinkrl serve did not answer /health in time")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


def health(url: str) -> dict:
    import json

    with urllib.request.urlopen(url + "/health", timeout=5) as r:
        return json.loads(r.read())


def wait_idle(url: str, timeout: float = 10.0) -> dict:
    """/health once no slot is taken and nothing waits (or the last answer at the timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        h = health(url)
        if (h["active"] == 0 and h["waiting"] == 0) or time.monotonic() > deadline:
            return h
        time.sleep(0.05)


def post(url: str, body: bytes | dict) -> tuple[int, dict]:
    """POST JSON (or raw bytes); the status and the JSON reply, errors included."""
    import json

    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


class Helpers:
    health, wait_idle, post, running_server = (
        staticmethod(health),
        staticmethod(wait_idle),
        staticmethod(post),
        staticmethod(running_server),
    )


@pytest.fixture(scope="session")
def srv():
    """The helpers above, for test modules (tests/ is not a package)."""
    return Helpers


@pytest.fixture(scope="module")
def server():
    with running_server() as url:
        yield url
