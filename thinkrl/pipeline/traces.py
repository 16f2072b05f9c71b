"""Written-out chains of thought for sums and differences: a long-CoT SFT set with a
controlled amount of redundant re-checking.

Kimi's long2short (Kimi Team 2025, section 2.4) starts from a long-CoT model that
"overthinks": it keeps verifying answers it already has. SmolLM2-135M writes no such
chains by itself (with a longer worked example in the prompt it stops solving the
sums), so the long2short recipe first teaches it one, in the spirit of R1's curated
cold-start data: for each training question a correct step-by-step solution (tens and
ones), followed by between ``min_rechecks`` and ``max_rechecks`` re-checks, each a
correct inverse computation. The re-checks carry no new information, which is what
long2short should learn to drop.

Only questions of the form ``... a + b - c =`` (reasoning-gym's ``chain_sum``, or any
task whose question ends in such an expression) can be written out; other rows are
skipped and counted, as are rows whose gold answer disagrees with the expression.
"""

from __future__ import annotations

import json
import logging
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

from thinkrl.config import TaskConfig
from thinkrl.data import write_rows
from thinkrl.tasks import DataError, answers_match, build_task
from thinkrl.trainer.common import need

log = logging.getLogger(__name__)

# An integer expression at the end of the question: "12 - 7 + 30 =" (optional trailing "?").
EXPR = re.compile(r"(-?\d+(?:\s*[-+]\s*\d+)+)\s*=?\s*\??\s*$")


@dataclass
class TracesConfig:
    output: str = "runs/traces/data.jsonl"
    prompts: int = 0  # training questions to write out (0: all of them)
    min_rechecks: int = 0  # redundant re-checks per solution, drawn uniformly from [min, max]
    max_rechecks: int = 3
    seed: int = 0
    task: TaskConfig = field(default_factory=TaskConfig)

    def validate(self) -> None:
        need(0 <= self.min_rechecks <= self.max_rechecks, "need 0 <= min_rechecks <= max_rechecks")
        need(self.prompts >= 0, "prompts must be >= 0 (0: every training question)")


def parse_terms(question: str) -> list[int] | None:
    """``"...: 36 - 38 + 5 ="`` -> ``[36, -38, 5]`` (signed terms), or None if the question
    does not end in such an expression."""
    m = EXPR.search(question.strip())
    if not m:
        return None
    tokens = re.findall(r"[-+]|\d+", m.group(1))
    terms, sign = [], 1
    for t in tokens:
        if t in "+-":
            sign = -1 if t == "-" else 1
        else:
            terms.append(sign * int(t))
            sign = 1
    return terms


def _add_step(a: int, b: int) -> str:
    """One worked step of ``a + b`` (``b`` may be negative: a subtraction), in words a small
    model can copy: tens and ones for an addition, the larger minus the smaller for a
    difference."""
    if b >= 0:
        if b < 10 or a < 0:
            return f"{a} + {b} = {a + b}."
        tens, ones = b - b % 10, b % 10
        return f"{a} + {tens} = {a + tens}, and {a + tens} + {ones} = {a + b}."
    c = -b
    if a < 0:
        return f"{a} - {c} = {a - c}."
    if c > a:
        return (
            f"{c} is more than {a}, so the result is negative: {c} - {a} = {c - a}, so {a} - {c} = {a - c}."
        )
    if c < 10:
        return f"{a} - {c} = {a - c}."
    tens, ones = c - c % 10, c % 10
    return f"{a} - {tens} = {a - tens}, and {a - tens} - {ones} = {a - c}."


def _recheck(terms: list[int], total: int, i: int) -> str:
    """The i-th re-check: undo the last term, or add the terms up in another order."""
    last, rest = terms[-1], total - terms[-1]
    op = "-" if last >= 0 else "+"
    phrases = [
        f"Wait, let me re-check: {total} {op} {abs(last)} = {rest}, which matches. Yes, {total} is right.",
        f"Let me verify once more: {' + '.join(str(t) for t in reversed(terms))} = {total}. So it is {total}.",
        f"Hmm, let me double-check the last step: {rest} {'+' if last >= 0 else '-'} {abs(last)} = {total}. Correct.",
    ]
    return phrases[i % len(phrases)]


def worked_solution(terms: list[int], rechecks: int) -> str:
    """The completion (after the ``<think>`` prefill) for the signed ``terms``."""
    total, steps = terms[0], []
    for t in terms[1:]:
        steps.append(_add_step(total, t))
        total += t
    checks = [_recheck(terms, total, i) for i in range(rechecks)]
    return " " + " ".join(steps + checks) + f" </think> <answer> {total} </answer>"


def write_traces(cfg: TracesConfig) -> dict:
    """Write prompt/completion rows to ``cfg.output``; returns counts (also in ``<output>.stats.json``)."""
    task = build_task(cfg.task)
    examples = task.train[: cfg.prompts] if cfg.prompts else task.train
    rng = random.Random(cfg.seed)
    rows, skipped = [], {"not an expression": 0, "answer disagrees": 0}
    for ex in examples:
        terms = parse_terms(ex.question)
        if terms is None or len(terms) < 2:
            skipped["not an expression"] += 1
            continue
        if not answers_match(str(sum(terms)), ex.answer):
            skipped["answer disagrees"] += 1
            continue
        k = rng.randint(cfg.min_rechecks, cfg.max_rechecks)
        rows.append(
            {"prompt": ex.question, "completion": "<think>" + worked_solution(terms, k), "rechecks": k}
        )
    if not rows:
        raise DataError(
            f"traces: none of {len(examples)} questions ends in an integer expression like "
            f"'12 - 7 ='; skipped: {skipped}"
        )
    for why, n in skipped.items():
        if n:
            log.warning("traces: skipped %d of %d questions (%s)", n, len(examples), why)
    write_rows(cfg.output, rows)
    stats = {
        "prompts": len(examples),
        "rows": len(rows),
        "skipped": skipped,
        "rechecks_mean": sum(r["rechecks"] for r in rows) / len(rows),
    }
    Path(cfg.output).with_suffix(".stats.json").write_text(json.dumps(stats, indent=2))
    log.info("traces: wrote %d rows to %s", len(rows), cfg.output)
    return stats
