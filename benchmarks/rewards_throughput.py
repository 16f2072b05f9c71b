"""Reward throughput: 1,000 code completions through the sandbox and 10,000 math answers.

Code: HumanEval problems in turn, alternating the canonical solution and a ``return None`` body,
each program made unique, scored by the ``code`` reward (one sandbox run each, a pool of one run
per core). Math: answers
in several forms (integers, fractions, LaTeX), half right, scored by ``math`` (math-verify in
sandboxed workers with a deadline) and by ``exact``. Prints completions per second.

    flock /tmp/thinkrl-cpu.lock python benchmarks/rewards_throughput.py [--code 1000] [--math 10000]
"""

from __future__ import annotations

import argparse
import random
import time

from thinkrl.config import TaskConfig
from thinkrl.rewards import RewardModel
from thinkrl.tasks import Example, build_task


def code_batch(n: int):
    task = build_task(TaskConfig(name="humaneval", params={}))
    problems = task.train + task.eval
    texts, exs, expected = [], [], []
    for i in range(n):
        ex = problems[(i // 2) % len(problems)]
        good = i % 2 == 0
        body = ex.answer if good else ex.meta["prompt"] + "    return None\n"
        # the comment makes every program unique, so the code reward's verdict cache never hits
        texts.append(f"<think>...</think>\n```python\n# sample {i}\n{body}```")
        exs.append(ex)
        expected.append(1.0 if good else 0.0)
    return texts, exs, expected


def math_batch(n: int, seed: int = 0):
    rng = random.Random(seed)
    texts, exs, expected = [], [], []
    for i in range(n):
        a, b = rng.randint(1, 999), rng.randint(2, 99)
        form = i % 4
        if form == 0:
            gold, pred = str(a * b), str(a * b)
        elif form == 1:
            gold, pred = f"\\frac{{{a}}}{{{b}}}", f"{a}/{b}"
        elif form == 2:
            gold, pred = str(a), f"\\boxed{{{a}}}"
        else:
            gold, pred = f"{a}.5", f"{a}.25"
        right = form != 3 and i % 8 < 4
        if not right and form != 3:
            pred = str(a + 1)
        texts.append(f"<think>work</think> <answer>{pred}</answer>")
        exs.append(Example(question="q", answer=gold))
        expected.append(1.0 if right else 0.0)
    return texts, exs, expected


def timed(rm: RewardModel, texts, exs):
    t0 = time.perf_counter()
    totals, _ = rm.score(texts, exs)
    return totals, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--code", type=int, default=1000)
    ap.add_argument("--math", type=int, default=10000)
    args = ap.parse_args()

    texts, exs, expected = code_batch(args.code)
    totals, dt = timed(RewardModel({"code": 1.0}), texts, exs)
    wrong = sum(t != e for t, e in zip(totals, expected))
    print(
        f"code   : {len(texts)} completions in {dt:.1f} s = {len(texts) / dt:.1f} completions/s "
        f"({wrong} verdicts differ from expected)"
    )

    texts, exs, expected = math_batch(args.math)
    rm = RewardModel({"math": 1.0})
    rm.score(texts[:4], exs[:4])  # start the workers (importing sympy takes seconds) outside the timing
    totals, dt = timed(rm, texts, exs)
    wrong = sum(t != e for t, e in zip(totals, expected))
    print(
        f"math   : {len(texts)} answers in {dt:.1f} s = {len(texts) / dt:.0f} answers/s "
        f"({wrong} verdicts differ from expected; failures {dict(rm.failures)})"
    )
    totals, dt = timed(RewardModel({"exact": 1.0}), texts, exs)
    print(f"exact  : {len(texts)} answers in {dt:.2f} s = {len(texts) / dt:.0f} answers/s")


if __name__ == "__main__":
    main()
