"""Run a command as an ordinary, unprivileged user, from a test that runs as root.

CI runs as root, but the sandbox must confine model code for every user. This starts a command
the way a user without root would run it: uid and gid 65534 (``nobody``), no supplementary
groups, no capabilities. Only one thing differs from a real user's machine, and only where it
has to: when this checkout's Python lives under a folder that user may not enter (a pyenv under
``/root``), a private mount namespace binds those folders back read-only (the launcher's own
``expose``), as if the user had installed their own Python. Nothing else of the host changes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

NOBODY = 65534
REPO = Path(__file__).resolve().parents[2]
LAUNCH_DIR = REPO / "thinkrl" / "sandbox"

_BECOME = r"""
import json, os, sys, tempfile
spec = json.loads(sys.argv[1])
sys.path.insert(0, spec["launch_dir"])
import _launch as L
L._check(L.libc.unshare(L.CLONE_NEWNS), "unshare")
L.mount(None, "/", None, L.MS_REC | L.MS_PRIVATE)
staging = tempfile.mkdtemp()
L.mount("tmpfs", staging, "tmpfs", 0, "size=1m,mode=700")
fds = {p: os.open(p, os.O_PATH | os.O_DIRECTORY) for p in spec["paths"] if os.path.isdir(p)}
L.expose(fds, spec["uid"], staging, fresh_tmp=False)
os.setgroups([])
os.setresgid(spec["uid"], spec["uid"], spec["uid"])
os.setresuid(spec["uid"], spec["uid"], spec["uid"])
os.chdir(spec["cwd"])
os.execve(spec["argv"][0], spec["argv"], spec["env"])
"""


def _paths() -> list[str]:
    paths = {
        sys.base_prefix,
        sys.prefix,
        sysconfig.get_paths()["purelib"],
        sysconfig.get_paths()["platlib"],
        os.path.dirname(os.path.realpath(sys.executable)),
        str(REPO),
    }
    return sorted({os.path.realpath(p) for p in paths})


def run_as_user(
    argv: list[str], env: dict | None = None, timeout: float = 600, uid: int = NOBODY, cwd: str | Path = REPO
) -> subprocess.CompletedProcess:
    """``argv`` as ``uid`` (must be called as root); stdout and stderr together, as text."""
    assert os.geteuid() == 0, "run_as_user starts from root"
    base = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/tmp", "LANG": "C.UTF-8"}
    spec = {
        "uid": uid,
        "paths": _paths(),
        "argv": argv,
        "env": {**base, **(env or {})},
        "launch_dir": str(LAUNCH_DIR),
        "cwd": str(cwd),
    }
    return subprocess.run(
        [sys.executable, "-I", "-S", "-c", _BECOME, json.dumps(spec)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
    )


def userns_allowed() -> bool:
    """Whether this kernel lets an unprivileged user make a user namespace."""
    code = "import ctypes, sys; sys.exit(ctypes.CDLL(None, use_errno=True).unshare(0x10000000) != 0)"
    return run_as_user([sys.executable, "-I", "-S", "-c", code], timeout=60).returncode == 0
