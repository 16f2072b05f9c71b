"""Sandbox launcher: builds the isolation, then execs the program inside it.

Executed as ``python -I -S _launch.py`` by ``thinkrl.sandbox`` (standard library only, nothing
from thinkrl is imported). It reads a length-prefixed JSON spec from stdin; whatever follows on
stdin is the program's own input. Each step is recorded in ``applied``, which the probe reports
from inside the finished sandbox (``thinkrl sandbox check``).

Isolation comes from one of two methods, tried in this order (``spec["methods"]`` narrows them):

``root``   the launcher is root with CAP_SYS_ADMIN: new mount, network, PID, IPC and UTS
           namespaces in the host's user namespace; the program runs under a fresh
           unprivileged uid (one per concurrent run, so RLIMIT_NPROC is per run).
``userns`` anyone else, where the kernel allows unprivileged user namespaces: the same five
           namespaces inside a new user namespace that maps only the caller's own uid. Root
           without CAP_SYS_ADMIN (a common container) first drops to the fresh unprivileged uid,
           so that the user namespace belongs to it and model code never runs as root.

Both then go the same way:

1. the launcher forks an init, PID 1 of the new PID namespace, which forks the program. When
   init exits the kernel kills everything left inside (fork bombs, ``setsid`` escapees); the
   launcher mirrors the program's exit status or fatal signal.
2. inside: every mount is remounted read-only and nosuid; a fresh, size-capped tmpfs goes on
   ``/tmp`` (the work folder is ``/tmp/work``); interpreter folders behind a folder the program
   may not enter (a Python under ``/root`` or a 0700 home) are bound back read-only, the rest of
   that folder hidden under an empty tmpfs; a fresh ``/proc`` shows only the sandbox's own
   processes (where the kernel refuses one, an empty tmpfs hides the host's).
3. rlimits (CPU, address space, file size, process count, open files, no core dumps), the
   unprivileged uid (``root``), ``PR_SET_PDEATHSIG``, no new privileges, a seccomp filter
   (libseccomp) that denies what a test program never needs (ptrace, mount, namespaces, keyrings,
   bpf, perf events, kernel modules, ...), all other file descriptors closed, ``execve``. The
   program's uid is not 0 in its user namespace, so ``execve`` leaves it no capabilities.

Where neither method works the launcher refuses (exit 125, ``sandbox launcher: no isolation``)
unless the spec says ``allow_unconfined``: then the program runs on the host in a temporary
folder, with rlimits, its own session, the seccomp filter and a Python-level network refusal,
and still never as root.
"""

import ctypes
import json
import os
import resource
import signal

CLONE_NEWNS, CLONE_NEWCGROUP, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x02000000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
NAMESPACES = CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_REC = 32, 1024, 2048, 4096, 16384
MS_PRIVATE, MS_RELATIME, MS_STRICTATIME = 1 << 18, 1 << 21, 1 << 24
# flags a user namespace may not change on a mount it inherited: a remount must repeat them
_KEPT = {
    "nosuid": MS_NOSUID,
    "nodev": MS_NODEV,
    "noexec": MS_NOEXEC,
    "noatime": MS_NOATIME,
    "nodiratime": MS_NODIRATIME,
    "relatime": MS_RELATIME,
    "strictatime": MS_STRICTATIME,
}
MNT_DETACH, PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_NO_NEW_PRIVS = 2, 1, 4, 38
NO_ISOLATION = 125  # exit status of every launcher failure; stderr starts with "sandbox launcher:"

libc = ctypes.CDLL(None, use_errno=True)


def _check(ret: int, what: str) -> None:
    if ret != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")


def fail(message: str) -> None:
    os.write(2, f"sandbox launcher: {message}\n".encode())
    os._exit(NO_ISOLATION)


def mount(src, target, fstype, flags, data=None) -> None:
    enc = lambda s: s.encode() if s is not None else None  # noqa: E731
    _check(
        libc.mount(enc(src), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)), f"mount {target}"
    )


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


