"""Sandbox load: sandboxed code rewards per second at 1 and 2 workers, and 200 at once.

The workload is HumanEval through the ``code`` reward, as in ``rewards_throughput.py``: the
canonical solution and a ``return None`` body in turn, each program made unique so that no
verdict comes from the cache. Each submission's expected verdict is known, so the benchmark
counts verdicts that are wrong or missing, as well as measuring speed.

1. ``--n`` submissions through a pool of 1 worker, then through a pool of 2 (one per core here).
2. ``--burst`` submissions (200) all at once, one thread each: the launcher's uid slots and the
   CPU are oversubscribed. Every submission must still get its verdict.
3. What the harness costs: the same programs in ``io`` mode (one interpreter, no tests) next to
   HumanEval mode (harness and solution in two interpreters).

    python benchmarks/sandbox_load.py [--n 200] [--burst 200]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from rewards_throughput import code_batch  # noqa: E402

from thinkrl import device  # noqa: E402
from thinkrl.rewards import REWARDS  # noqa: E402
from thinkrl.sandbox import capabilities, run_python  # noqa: E402


def score_all(texts, exs, workers: int) -> tuple[list, float]:
    code = REWARDS.get("code")

    def one(i):
        try:
            return code(texts[i], exs[i])
        except Exception as e:  # noqa: BLE001 (counted as a lost verdict)
            return e

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=workers) as ex:
        out = list(ex.map(one, range(len(texts))))
    return out, time.perf_counter() - t0


def report(label: str, out: list, expected: list, seconds: float) -> float:
    lost = sum(1 for v in out if not isinstance(v, float))
    wrong = sum(1 for v, e in zip(out, expected) if isinstance(v, float) and v != e)
    rate = len(out) / seconds
    print(
        f"{label:<38} {len(out)} submissions in {seconds:6.1f} s = {rate:5.1f}/s; "
        f"{wrong} wrong verdicts, {lost} without a verdict"
    )
    return rate


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--burst", type=int, default=200)
    args = ap.parse_args()
    caps = capabilities()
    print(
        f"CPU: {device.plan().cpu} ({torch.backends.cpu.get_cpu_capability()}), "
        f"{os.cpu_count()} cores; sandbox method {caps.get('method')}, uid {caps.get('uid')}, "
        f"seccomp rules {caps.get('seccomp_rules')}, running as uid {os.getuid()}"
    )
    texts, exs, expected = code_batch(args.n + args.burst + 2 * args.n)
    rates = {}
    for k, workers in enumerate((1, 2)):
        sl = slice(k * args.n, (k + 1) * args.n)
        out, s = score_all(texts[sl], exs[sl], workers)
        rates[workers] = report(f"pool of {workers} worker{'s' if workers > 1 else ''}", out, expected[sl], s)
    print(f"2 workers / 1 worker: {rates[2] / rates[1]:.2f}x")
    sl = slice(2 * args.n, 2 * args.n + args.burst)
    out, s = score_all(texts[sl], exs[sl], args.burst)
    report(f"{args.burst} submitted at once", out, expected[sl], s)
    # the harness's own cost: one interpreter (io mode) against two (HumanEval mode)
    progs = [t.split("```python\n", 1)[1].rsplit("```", 1)[0] for t in texts[sl][: args.n // 2]]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=2) as ex:
        res = list(ex.map(run_python, progs))
    io_rate = len(progs) / (time.perf_counter() - t0)
    bad = sum(r.status != "ok" for r in res)
    print(
        f"io mode (program only, no tests), 2 workers: {io_rate:5.1f}/s ({bad} not ok); "
        f"HumanEval mode costs {io_rate / rates[2]:.2f}x the time of a bare run"
    )


if __name__ == "__main__":
    main()
