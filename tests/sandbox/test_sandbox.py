"""The sandbox: what it enforces on this machine, and an adversarial set of programs.

Every adversarial program goes through the ``code`` reward with a HumanEval-style test that
passes only if the attack *worked* (``f`` returns the right value only when the forbidden thing
succeeded), so each item must end as a failed reward (0, or a counted failure), within its time
limit, with the host untouched.
"""

import os
import socket
import threading
import time
from pathlib import Path

import pytest

from thinkrl.rewards import RewardModel
from thinkrl.sandbox import Limits, capabilities, run_python
from thinkrl.tasks import Example

ROOT = os.geteuid() == 0
TIMEOUT = 2.0
TESTS = "def check(candidate):\n    assert candidate(2) == 4\n"


def example():
    return Example(question="double", answer="", meta={"tests": TESTS, "entry_point": "f"})


def fenced(code):
    return f"```python\n{code}\n```"


def sandbox_processes():
    """Host processes running as a sandbox uid (the launcher uses uids from 200000 up),
    other than long-lived math-verify workers."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            uid = int((d / "status").read_text().split("\nUid:")[1].split()[0])
            cmd = (d / "cmdline").read_bytes()
        except (OSError, IndexError):
            continue
        if uid >= 200_000 and b"worker.py" not in cmd:
            found.append(int(d.name))
    return found


@pytest.mark.skipif(not ROOT, reason="namespaces and the uid drop need root")
def test_capabilities_on_this_machine():
    caps = capabilities()
    assert caps["netns"] and caps["mountns"] and caps["pidns"] and caps["own_proc"]
    assert caps["uid"] >= 200_000  # an unprivileged uid, not root
    assert caps["readonly_mounts"] >= 1


def test_runs_a_program_with_stdin_in_a_fresh_folder():
    res = run_python("import os\nprint(input()[::-1]); print(os.getcwd()); print(sorted(os.listdir('.')))",
                     stdin="abc\n")
    assert res.status == "ok" and res.returncode == 0
    lines = res.stdout.splitlines()
    assert lines[0] == "cba"
    assert lines[1] == "/tmp/work" if ROOT else lines[1].startswith("/tmp/")
    assert lines[2] == "['runner.py', 'solution.py']"


@pytest.mark.parametrize("code,status", [
    ("raise ValueError('x')", "error"),
    ("import sys; sys.exit(3)", "error"),
    ("while True: pass", "timeout"),
    ("print('y' * 5_000_000)", "output_limit"),
    ("x = bytearray(3 * 2**30)", "memory"),
])
def test_status_of_abnormal_programs(code, status):
    res = run_python(code, limits=Limits(wall_s=1.5, cpu_s=1, memory_mb=512, output_bytes=1 << 20))
    assert res.status in ((status, "cpu_time") if status == "timeout" else (status,)), (res.status, res.stderr)
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


def attacks(d: Path, port: int) -> dict[str, str]:
    win = "def f(x):\n    return 2 * x\n"  # defining f like this passes the test: reached only on success
    return {
        "infinite_loop": "while True:\n    pass\n" + win,
        "fork_bomb": "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n" + win,
        "memory_bomb": "x = [bytearray(2**28) for _ in range(64)]\n" + win,
        "deep_recursion": "import sys\nsys.setrecursionlimit(10**9)\ndef r(n):\n    return r(n + 1)\nr(0)\n" + win,
        "os_system": f"import os\nok = os.system('echo pwned > {d}/pwned.txt') == 0 and "
                     f"os.path.exists('{d}/pwned.txt')\ndef f(x):\n    return 2 * x if ok else None\n",
        "subprocess": "import subprocess\nr = subprocess.run(['cat', '/etc/shadow'], capture_output=True)\n"
                      "def f(x):\n    return 2 * x if r.returncode == 0 and r.stdout else None\n",
        "socket_localhost": f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
                            "s.sendall(b'hello')\n" + win,
        "write_outside": f"open('{d}/new.txt', 'w').write('x')\n" + win,
        "overwrite_sentinel": f"open('{d}/sentinel.txt', 'w').write('gone')\n" + win,
        "delete_sentinel": f"import os\nos.remove('{d}/sentinel.txt')\n" + win,
        "write_home_of_root": "open('/root/pwned', 'w').write('x')\n" + win,
        "write_repo": f"open('{Path(__file__).resolve().parent}/pwned.py', 'w').write('x')\n" + win,
        "read_secret": f"s = open('{d}/secret.txt').read()\ndef f(x):\n    return 2 * x if 's3cr3t' in s else None\n",
        "read_shadow": "s = open('/etc/shadow').read()\n" + win,
        "huge_output": "import sys\nwhile True:\n    sys.stdout.write('A' * 65536)\n" + win,
        "sys_exit_zero": "import sys\nsys.exit(0)\n" + win.replace("2 * x", "None"),
        "os_exit_zero": "import os\nos._exit(0)\n" + win.replace("2 * x", "None"),
        "fake_verdict": "print('0 1 1')\nimport os\nos._exit(0)\n",
        "ignore_sigterm_and_setsid": "import os, signal\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                                     "os.setsid()\nwhile True:\n    pass\n" + win,
        "orphan_daemon": f"import os, time, sys\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(3)\n"
                         f"    open('{d}/late.txt', 'w').write('x')\n    os._exit(0)\nsys.exit(0)\n" + win,
        "kill_everything": "import os, signal\nfor pid in range(2, 40000):\n    try:\n"
                           "        os.kill(pid, signal.SIGKILL)\n    except OSError:\n        pass\n"
                           "def f(x):\n    return None\n",
    }


def test_adversarial_programs_fail_within_their_limit_and_leave_the_host_alone(host):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.settimeout(0.2)
    port = server.getsockname()[1]
    accepted = []

    def accept():
        end = time.monotonic() + 120
        while time.monotonic() < end and not stop.is_set():
            try:
                accepted.append(server.accept())
            except OSError:
                pass

    stop = threading.Event()
    t = threading.Thread(target=accept, daemon=True)
    t.start()
    items = attacks(host, port)
    rm = RewardModel({"code": 1.0}, {"code": {"timeout": TIMEOUT, "memory_mb": 512}})
    ex = example()
    worst = 0.0
    t0 = time.monotonic()
    try:
        for name, code in items.items():
            start = time.monotonic()
            totals, _ = rm.score([fenced(code)], [ex])
            took = time.monotonic() - start
            worst = max(worst, took)
            assert totals == [0.0], name
            assert took < TIMEOUT + 3.0, (name, took)  # the deadline, plus start-up and teardown
            assert sandbox_processes() == [], name  # nothing of the program outlives it
    finally:
        stop.set()
        t.join()
        server.close()
    time.sleep(3.5)  # the orphan daemon would have written late.txt by now
    assert accepted == []
    assert (host / "sentinel.txt").read_text() == "keep me"
    assert sorted(p.name for p in host.iterdir()) == ["secret.txt", "sentinel.txt"]
    assert not Path("/root/pwned").exists()
    assert not (Path(__file__).resolve().parent / "pwned.py").exists()
    # each failure was counted under its reason or scored a plain 0 (the test did not pass)
    counted = sum(rm.failures.values())
    assert counted >= 5 and set(k.split("/")[1] for k in rm.failures) <= {
        "timeout", "cpu_time", "memory", "output_limit", "signal"}, dict(rm.failures)
    assert time.monotonic() - t0 < len(items) * (TIMEOUT + 3.0)


def test_a_correct_program_still_passes_next_to_the_attacks():
    rm = RewardModel({"code": 1.0})
    totals, _ = rm.score([fenced("def f(x):\n    return 2 * x\n")], [example()])
    assert totals == [1.0]