# ---------------------------------------------------------------------------
# Seccomp, through libseccomp (syscall names resolve per architecture)

DENIED = (
    "ptrace",
    "process_vm_readv",
    "process_vm_writev",
    "kcmp",
    "pidfd_getfd",
    "mount",
    "umount2",
    "pivot_root",
    "chroot",
    "move_mount",
    "open_tree",
    "fsopen",
    "fsconfig",
    "fsmount",
    "fspick",
    "mount_setattr",
    "unshare",
    "setns",
    "name_to_handle_at",
    "open_by_handle_at",
    "keyctl",
    "add_key",
    "request_key",
    "bpf",
    "perf_event_open",
    "userfaultfd",
    "fanotify_init",
    "io_uring_setup",
    "io_uring_enter",
    "io_uring_register",
    "kexec_load",
    "kexec_file_load",
    "init_module",
    "finit_module",
    "delete_module",
    "iopl",
    "ioperm",
    "swapon",
    "swapoff",
    "reboot",
    "syslog",
    "acct",
    "quotactl",
    "lookup_dcookie",
    "settimeofday",
    "clock_settime",
    "clock_adjtime",
    "adjtimex",
    "vhangup",
    "uselib",
    "nfsservctl",
)
SCMP_ACT_ALLOW, SCMP_CMP_MASKED_EQ = 0x7FFF0000, 7


def scmp_errno(e: int) -> int:
    return 0x00050000 | (e & 0xFFFF)


class ArgCmp(ctypes.Structure):
    _fields_ = [
        ("arg", ctypes.c_uint),
        ("op", ctypes.c_int),
        ("datum_a", ctypes.c_uint64),
        ("datum_b", ctypes.c_uint64),
    ]


def load_libseccomp():
    for name in ("libseccomp.so.2", "libseccomp.so"):
        try:
            lib = ctypes.CDLL(name, use_errno=True)
        except OSError:
            continue
        lib.seccomp_init.restype = ctypes.c_void_p
        lib.seccomp_init.argtypes = [ctypes.c_uint32]
        lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
        lib.seccomp_rule_add_array.argtypes = [
            ctypes.c_void_p,
            ctypes.c_uint32,
            ctypes.c_int,
            ctypes.c_uint,
            ctypes.POINTER(ArgCmp),
        ]
        lib.seccomp_load.argtypes = [ctypes.c_void_p]
        lib.seccomp_release.argtypes = [ctypes.c_void_p]
        return lib
    return None


def install_seccomp(lib) -> int:
    """Deny ``DENIED``, ``clone`` with any namespace flag, and ``clone3`` (whose flags a filter
    cannot read; glibc falls back to ``clone`` on ENOSYS). Returns the number of rules loaded."""
    ctx = lib.seccomp_init(SCMP_ACT_ALLOW)
    if not ctx:
        raise OSError("seccomp_init failed")
    rules = 0
    try:

        def add(name, action, cmp=None):
            nonlocal rules
            nr = lib.seccomp_syscall_resolve_name(name.encode())
            if nr < 0:  # not a syscall on this architecture
                return
            arr = (ArgCmp * 1)(cmp) if cmp is not None else None
            if lib.seccomp_rule_add_array(ctx, action, nr, 1 if cmp is not None else 0, arr) == 0:
                rules += 1

        eperm = scmp_errno(1)
        for name in DENIED:
            add(name, eperm)
        for flag in (
            CLONE_NEWNS,
            CLONE_NEWCGROUP,
            CLONE_NEWUTS,
            CLONE_NEWIPC,
            CLONE_NEWUSER,
            CLONE_NEWPID,
            CLONE_NEWNET,
        ):
            add("clone", eperm, ArgCmp(0, SCMP_CMP_MASKED_EQ, flag, flag))
        add("clone3", scmp_errno(38))  # ENOSYS
        if lib.seccomp_load(ctx) != 0:
            raise OSError("seccomp_load failed")
    finally:
        lib.seccomp_release(ctx)
    return rules


