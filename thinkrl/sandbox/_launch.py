"""Sandbox launcher: runs as root (or as the caller), sets up isolation, then execs the program.

Executed as ``python -I -S _launch.py`` by ``thinkrl.sandbox`` (standard library only, nothing
from thinkrl is imported). It reads a length-prefixed JSON spec from stdin; whatever follows on
stdin is the program's own input. Steps, each recorded in ``applied`` (``probe`` prints it):

1. new mount, network, PID, IPC and UTS namespaces (root only). The launcher forks an init
   (PID 1 of the new PID namespace), which forks the program; when init exits the kernel kills
   every process left inside (fork bombs, ``setsid`` escapees). The launcher mirrors the
   program's exit status or fatal signal.
2. inside: every existing mount is remounted read-only; a fresh, size-capped tmpfs goes on
   ``/tmp`` (the work folder is ``/tmp/work``); directories of the interpreter that the
   unprivileged uid cannot reach (e.g. a Python under ``/root``) are re-exposed read-only;
   a fresh ``/proc`` shows only the sandbox's own processes.
3. rlimits (CPU, address space, file size, process count, open files, no core dumps), then
   ``setgroups([])``/``setgid``/``setuid`` to an unprivileged uid, ``PR_SET_PDEATHSIG`` so the
   program dies with the launcher, all other file descriptors closed, ``execve``.

Without namespaces (not root, or a kernel that refuses) the work folder is a host temp folder,
the program still gets rlimits, its own session, and ``THINKRL_NO_NET=1`` asks the runner to
refuse sockets at the Python level.
"""

import ctypes
import json
import os
import resource
import signal

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWPID, CLONE_NEWNET = 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
MNT_DETACH, PR_SET_PDEATHSIG = 2, 1

libc = ctypes.CDLL(None, use_errno=True)


def _check(ret: int, what: str) -> None:
    if ret != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")


def mount(src, target, fstype, flags, data=None) -> None:
    enc = lambda s: s.encode() if s is not None else None  # noqa: E731
    _check(libc.mount(enc(src), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)), f"mount {target}")


def read_spec() -> dict:
    head = b""
    while not head.endswith(b"\n"):
        c = os.read(0, 1)
        if not c:
            raise SystemExit("sandbox launcher: no spec on stdin")
        head += c
    n, buf = int(head), b""
    while len(buf) < n:
        chunk = os.read(0, n - len(buf))
        if not chunk:
            raise SystemExit("sandbox launcher: truncated spec")
        buf += chunk
    return json.loads(buf)


def mountpoints() -> list[tuple[str, int]]:
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            path = fields[4].replace("\\040", " ").replace("\\011", "\t").replace("\\134", "\\")
            opts = fields[5].split(",")
            flags = (MS_NOSUID if "nosuid" in opts else 0) | (MS_NODEV if "nodev" in opts else 0) | \
                    (MS_NOEXEC if "noexec" in opts else 0)
            out.append((path, flags))
    return out


def blocked_ancestor(path: str) -> str | None:
    """The highest ancestor of ``path`` that others cannot traverse (mode without o+x)."""
    parts = path.strip("/").split("/")
    for i in range(1, len(parts)):
        anc = "/" + "/".join(parts[:i])
        if not os.stat(anc).st_mode & 0o001:
            return anc
    return None


