"""The sandbox: what it enforces on this machine, and an adversarial set of programs.

Every adversarial program goes through the ``code`` reward with a HumanEval-style test that
passes only if the attack *worked* (``f`` returns the right value only when the forbidden thing
succeeded), so each item must end as a failed reward (0, or a counted failure), within its time
limit, with the host untouched.

The whole file runs twice in CI: as root here, and as an unprivileged user through
``test_the_suite_holds_for_an_unprivileged_user`` (uid 65534, see ``unprivileged.py``), where
``ROOT`` is False and the sandbox builds its namespaces inside a user namespace.
"""

import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import pytest

from thinkrl.rewards import RewardModel
from thinkrl.sandbox import Limits, capabilities, run_check, run_python
from thinkrl.tasks import Example

ROOT = os.geteuid() == 0
TIMEOUT = 2.0
TESTS = "def check(candidate):\n    assert candidate(2) == 4\n"
HERE = Path(__file__).resolve().parent


def example():
    return Example(question="double", answer="", meta={"tests": TESTS, "entry_point": "f"})


def fenced(code):
    return f"```python\n{code}\n```"


def _pid_ns(pid) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/pid")
    except OSError:
        return None


def sandbox_processes():
    """Live processes in a PID namespace other than ours (every sandboxed program has its own),
    other than those of long-lived math-verify workers (a namespace holding a worker.py)."""
    ours, procs = _pid_ns("self"), []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes()
            state = (d / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        ns = _pid_ns(d.name)
        if ns is not None and ns != ours and state != "Z":
            procs.append((int(d.name), ns, b"worker.py" in cmd))
    workers = {ns for _, ns, is_worker in procs if is_worker}
    return [pid for pid, ns, _ in procs if ns not in workers]


def test_capabilities_on_this_machine():
    caps = capabilities()
    assert caps["isolated"], caps
    assert caps["netns"] and caps["mountns"] and caps["pidns"] and caps["ipcns"] and caps["own_proc"]
    assert caps["readonly_mounts"] >= 1
    assert caps["capabilities"] == 0 and caps["no_new_privs"]  # measured from inside the probe
    assert caps["seccomp_mode"] == 2 and caps["seccomp_rules"] >= 40
    if ROOT:
        assert caps["method"] == "root"
        assert caps["uid"] >= 200_000  # a fresh unprivileged uid, not root
    else:
        assert caps["method"] == "userns"
        assert caps["uid"] == os.getuid() != 0


def test_runs_a_program_with_stdin_in_a_fresh_folder():
    res = run_python(
        "import os\nprint(input()[::-1]); print(os.getcwd()); print(sorted(os.listdir('.')))", stdin="abc\n"
    )
    assert res.status == "ok" and res.returncode == 0
    lines = res.stdout.splitlines()
    assert lines[0] == "cba"
    assert lines[1] == "/tmp/work"
    assert lines[2] == "['runner.py', 'solution.py']"


def test_an_isolated_run_leaves_no_folder_on_the_host():
    before = set(Path("/tmp").glob("thinkrl-sbx-*"))
    assert run_python("open('x', 'w').write('y')").status == "ok"
    assert set(Path("/tmp").glob("thinkrl-sbx-*")) == before


@pytest.mark.parametrize(
    "code,status",
    [
        ("raise ValueError('x')", "error"),
        ("import sys; sys.exit(3)", "error"),
        ("while True: pass", "timeout"),
        ("print('y' * 5_000_000)", "output_limit"),
        ("x = bytearray(3 * 2**30)", "memory"),
    ],
)
def test_status_of_abnormal_programs(code, status):
    res = run_python(code, limits=Limits(wall_s=1.5, cpu_s=1, memory_mb=512, output_bytes=1 << 20))
    assert res.status in ((status, "cpu_time") if status == "timeout" else (status,)), (
        res.status,
        res.stderr,
    )
    assert res.seconds < 4.5
    assert len(res.stdout) <= 1 << 20


def test_cpu_limit_ends_a_busy_loop_before_the_wall_clock():
    res = run_python("while True: pass", limits=Limits(wall_s=10, cpu_s=1))
    assert res.status == "cpu_time" and res.seconds < 4


# ---------------------------------------------------------------------------
# The adversarial set


@pytest.fixture
def host(tmp_path):
    """A sentinel and a secret outside the sandbox, in a folder anyone may write to, so only the
    sandbox (not file permissions) stands between them and the program."""
    d = Path("/tmp") / f"thinkrl-host-{os.getpid()}-{time.monotonic_ns()}"
    d.mkdir()
    d.chmod(0o777)
    sentinel, secret = d / "sentinel.txt", d / "secret.txt"
    sentinel.write_text("keep me")
    secret.write_text("s3cr3t-token")
    for f in (sentinel, secret):
        f.chmod(0o666)
    yield d
    for f in d.iterdir():
        f.unlink()
    d.rmdir()


def attacks(d: Path, port: int, abstract: str, host_pid: int) -> dict[str, str]:
    win = "def f(x):\n    return 2 * x\n"  # defining f like this passes the test: reached only on success
    only_if_ok = "def f(x):\n    return 2 * x if ok else None\n"
    libc = "import ctypes\nlibc = ctypes.CDLL(None)\n"
    return {
        # resource exhaustion
        "infinite_loop": "while True:\n    pass\n" + win,
        "fork_bomb": "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
        + win,
        "thread_bomb": "import threading, time\nwhile True:\n    threading.Thread(target=time.sleep, args=(60,)).start()\n"
        + win,
        "memory_bomb": "x = [bytearray(2**28) for _ in range(64)]\n" + win,
        "deep_recursion": "import sys\nsys.setrecursionlimit(10**9)\ndef r(n):\n    return r(n + 1)\nr(0)\n"
        + win,
        "fill_the_disk": "with open('big', 'wb') as fh:\n    for _ in range(10**4):\n        fh.write(b'x' * 2**20)\n"
        + win,
        "exhaust_file_descriptors": "fs = [open('/dev/null') for _ in range(10**5)]\n" + win,
        "huge_output": "import sys\nwhile True:\n    sys.stdout.write('A' * 65536)\n" + win,
        # escapes: processes, files, network, kernel
        "os_system": f"import os\nok = os.system('echo pwned > {d}/pwned.txt') == 0 and "
        f"os.path.exists('{d}/pwned.txt')\n" + only_if_ok,
        "subprocess": "import subprocess\nr = subprocess.run(['cat', '/etc/shadow'], capture_output=True)\n"
        "def f(x):\n    return 2 * x if r.returncode == 0 and r.stdout else None\n",
        "socket_localhost": f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
        "s.sendall(b'hello')\n" + win,
        "socket_type": "import socket\ns = socket.SocketType(socket.AF_INET, socket.SOCK_STREAM)\ns.settimeout(1)\n"
        f"s.connect(('127.0.0.1', {port}))\ns.sendall(b'hello')\n" + win,
        "raw_socket_syscall": libc + "import struct\nfd = libc.socket(2, 1, 0)\n"
        f"addr = struct.pack('=H', 2) + struct.pack('>H', {port}) + bytes([127, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0])\n"
        "ok = fd >= 0 and libc.connect(fd, addr, 16) == 0\n" + only_if_ok,
        "abstract_unix_socket": f"import socket\ns = socket.socket(socket.AF_UNIX)\ns.connect({abstract!r})\n"
        "s.sendall(b'hello')\n" + win,
        "write_outside": f"open('{d}/new.txt', 'w').write('x')\n" + win,
        "overwrite_sentinel": f"open('{d}/sentinel.txt', 'w').write('gone')\n" + win,
        "delete_sentinel": f"import os\nos.remove('{d}/sentinel.txt')\n" + win,
        "write_dev_shm": f"open('/dev/shm/{d.name}', 'w').write('x')\n" + win,
        "write_home_of_root": "open('/root/pwned', 'w').write('x')\n" + win,
        "write_repo": f"open('{HERE}/pwned.py', 'w').write('x')\n" + win,
        "read_secret": f"s = open('{d}/secret.txt').read()\ndef f(x):\n    return 2 * x if 's3cr3t' in s else None\n",
        "read_shadow": "s = open('/etc/shadow').read()\n" + win,
        "signal_the_trainer": f"import os, signal\nos.kill({host_pid}, signal.SIGUSR1)\n" + win,
        "kill_everything": "import os, signal\nfor pid in range(2, 40000):\n    try:\n"
        "        os.kill(pid, signal.SIGKILL)\n    except OSError:\n        pass\n"
        "def f(x):\n    return None\n",
        "ptrace_attach": libc + "ok = libc.ptrace(16, 1, 0, 0) == 0\n" + only_if_ok,
        "new_user_namespace": libc + "ok = libc.unshare(0x10000000) == 0\n" + only_if_ok,
        "mount_tmpfs": libc
        + "ok = libc.mount(b'tmpfs', b'/tmp/work', b'tmpfs', 0, None) == 0\n"
        + only_if_ok,
        "remount_root_writable": libc
        + "ok = libc.mount(None, b'/', None, 32 | 4096, None) == 0\n"
        + only_if_ok,
        "ignore_sigterm_and_setsid": "import os, signal\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "os.setsid()\nwhile True:\n    pass\n" + win,
        "orphan_daemon": f"import os, time, sys\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(3)\n"
        f"    open('{d}/late.txt', 'w').write('x')\n    os._exit(0)\nsys.exit(0)\n" + win,
        # reward hacks: games with the verdict itself
        "sys_exit_zero": "import sys\nsys.exit(0)\n" + win.replace("2 * x", "None"),
        "os_exit_zero": "import os\nos._exit(0)\n" + win.replace("2 * x", "None"),
        "fake_verdict": "print('0 1 1')\nimport os\nos._exit(0)\n",
        "equal_to_everything": "class Yes:\n    def __eq__(self, other):\n        return True\n"
        "    __hash__ = object.__hash__\ndef f(x):\n    return Yes()\n",
        "int_subclass_equal_to_everything": "class Four(int):\n    def __eq__(self, other):\n        return True\n"
        "    __hash__ = int.__hash__\ndef f(x):\n    return Four(0)\n",
        "walk_frames_to_the_nonce": "import os, sys\nfr = sys._getframe()\nwhile fr is not None:\n"
        "    n = fr.f_locals.get('nonce')\n    if n:\n"
        "        os.write(1, ('\\n%s 1 1\\n' % n).encode())\n        os._exit(0)\n"
        "    fr = fr.f_back\ndef f(x):\n    return None\n",
        "read_the_tests": "s = open('tests.py').read()\ndef f(x):\n    return 4 if 'candidate(2) == 4' in s else None\n",
        "write_the_harness_stdout": "import os\nfd = os.open('/proc/%d/fd/1' % os.getppid(), os.O_WRONLY)\n"
        "os.write(fd, b'x')\n" + win,
        "read_the_harness_memory": "import os\nopen('/proc/%d/mem' % os.getppid(), 'rb')\n" + win,
        "stop_the_harness": "import os, signal\nos.kill(os.getppid(), signal.SIGSTOP)\n" + win,
    }


def test_adversarial_programs_fail_within_their_limit_and_leave_the_host_alone(host):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.settimeout(0.2)
    port = server.getsockname()[1]
    abstract = f"\0thinkrl-test-{os.getpid()}-{time.monotonic_ns()}"
    unix = socket.socket(socket.AF_UNIX)
    unix.bind(abstract)
    unix.listen(8)
    unix.settimeout(0.2)
    accepted, signalled = [], []
    old_handler = signal.signal(signal.SIGUSR1, lambda *a: signalled.append(a))

    def accept():
        end = time.monotonic() + 300
        while time.monotonic() < end and not stop.is_set():
            for srv in (server, unix):
                try:
                    accepted.append(srv.accept())
                except OSError:
                    pass

    stop = threading.Event()
    t = threading.Thread(target=accept, daemon=True)
    t.start()
    items = attacks(host, port, abstract, os.getpid())
    rm = RewardModel({"code": 1.0}, {"code": {"timeout": TIMEOUT, "memory_mb": 512}})
    ex = example()
    t0 = time.monotonic()
    try:
        for name, code in items.items():
            start = time.monotonic()
            totals, _ = rm.score([fenced(code)], [ex])
            took = time.monotonic() - start
            assert totals == [0.0], name
            assert took < TIMEOUT + 3.0, (name, took)  # the deadline, plus start-up and teardown
            assert sandbox_processes() == [], name  # nothing of the program outlives it
    finally:
        stop.set()
        t.join()
        server.close()
        unix.close()
        signal.signal(signal.SIGUSR1, old_handler)
    time.sleep(3.5)  # the orphan daemon would have written late.txt by now
    assert accepted == [] and signalled == []
    assert (host / "sentinel.txt").read_text() == "keep me"
    assert sorted(p.name for p in host.iterdir()) == ["secret.txt", "sentinel.txt"]
    assert not Path(f"/dev/shm/{host.name}").exists()
    assert not Path("/root/pwned").exists()
    assert not (HERE / "pwned.py").exists()
    # each failure was counted under its reason or scored a plain 0 (the test did not pass)
    counted = sum(rm.failures.values())
    assert counted >= 5 and set(k.split("/")[1] for k in rm.failures) <= {
        "timeout",
        "cpu_time",
        "memory",
        "output_limit",
        "signal",
    }, dict(rm.failures)
    assert time.monotonic() - t0 < len(items) * (TIMEOUT + 3.0)


def test_a_correct_program_still_passes_next_to_the_attacks():
    rm = RewardModel({"code": 1.0})
    totals, _ = rm.score([fenced("def f(x):\n    return 2 * x\n")], [example()])
    assert totals == [1.0]


# ---------------------------------------------------------------------------
# The harness: plain data back, tests out of the program's reach


def test_every_plain_return_type_crosses_back_intact():
    tests = (
        "def check(candidate):\n"
        "    assert candidate(0) == [1, -2**70, 2.5, 'é', b'\\x00', (1, (2,)), {'k': {3}}, frozenset({4}), None, "
        "True, 1j]\n"
        "    assert type(candidate(0)[5]) is tuple and type(candidate(0)[1]) is int\n"
        "    assert candidate(1) != candidate(0)\n"
    )
    code = (
        "def f(x):\n    if x:\n        return []\n"
        "    return [1, -2**70, 2.5, 'é', b'\\x00', (1, (2,)), {'k': {3}}, frozenset({4}), None, True, 1j]\n"
    )
    passed, total, res = run_check(code, tests, "f")
    assert (passed, total) == (3, 3), res.stderr


def test_exceptions_keep_their_builtin_type_and_the_prompt_gives_its_helpers():
    prompt = 'def shift(s):\n    return \'\'.join(chr(ord(c) + 1) for c in s)\n\ndef unshift(s):\n    """inverse"""\n'
    code = "def unshift(s):\n    if not s:\n        raise ValueError('empty')\n    return ''.join(chr(ord(c) - 1) for c in s)\n"
    tests = (
        "def check(candidate):\n    assert candidate(shift('abc')) == 'abc'\n"
        "    try:\n        candidate('')\n        assert False\n    except ValueError:\n        pass\n"
        "    assert candidate('b') == 'b'\n"
    )
    passed, total, res = run_check(code, tests, "unshift", prompt=prompt)
    assert (passed, total) == (2, 3), res.stderr  # the third is wrong on purpose: unshift('b') == 'a'


def test_the_solution_cannot_see_the_tests_the_nonce_or_the_harness():
    probe = "import os\nseen = sorted(os.listdir('.'))\ndef f(x):\n    return seen\n"
    tests = "def check(candidate):\n    assert candidate(0) == ['runner.py', 'solution.py']\n"
    passed, total, res = run_check(probe, tests, "f")
    assert (passed, total) == (1, 1), res.stderr


# ---------------------------------------------------------------------------
# Where no isolation can be built: refuse, or run unconfined when asked to, never as root


def test_without_isolation_model_code_is_refused_with_one_clear_message(monkeypatch, capsys, tmp_path):
    from thinkrl import sandbox
    from thinkrl.cli import main

    monkeypatch.setenv("THINKRL_SANDBOX_METHODS", "none")  # plays a machine with no namespaces at all
    sandbox.configure(allow_unconfined=False)
    assert not capabilities()["isolated"]
    with pytest.raises(sandbox.SandboxUnavailable, match="sandbox.allow_unconfined=true"):
        run_python("print(1)")
    with pytest.raises(sandbox.SandboxUnavailable):  # not swallowed as a counted reward error
        RewardModel({"code": 1.0}).score([fenced("def f(x):\n    return x + x  # never run\n")], [example()])
    assert main(["sandbox", "check"]) == 1
    assert "NOT isolated" in capsys.readouterr().out
    # a code task refuses before any model is loaded, with one message and exit status 2
    assert main(["train", "task.name=humaneval", "model=tiny-random", f"output_dir={tmp_path}/run"]) == 2
    err = capsys.readouterr().err
    assert err.count("thinkrl: error: thinkrl will not run model-written code here") == 1
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_an_explicit_opt_out_runs_unconfined_but_never_as_root(monkeypatch):
    from thinkrl import sandbox
    from thinkrl.sandbox._launch import blocked_ancestor

    monkeypatch.setenv("THINKRL_SANDBOX_METHODS", "none")
    sandbox.configure(allow_unconfined=True)
    try:
        res = run_python("import os\nprint(os.getuid(), os.getcwd())")
    finally:
        sandbox.configure(allow_unconfined=False)
    if ROOT and blocked_ancestor(os.path.realpath(sys.executable), 200_000):
        # this checkout's Python lives where an unprivileged uid cannot go: root would be the only
        # way to run it, and that is refused even with the opt-out
        assert res.status == "sandbox_error" and "refusing to run model code as root" in res.stderr
        return
    assert res.status == "ok", res.stderr
    uid, cwd = res.stdout.split()
    assert int(uid) == (os.getuid() if not ROOT else int(uid)) and int(uid) != 0
    assert Path(cwd).name.startswith(f"thinkrl-sbx-{os.getpid()}-")
    assert not Path(cwd).exists()  # the host work folder is removed after the run


def test_work_folders_of_dead_processes_are_swept(tmp_path, monkeypatch):
    from thinkrl import sandbox

    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = tmp_path / "thinkrl-sbx-999999999-abc"  # no such pid (above pid_max)
    alive = tmp_path / f"thinkrl-sbx-{os.getppid()}-abc"
    for d in (dead, alive):
        d.mkdir()
        (d / "solution.py").write_text("x")
    assert sandbox.sweep_stale_workdirs() == 1
    assert not dead.exists() and alive.exists()


@pytest.mark.skipif(not ROOT, reason="plays root without CAP_SYS_ADMIN, which needs root")
def test_root_without_cap_sys_admin_isolates_in_a_user_namespace():
    """A common container: root, but no CAP_SYS_ADMIN. The sandbox maps root and a fresh uid into
    a user namespace; the program runs as the fresh uid, with the interpreter reachable."""
    import ctypes
    import json
    import subprocess

    def drop_sys_admin():
        ctypes.CDLL(None).prctl(24, 21, 0, 0, 0)  # PR_CAPBSET_DROP, CAP_SYS_ADMIN: gone at exec

    code = (
        "import json\nfrom thinkrl.sandbox import capabilities, run_python\n"
        "r = run_python('import os\\nprint(os.getuid())')\n"
        "print(json.dumps([capabilities(), r.status, r.stdout]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, preexec_fn=drop_sys_admin
    )
    caps, status, stdout = json.loads(out.stdout.strip().splitlines()[-1])
    assert caps["method"] == "userns" and caps["isolated"], caps
    assert any("as root" in e for e in caps["errors"])  # the root method was tried and refused
    assert caps["uid"] >= 200_000 and caps["capabilities"] == 0
    assert status == "ok" and int(stdout) >= 200_000


@pytest.mark.skipif(not ROOT, reason="this is the root run; it starts the unprivileged one")
def test_the_suite_holds_for_an_unprivileged_user():
    from unprivileged import REPO, run_as_user, userns_allowed

    if not userns_allowed():
        pytest.skip("this kernel does not let unprivileged users create user namespaces")
    out = run_as_user(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            str(Path(__file__)),
            "-k",
            "not unprivileged_user",
        ],
        env={"PYTHONDONTWRITEBYTECODE": "1", "HF_HUB_OFFLINE": "1"},
        cwd=REPO,
    )
    tail = out.stdout[-3000:]
    assert out.returncode == 0, tail
    summary = tail.strip().splitlines()[-1]
    assert "failed" not in summary and "error" not in summary, summary
    # everything ran except the tests that need root to play a machine
    assert int(summary.split(" passed")[0].split()[-1]) >= 17, summary