# ---------------------------------------------------------------------------
# The file system


def mountpoints() -> list[tuple[str, int, bool]]:
    """``(path, flags to keep, writable)`` for every mount we can see."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            path = fields[4].replace("\\040", " ").replace("\\011", "\t").replace("\\134", "\\")
            opts = fields[5].split(",")
            flags = 0
            for opt in opts:
                flags |= _KEPT.get(opt, 0)
            out.append((path, flags, "rw" in opts))
    return out


def blocked_ancestor(path: str, uid: int) -> str | None:
    """The highest ancestor of ``path`` that ``uid`` cannot traverse (approximated by the mode
    bits: owner's x for its owner, others' x for everyone else)."""
    parts = path.strip("/").split("/")
    for i in range(1, len(parts)):
        anc = "/" + "/".join(parts[:i])
        st = os.stat(anc)
        bit = 0o100 if st.st_uid == uid else 0o001
        if not st.st_mode & bit:
            return anc
    return None


def open_exposed(spec: dict) -> dict:
    """``path -> O_PATH fd`` for the interpreter's folders, so that they can be bound back into
    the sandbox even where the program's uid cannot reach them (a Python under /root)."""
    fds = {}
    for path in spec.get("expose", []):
        try:
            fds[path] = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            pass
    return fds


def expose(exposed: dict, uid: int, staging: str, fresh_tmp: bool = True) -> list[str]:
    """Bind each folder of ``exposed`` (``path -> O_PATH fd``) back, read-only, where ``uid``
    could not reach it: under the fresh /tmp, or behind an ancestor ``uid`` may not enter (that
    ancestor becomes an empty tmpfs, so nothing else in it shows). ``staging`` is a writable
    folder for the intermediate binds; ``fresh_tmp``: a new tmpfs now covers /tmp. Returns the
    folders bound."""
    staged, covers = [], set()
    for i, (path, fd) in enumerate(sorted(exposed.items())):
        anc = "/tmp" if fresh_tmp and path.startswith("/tmp/") else blocked_ancestor(path, uid)
        if anc is None:
            continue
        stage = f"{staging}/.stage{i}"
        os.mkdir(stage)
        mount(f"/proc/self/fd/{fd}", stage, None, MS_BIND | MS_REC)
        staged.append((stage, path))
        if anc != "/tmp":
            covers.add(anc)
    for anc in sorted(covers, key=len):
        mount("tmpfs", anc, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=755")
    for stage, path in staged:
        os.makedirs(path, mode=0o755, exist_ok=True)
        mount(stage, path, None, MS_BIND | MS_REC)
        mount(None, path, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID)
        libc.umount2(stage.encode(), MNT_DETACH)
        os.rmdir(stage)
    return [p for _, p in staged]


def setup_filesystem(spec: dict, applied: dict, exposed: dict, program_uid: int) -> str:
    mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing below propagates back to the host
    ro = 0
    for path, flags, writable in mountpoints():
        try:
            mount(None, path, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | flags)
            ro += 1
        except OSError as e:
            if writable:  # a host mount the program could write: never run half-isolated
                raise OSError(e.errno, f"cannot make {path} read-only: {e.strerror}") from None
    applied["readonly_mounts"] = ro
    mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, f"size={spec['tmpfs_mb']}m,mode=1777")
    # Interpreter folders that live under /tmp (a virtualenv in a checkout under /tmp) vanished
    # under the fresh tmpfs, and folders behind a 0700 ancestor cannot be entered: bind both back.
    applied["exposed"] = expose(exposed, program_uid, "/tmp")
    try:
        mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
        applied["own_proc"] = True
    except OSError:  # a container that masks parts of /proc: hide the host's instead
        mount("tmpfs", "/proc", "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=1k,mode=555")
        applied["own_proc"] = False
    return "/tmp/work"