def setup_filesystem(spec: dict, applied: dict) -> str:
    mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing below propagates back to the host
    ro = 0
    for path, flags in mountpoints():
        try:
            mount(None, path, None, MS_REMOUNT | MS_BIND | MS_RDONLY | flags)
            ro += 1
        except OSError:
            pass
    applied["readonly_mounts"] = ro
    # Interpreter folders that live under /tmp (a virtualenv in a checkout under /tmp) would
    # vanish under the fresh tmpfs: keep a handle on the old /tmp and bind them back read-only.
    under_tmp = [p for p in spec.get("expose", []) if p.startswith("/tmp/") and os.path.isdir(p)]
    old_tmp = os.open("/tmp", os.O_RDONLY | os.O_DIRECTORY) if under_tmp else None
    mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, f"size={spec['tmpfs_mb']}m,mode=1777")
    for path in under_tmp:
        os.makedirs(path, mode=0o755, exist_ok=True)
        mount(f"/proc/self/fd/{old_tmp}/{path[len('/tmp/'):]}", path, None, MS_BIND | MS_REC)
        mount(None, path, None, MS_REMOUNT | MS_BIND | MS_RDONLY)
    if old_tmp is not None:
        os.close(old_tmp)
    # Re-expose interpreter folders hidden behind a 0700 ancestor (e.g. /root/.pyenv).
    staged, covers = [], set()
    for i, path in enumerate(spec.get("expose", [])):
        if not os.path.isdir(path):
            continue
        anc = blocked_ancestor(path)
        if anc is None:
            continue
        stage = f"/tmp/.stage{i}"
        os.mkdir(stage)
        mount(path, stage, None, MS_BIND | MS_REC)
        staged.append((stage, path))
        covers.add(anc)
    for anc in sorted(covers, key=len):
        mount("tmpfs", anc, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=755")
    for stage, path in staged:
        os.makedirs(path, exist_ok=True)
        mount(stage, path, None, MS_BIND | MS_REC)
        mount(None, path, None, MS_REMOUNT | MS_BIND | MS_RDONLY)
        libc.umount2(stage.encode(), MNT_DETACH)
        os.rmdir(stage)
    applied["exposed"] = [p for _, p in staged]
    try:
        mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
        applied["own_proc"] = True
    except OSError:
        applied["own_proc"] = False
    return "/tmp/work"


def prepare_workdir(workdir: str, spec: dict) -> None:
    uid, gid = spec["uid"], spec["gid"]
    os.makedirs(workdir, exist_ok=True)
    for name, text in spec["files"].items():
        path = os.path.join(workdir, name)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        if uid is not None:
            os.chown(path, uid, gid)
    if uid is not None:
        os.chown(workdir, uid, gid)
    os.chmod(workdir, 0o700)
    os.chdir(workdir)


def apply_limits(lim: dict) -> None:
    cpu = lim["cpu_s"]
    if cpu:
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))  # SIGXCPU, then SIGKILL a second later
    mem = lim["memory_mb"] * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
    fsize = lim["fsize_mb"] * 2**20
    resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
    resource.setrlimit(resource.RLIMIT_NPROC, (lim["nproc"], lim["nproc"]))
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def become_program(spec: dict, workdir: str, applied: dict) -> None:
    prepare_workdir(workdir, spec)
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8",
           "PYTHONDONTWRITEBYTECODE": "1", "PYTHONHASHSEED": "0", "PYTHONIOENCODING": "utf-8"}
    if not applied.get("netns"):
        env["THINKRL_NO_NET"] = "1"
    env.update(spec.get("env", {}))
    apply_limits(spec["limits"])
    if spec["uid"] is not None:
        os.setgroups([])
        os.setgid(spec["gid"])
        os.setuid(spec["uid"])
        applied["uid"] = os.getuid()
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # cleared by setuid: set it again afterwards
    if spec.get("probe"):
        os.write(1, (json.dumps(applied) + "\n").encode())
        os._exit(0)
    os.closerange(3, 1 << 16)
    os.execve(spec["argv"][0], spec["argv"], env)


def wait_for(child: int) -> int:
    """Wait for ``child``, reaping any orphans handed to us on the way; its wait status."""
    while True:
        try:
            pid, status = os.waitpid(-1, 0)
        except InterruptedError:
            continue
        except ChildProcessError:
            return 1 << 8
        if pid == child:
            return status


def mirror(status: int) -> None:
    """End this process the way the program ended: same exit code, or the same fatal signal."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        signal.signal(sig, signal.SIG_DFL)
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        os.kill(os.getpid(), sig)
    os._exit(os.WEXITSTATUS(status) if os.WIFEXITED(status) else 1)


def run_namespaced(spec: dict, applied: dict) -> None:
    """launcher (host PID namespace) -> init (PID 1: mounts, reaps) -> program (PID 2, unprivileged).

    The program is not PID 1 because the kernel ignores default-action signals to a namespace's
    init, RLIMIT_CPU's SIGXCPU included. When init exits, the kernel kills what is left inside.
    init cannot die of a signal it sends itself, so it passes the program's wait status up a pipe.
    """
    r, w = os.pipe()
    init = os.fork()
    if init:
        os.close(w)
        for fd in range(0, 3):
            os.close(fd)
        status = wait_for(init)
        got = os.read(r, 32)
        mirror(int(got) if got else status)
    os.close(r)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    applied.update(netns=True, mountns=True, pidns=True)
    try:
        workdir = setup_filesystem(spec, applied)
    except OSError as e:  # never run the program half-isolated
        os.write(2, f"sandbox launcher: filesystem setup failed: {e}\n".encode())
        os._exit(125)
    program = os.fork()
    if program == 0:
        os.close(w)
        become_program(spec, workdir, applied)
    for fd in range(0, 3):
        os.close(fd)
    status = wait_for(program)
    os.write(w, str(status).encode())
    os._exit(0)


def main() -> None:
    spec = read_spec()
    applied = {"netns": False, "mountns": False, "pidns": False, "uid": os.getuid()}
    if os.geteuid() != 0:
        spec["uid"] = None
    ns = False
    if os.geteuid() == 0:
        try:
            _check(libc.unshare(CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS), "unshare")
            ns = True
        except OSError:
            try:
                _check(libc.unshare(CLONE_NEWNET), "unshare")
                applied["netns"] = True
            except OSError:
                pass
    if not ns:
        if spec["uid"] is not None and blocked_ancestor(os.path.realpath(spec["argv"][0])):
            spec["uid"] = None  # the unprivileged uid could not even start the interpreter
        become_program(spec, spec["host_workdir"], applied)
        return
    run_namespaced(spec, applied)

if __name__ == "__main__":
    main()
