"""Test harness that runs *inside* the sandbox (standard library only).

    python -I runner.py io                 run solution.py as __main__ (stdin/stdout tasks)
    python -I runner.py check ENTRY_POINT  run the asserting statements of ``check(candidate)``
                                           in tests.py against solution.py, and report
    python -I -S runner.py serve R W       (started by ``check``) the solution's side, on pipes R, W

``check`` keeps the program away from its own verdict. The harness reads the nonce, the tests
and the task's prompt, deletes them from the work folder, makes itself undumpable (so that
nothing of the same uid can read its memory or its file descriptors through ``/proc``) and only
then starts the solution in a separate, freshly executed interpreter (``serve``). ``candidate``
in the tests is a proxy: its arguments go to the solution pickled; its return value comes back
as plain data (numbers, strings, bytes, lists, tuples, dicts, sets, None) that the harness
rebuilds itself. So the tests never touch an object the program made: a return value whose
``__eq__`` always says True, a patched ``AssertionError`` or builtins, a frame walk to the
nonce, a fake verdict on stdout (the solution's stdout is the harness's stderr) all come to
nothing. The last line on the harness's stdout is ``<nonce> <passed> <total>``.
"""

import ast
import builtins
import json
import os
import pickle
import struct
import subprocess
import sys

MAX_FRAME = 64 << 20  # a reply larger than this fails the test that asked for it
MAX_DEPTH = 200


def refuse_network() -> None:
    """Python-level fallback used only where no network namespace could be made."""
    import socket

    def refused(*args, **kwargs):
        raise PermissionError("network access is disabled in the sandbox")

    socket.socket = refused
    socket.SocketType = refused
    socket.create_connection = refused
    socket.socketpair = refused
    import _socket

    _socket.socket = refused
    _socket.SocketType = refused


# ---------------------------------------------------------------------------
# Plain data across the process boundary


def encode(value, depth: int = 0):
    """JSON-ready form of ``value``; only exact builtin types (no subclasses) are accepted."""
    if depth > MAX_DEPTH:
        raise TypeError("value nested too deeply")
    t = type(value)
    if value is None or t is bool or t is str:
        return value
    if t is int:
        return {"i": str(value)}
    if t is float:
        return {"f": repr(value)}
    if t is complex:
        return {"c": [repr(value.real), repr(value.imag)]}
    if t is bytes:
        return {"b": value.hex()}
    if t is list:
        return [encode(v, depth + 1) for v in value]
    if t is tuple:
        return {"t": [encode(v, depth + 1) for v in value]}
    if t is dict:
        return {"d": [[encode(k, depth + 1), encode(v, depth + 1)] for k, v in value.items()]}
    if t is set or t is frozenset:
        return {"s" if t is set else "fs": [encode(v, depth + 1) for v in value]}
    raise TypeError(f"the solution returned a {t.__name__}, which the harness does not accept")


def decode(form):
    """The harness's own objects for ``form`` (the inverse of :func:`encode`); anything else is
    a ValueError."""
    if form is None or type(form) in (bool, str):
        return form
    if type(form) is list:
        return [decode(v) for v in form]
    if type(form) is dict and len(form) == 1:
        ((tag, v),) = form.items()
        if tag == "i":
            return int(v)
        if tag == "f":
            return float(v)
        if tag == "c":
            return complex(float(v[0]), float(v[1]))
        if tag == "b":
            return bytes.fromhex(v)
        if tag == "t":
            return tuple(decode(x) for x in v)
        if tag == "d":
            return {decode(k): decode(x) for k, x in v}
        if tag == "s":
            return {decode(x) for x in v}
        if tag == "fs":
            return frozenset(decode(x) for x in v)
    raise ValueError("malformed reply from the solution")


def send(f, payload: bytes) -> None:
    f.write(struct.pack(">I", len(payload)) + payload)
    f.flush()


def recv(f) -> bytes | None:
    head = f.read(4)
    if len(head) < 4:
        return None
    (n,) = struct.unpack(">I", head)
    if n > MAX_FRAME:
        raise ValueError("reply too large")
    body = f.read(n)
    return body if len(body) == n else None


# ---------------------------------------------------------------------------
# The solution's side


def serve(req_fd: int, rep_fd: int) -> None:
    """exec solution.py, then answer calls: ``(name, args, kwargs)`` in, a reply out."""
    requests, replies = os.fdopen(req_fd, "rb"), os.fdopen(rep_fd, "wb")
    with open("solution.py") as f:
        src = f.read()
    ns = {"__name__": "__solution__"}
    try:
        exec(compile(src, "solution.py", "exec"), ns)
    except BaseException as e:  # noqa: BLE001 (SystemExit, KeyboardInterrupt: the solution failed)
        send(replies, json.dumps(["failed", f"{type(e).__name__}: {e}"[:500]]).encode())
        return
    names = [n for n, v in list(ns.items()) if callable(v) and not n.startswith("__")]
    send(replies, json.dumps(["ready", names]).encode())
    while (frame := recv(requests)) is not None:
        name, args, kwargs = pickle.loads(frame)
        try:
            reply = ["ok", encode(ns[name](*args, **kwargs))]
        except BaseException as e:  # noqa: BLE001
            reply = ["raise", type(e).__name__, str(e)[:500]]
        try:
            out = json.dumps(reply).encode()
        except (TypeError, ValueError, RecursionError) as e:
            out = json.dumps(["raise", "TypeError", str(e)[:500]]).encode()
        send(replies, out)