def test_a_solution_cannot_redefine_the_helpers_that_judge_it():
    """HumanEval-style tests call the prompt's own helpers (``decode_cyclic(encode_cyclic(s))``):
    a solution that also redefines ``encode`` as the identity must not make them trivially pass."""
    prompt = (
        'def encode(s):\n    return s[::-1] + \'x\'\n\n\ndef decode(s):\n    """the inverse of encode"""\n'
    )
    tests = "def check(candidate):\n    assert candidate(encode('abc')) == 'abc'\n"
    hack = "def encode(s):\n    return s\n\n\ndef decode(s):\n    return s\n"
    honest = "def decode(s):\n    return s[:-1][::-1]\n"
    assert run_check(hack, tests, "decode", prompt=prompt)[:2] == (0, 1)
    assert run_check(honest, tests, "decode", prompt=prompt)[:2] == (1, 1)


def test_a_queued_run_gets_its_whole_deadline(monkeypatch):
    """Runs beyond the concurrency cap wait for a turn, and the wait does not count against their
    deadline: with one run at a time, the third of three 0.5 s programs starts after about 1 s,
    which would be past a 1.5 s deadline counted from submission."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from thinkrl import sandbox

    monkeypatch.setattr(sandbox, "_running", threading.BoundedSemaphore(1))
    lim = Limits(wall_s=1.5, cpu_s=2)
    with ThreadPoolExecutor(3) as ex:
        res = list(
            ex.map(lambda i: run_python(f"import time\ntime.sleep(0.5)\nprint({i})", limits=lim), range(3))
        )
    assert [r.status for r in res] == ["ok"] * 3
    assert [r.stdout.strip() for r in res] == ["0", "1", "2"]