def prepare_workdir(workdir: str, spec: dict, chown_to: int | None) -> None:
    os.makedirs(workdir, exist_ok=True)
    for name, text in spec["files"].items():
        path = os.path.join(workdir, name)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        if chown_to is not None:
            os.chown(path, chown_to, chown_to)
    if chown_to is not None:
        os.chown(workdir, chown_to, chown_to)
    os.chmod(workdir, 0o700)
    os.chdir(workdir)


# ---------------------------------------------------------------------------
# The program


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


def drop_to(uid: int) -> None:
    """Root -> the unprivileged ``uid`` for good (real, effective and saved ids, no groups)."""
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)
    libc.prctl(PR_SET_DUMPABLE, 1)  # a uid change makes us undumpable: /proc/self would turn root's


PROBE = r"""
import json, os
applied = json.loads(os.environ["THINKRL_APPLIED"])
status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines() if ":" in line)
applied["uid"] = os.getuid()
applied["capabilities"] = int(status["CapEff"].strip(), 16)
applied["no_new_privs"] = status.get("NoNewPrivs", "0").strip() == "1"
applied["seccomp_mode"] = int(status.get("Seccomp", "0").strip())
print(json.dumps(applied))
"""


def become_program(spec: dict, workdir: str, applied: dict, seccomp_lib) -> None:
    root = os.geteuid() == 0  # the "root" method, or an unconfined run started by root
    prepare_workdir(workdir, spec, spec["uid"] if root else None)
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": workdir,
        "TMPDIR": workdir,
        "LANG": "C.UTF-8",
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONHASHSEED": "0",
        "PYTHONIOENCODING": "utf-8",
    }
    if not applied.get("netns"):
        env["THINKRL_NO_NET"] = "1"
    env.update(spec.get("env", {}))
    apply_limits(spec["limits"])
    if root:
        drop_to(spec["uid"])
    if 0 in os.getresuid():
        fail("refusing to run model code as root")
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # cleared by a uid change: set it afterwards
    _check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
    applied["seccomp_rules"] = 0
    if seccomp_lib is not None:
        try:
            applied["seccomp_rules"] = install_seccomp(seccomp_lib)
        except OSError as e:
            applied["seccomp_error"] = str(e)
    argv = spec["argv"]
    if not os.access(argv[0], os.X_OK):
        fail(
            f"uid {os.getuid()} cannot run the interpreter {argv[0]} (it lives under a folder that uid may "
            "not enter); install thinkrl's environment where other users can read it"
        )
    if spec.get("probe"):
        env["THINKRL_APPLIED"] = json.dumps(applied)
        argv = [argv[0], "-I", "-S", "-c", PROBE]
    os.closerange(3, 1 << 16)
    os.execve(argv[0], argv, env)


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


def run_namespaced(spec: dict, applied: dict, exposed: dict, seccomp_lib) -> None:
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
    applied.update(netns=True, mountns=True, pidns=True, ipcns=True)
    program_uid = spec["uid"] if os.geteuid() == 0 else os.getuid()
    try:
        workdir = setup_filesystem(spec, applied, exposed, program_uid)
    except OSError as e:  # never run the program half-isolated
        fail(f"filesystem setup failed: {e}")
    for fd in exposed.values():
        os.close(fd)
    program = os.fork()
    if program == 0:
        os.close(w)
        become_program(spec, workdir, applied, seccomp_lib)
    for fd in range(0, 3):
        os.close(fd)
    status = wait_for(program)
    os.write(w, str(status).encode())
    os._exit(0)