class Solution:
    """The harness's handle on the ``serve`` process."""

    def __init__(self):
        req_r, self.req_w = os.pipe()
        self.rep_r, rep_w = os.pipe()
        self.proc = subprocess.Popen(
            [sys.executable, "-I", "-S", "-B", "runner.py", "serve", str(req_r), str(rep_w)],
            stdin=subprocess.DEVNULL,
            stdout=2,
            stderr=2,
            pass_fds=(req_r, rep_w),
            close_fds=True,
        )
        os.close(req_r)
        os.close(rep_w)
        self.requests, self.replies = os.fdopen(self.req_w, "wb"), os.fdopen(self.rep_r, "rb")
        first = self._reply()
        if first[0] != "ready":
            raise RuntimeError(f"the solution failed: {first[1] if len(first) > 1 else '?'}")
        self.names = [n for n in first[1] if type(n) is str]

    def _reply(self) -> list:
        frame = recv(self.replies)
        if frame is None:
            raise RuntimeError("the solution exited")
        reply = json.loads(frame)
        if type(reply) is not list or not reply or type(reply[0]) is not str:
            raise ValueError("malformed reply from the solution")
        return reply

    def call(self, name: str, args: tuple, kwargs: dict):
        try:
            send(self.requests, pickle.dumps((name, args, kwargs)))
        except (BrokenPipeError, OSError):
            raise RuntimeError("the solution exited") from None
        reply = self._reply()
        if reply[0] == "ok" and len(reply) == 2:
            return decode(reply[1])
        if reply[0] == "raise" and len(reply) == 3:
            exc = getattr(builtins, str(reply[1]), None)
            if isinstance(exc, type) and issubclass(exc, Exception):
                raise exc(str(reply[2]))
            raise RuntimeError(f"{reply[1]}: {reply[2]}")
        raise ValueError("malformed reply from the solution")

    def proxy(self, name: str):
        def call(*args, **kwargs):
            return self.call(name, args, kwargs)

        call.__name__ = name
        return call

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


# ---------------------------------------------------------------------------
# The harness's side


def test_units(tests_src: str) -> tuple[list, list]:
    """Split tests.py into setup statements and the statements of ``check``'s body that assert."""
    tree = ast.parse(tests_src)
    setup, check_body = [], None
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == "check":
            check_body = node.body
        else:
            setup.append(node)
    if check_body is None:
        raise SystemExit("tests.py defines no check(candidate)")
    units = []
    pre = []  # non-assert statements in check run before the next unit (setup such as helper defs)
    for stmt in check_body:
        if any(isinstance(n, ast.Assert) for n in ast.walk(stmt)):
            units.append(pre + [stmt])
            pre = []
        else:
            pre.append(stmt)
    if pre and units:
        units[-1] += pre
    return setup, units


def take(name: str) -> str:
    """Read a file of the harness's and delete it before the solution starts."""
    try:
        with open(name) as f:
            text = f.read()
    except FileNotFoundError:
        return ""
    os.remove(name)
    return text


def run_check(entry: str) -> None:
    import ctypes

    nonce, tests_src, prompt_src = take(".nonce").strip(), take("tests.py"), take("prompt.py")
    ctypes.CDLL(None).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE 0: /proc/<harness> is closed to the solution
    setup, units = test_units(tests_src)
    passed, solution = 0, None
    try:
        solution = Solution()
        g = {"__name__": "__tests__"}
        if prompt_src:  # the task's helpers (HumanEval's encode_cyclic, poly, ...): trusted text
            try:
                exec(compile(prompt_src, "prompt.py", "exec"), g)
            except Exception:  # noqa: BLE001 (a prompt that is only a stub is fine)
                pass
        for name in solution.names:  # the prompt's helpers win: a solution may not redefine what judges it
            g.setdefault(name, solution.proxy(name))
        g["candidate"] = g[entry] = solution.proxy(entry)  # the entry point is the solution's, even by name
        exec(compile(ast.Module(body=setup, type_ignores=[]), "tests.py", "exec"), g)
        for unit in units:
            try:
                exec(compile(ast.Module(body=unit, type_ignores=[]), "tests.py", "exec"), g)
                passed += 1
            except Exception:  # noqa: BLE001
                pass
    except BaseException as e:  # noqa: BLE001 (the solution failed to start, or the setup did)
        print(f"solution failed: {type(e).__name__}: {e}"[:500], file=sys.stderr)
    finally:
        if solution is not None:
            solution.close()
    sys.stdout.flush()
    os.write(1, f"\n{nonce} {passed} {len(units)}\n".encode())
    os._exit(0)


def main() -> None:
    if os.environ.get("THINKRL_NO_NET") == "1":
        refuse_network()
    mode, args = sys.argv[1], sys.argv[2:]
    sys.argv = sys.argv[:1]
    if mode == "check":
        run_check(args[0])
    elif mode == "serve":
        serve(int(args[0]), int(args[1]))
    elif mode == "io":
        with open("solution.py") as f:
            src = f.read()
        exec(compile(src, "solution.py", "exec"), {"__name__": "__main__"})
    else:
        raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    main()
