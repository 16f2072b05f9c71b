"""Code rewards: run the completion's program in the sandbox against the example's tests.

Two kinds of tests, read from ``example.meta``:

- ``tests`` + ``entry_point``: HumanEval-style assertion tests, a ``check(candidate)`` function.
  Each statement of ``check`` that asserts is one test (see ``thinkrl/sandbox/_runner.py``).
  If the code does not define ``entry_point`` itself, ``meta["prompt"]`` (the signature and
  docstring) is put in front of it, so a bare function body also works.
- ``io_cases``: ``[{"input": str, "output": str}, ...]``, a program reading stdin; each case
  passes when the whitespace-separated tokens of stdout equal those of ``output``.

``mode="pass"`` gives 1.0 only when every test passes (HumanEval's pass@1), ``mode="fraction"``
the share of tests passed. A program that times out, runs out of memory, floods its output or
is killed raises :class:`RewardFailure` with that reason: it scores 0 and is counted.
"""

from __future__ import annotations

import re
import textwrap
from functools import lru_cache

from thinkrl.rewards.base import _ANSWER, REWARDS, RewardFailure, extract_answer, parallel
from thinkrl.sandbox import Limits, run_check, run_python

_FENCE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)
ABNORMAL = ("timeout", "cpu_time", "memory", "output_limit", "signal", "sandbox_error")


def extract_code(completion: str) -> str | None:
    """The last fenced code block; else the ``<answer>`` content (fences removed); else None."""
    blocks = _FENCE.findall(completion)
    if blocks:
        return blocks[-1]
    if extract_answer(completion):
        raw = _ANSWER.findall(completion)[-1]  # unstripped: a function body keeps its indentation
        return raw.strip("\n").rstrip()
    return None


def program_for(code: str, example) -> str:
    entry = example.meta.get("entry_point")
    if entry and not re.search(rf"^\s*def\s+{re.escape(entry)}\s*\(", code, re.MULTILINE):
        if not code[:1].isspace():  # a body written flush left goes under the signature
            code = textwrap.indent(code, "    ")
        return example.meta.get("prompt", "") + code
    return code


def runs_code(weights: dict, examples: list) -> bool:
    """Whether scoring ``examples`` with these reward weights runs model-written programs."""
    return bool(weights.get("code")) or any("tests" in e.meta or "io_cases" in e.meta for e in examples)


def tokens_equal(out: str, expected: str) -> bool:
    return out.split() == expected.split()


def run_tests(code: str, example, limits: Limits) -> tuple[int, int]:
    """``(passed, total)`` for ``code`` on the example's tests; RewardFailure on an abnormal end."""
    meta = example.meta
    if "tests" in meta:
        key = (
            "check",
            program_for(code, example),
            meta["tests"],
            meta["entry_point"],
            meta.get("prompt", ""),
        )
    else:
        key = ("io", code, tuple((c["input"], c["output"]) for c in meta["io_cases"]))
    status, passed, total = _run_cached(key, limits)
    if status in ABNORMAL:
        raise RewardFailure(status)
    return passed, total


@lru_cache(maxsize=4096)
def _run_cached(key: tuple, limits: Limits) -> tuple[str, int, int]:
    """Deterministic programs give the same verdict twice: ``accuracy`` on a code task and ``code``
    share one run."""
    if key[0] == "check":
        _, program, tests, entry, prompt = key
        passed, total, res = run_check(program, tests, entry, limits, prompt=prompt)
        # total == 0: no verdict, the harness never got to report (e.g. os._exit in the solution)
        return res.status, passed, total if total else 1
    passed = 0
    for stdin, expected in key[2]:
        res = run_python(key[1], stdin=stdin, limits=limits)
        if res.status in ABNORMAL:
            return res.status, 0, len(key[2])
        passed += res.status == "ok" and tokens_equal(res.stdout, expected)
    return "ok", passed, len(key[2])


@REWARDS.register("code")
@parallel
def code(
    completion: str, example, *, mode: str = "pass", timeout: float = 10.0, memory_mb: int = 1024
) -> float | None:
    """Run the completion's code against the example's tests in the sandbox (see module docstring)."""
    if mode not in ("pass", "fraction"):
        raise ValueError(f"code reward: mode must be 'pass' or 'fraction', got {mode!r}")
    if "tests" not in example.meta and "io_cases" not in example.meta:
        return None  # not a code task
    prog = extract_code(completion)
    if not prog or not prog.strip():
        return 0.0
    limits = Limits(wall_s=timeout, cpu_s=max(1, int(timeout)), memory_mb=memory_mb)
    passed, total = run_tests(prog, example, limits)
    if mode == "fraction":
        return passed / total if total else 0.0
    return 1.0 if total and passed == total else 0.0