def enter_user_namespace(spec: dict, applied: dict) -> bool:
    """Unshare a user namespace with the other namespaces; False (and why) if the kernel refuses.

    An ordinary user maps only its own uid and gid: the program runs as that uid inside, which
    is not 0, so it holds no capabilities. Root without CAP_SYS_ADMIN maps root and the
    sandbox's fresh uid. The kernel lets only a process in the parent namespace with
    CAP_SETUID write such a map, so a helper child that stays outside writes it. The launcher
    then keeps root's reach inside (a Python under /root) and the program drops to the fresh
    uid, exactly as with the ``root`` method."""
    if os.geteuid() != 0:
        uid, gid = os.getuid(), os.getgid()
        try:
            _check(libc.unshare(CLONE_NEWUSER | NAMESPACES), "unshare(user namespace)")
            for name, text in (
                ("setgroups", "deny"),
                ("uid_map", f"{uid} {uid} 1"),
                ("gid_map", f"{gid} {gid} 1"),
            ):
                with open(f"/proc/self/{name}", "w") as f:
                    f.write(text)
        except OSError as e:
            applied["errors"].append(str(e))
            return False
        return True
    uid = spec["uid"]
    go_r, go_w = os.pipe()
    done_r, done_w = os.pipe()
    helper = os.fork()
    if helper == 0:
        os.close(go_w)
        os.close(done_r)
        ok = b"0"
        if os.read(go_r, 1) == b"1":
            try:
                for name in ("uid_map", "gid_map"):
                    with open(f"/proc/{os.getppid()}/{name}", "w") as f:
                        f.write(f"0 0 1\n{uid} {uid} 1\n")
                ok = b"1"
            except OSError as e:
                os.write(2, f"sandbox launcher: writing the user namespace's map: {e}\n".encode())
        os.write(done_w, ok)
        os._exit(0)
    os.close(go_r)
    os.close(done_w)
    try:
        _check(libc.unshare(CLONE_NEWUSER | NAMESPACES), "unshare(user namespace)")
    except OSError as e:
        os.write(go_w, b"0")
        os.waitpid(helper, 0)
        applied["errors"].append(f"as root without CAP_SYS_ADMIN: {e}")
        return False
    os.write(go_w, b"1")
    mapped = os.read(done_r, 1) == b"1"
    os.waitpid(helper, 0)
    if not mapped:  # half-made: this process cannot go back, and must not run anything
        fail("could not map the user namespace's uids")
    os.setresgid(0, 0, 0)
    os.setresuid(0, 0, 0)
    return True


def run_unconfined(spec: dict, applied: dict, seccomp_lib) -> None:
    """No namespaces: refuse, unless the caller explicitly allowed an unconfined run."""
    why = "; ".join(applied["errors"]) or "no isolation method allowed"
    if not spec.get("allow_unconfined"):
        fail(f"no isolation ({why})")
    if not spec.get("host_workdir"):
        fail("no isolation and no host work folder")
    applied["method"] = "unconfined"
    if os.geteuid() == 0 and blocked_ancestor(os.path.realpath(spec["argv"][0]), spec["uid"]):
        fail(
            "no isolation, and the unprivileged uid cannot reach the interpreter; "
            "refusing to run model code as root"
        )
    become_program(spec, spec["host_workdir"], applied, seccomp_lib)


def main() -> None:
    spec = read_spec()
    methods = spec.get("methods", ["root", "userns"])
    applied = {"method": None, "netns": False, "mountns": False, "pidns": False, "ipcns": False, "errors": []}
    seccomp_lib = load_libseccomp()
    if seccomp_lib is None:
        applied["seccomp_error"] = "libseccomp.so.2 not found"
    if os.geteuid() == 0 and "root" in methods:
        try:
            _check(libc.unshare(NAMESPACES), "unshare")
            applied["method"] = "root"
        except OSError as e:
            applied["errors"].append(f"as root: {e}")
    if applied["method"] is None and "userns" in methods:
        if enter_user_namespace(spec, applied):
            applied["method"] = "userns"
    if applied["method"] is None:
        run_unconfined(spec, applied, seccomp_lib)
        return
    # handles on the interpreter's folders, opened in the new mount namespace (a bind mount
    # cannot take its source from another one) and before the program's uid takes over
    run_namespaced(spec, applied, open_exposed(spec), seccomp_lib)


if __name__ == "__main__":
    main()
