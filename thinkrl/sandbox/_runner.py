"""Test harness that runs *inside* the sandbox (standard library only).

    python -I runner.py io                 run solution.py as __main__ (stdin/stdout tasks)
    python -I runner.py check ENTRY_POINT  exec solution.py, then each test statement of
                                           ``check(candidate)`` in tests.py, and report

In ``check`` mode the last line on stdout is ``<nonce> <passed> <total>``. The nonce comes from a
file the harness reads and deletes before the solution runs, so a solution that exits early
(``sys.exit(0)``, ``os._exit(0)``) or prints a fake verdict does not pass.
"""

import ast
import os
import sys


def refuse_network() -> None:
    """Python-level fallback used only where no network namespace could be made."""
    import socket

    def refused(*args, **kwargs):
        raise PermissionError("network access is disabled in the sandbox")

    socket.socket = refused
    socket.create_connection = refused
    socket.socketpair = refused
    import _socket

    _socket.socket = refused


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


def run_check(entry: str) -> None:
    with open(".nonce") as f:
        nonce = f.read().strip()
    os.remove(".nonce")
    with open("tests.py") as f:
        setup, units = test_units(f.read())
    with open("solution.py") as f:
        src = f.read()
    passed = 0
    try:
        ns = {"__name__": "__solution__"}
        exec(compile(src, "solution.py", "exec"), ns)
        candidate = ns[entry]
        g = ns  # as in HumanEval's own harness, tests see the solution's names (e.g. helpers)
        g["candidate"] = candidate
        exec(compile(ast.Module(body=setup, type_ignores=[]), "tests.py", "exec"), g)
        for unit in units:
            try:
                exec(compile(ast.Module(body=unit, type_ignores=[]), "tests.py", "exec"), g)
                passed += 1
            except Exception:
                pass
    except BaseException as e:  # SystemExit, KeyboardInterrupt, NameError: the solution failed
        print(f"solution failed: {type(e).__name__}: {e}"[:500], file=sys.stderr)
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
    elif mode == "io":
        with open("solution.py") as f:
            src = f.read()
        exec(compile(src, "solution.py", "exec"), {"__name__": "__main__"})
    else:
        raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    main()
