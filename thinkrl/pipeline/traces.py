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

``style: tool`` writes tool-use traces instead, the SFT cold start of tool-integrated
reasoning (ReTool, Feng et al. 2025, cold-starts on code-interleaved traces before RL; R1's
cold start is the same idea for plain chains of thought). Each trace is an episode of the
``python`` environment (thinkrl/envs/python.py), kept turn by turn as RL records it:

    assistant: " Let me compute it. <python>print(141 - 365 - 623)</python>"
    tool:      "\n<output>\n-847\n</output>\n"   (the sandbox's real output, via env.step)
    assistant: " The result is -847. </think> <answer> -847 </answer>"

The turns follow the prompt's prefill (``<think>``), as in an RL episode record. The final
turn states the number the program printed; a trace whose output disagrees with the gold
answer is skipped and counted. SFT renders the prompt with the environment's system prompt
and trains on the assistant turns only (thinkrl/data, ``encode_episode``).

Only questions of the form ``... a + b - c =`` (reasoning-gym's ``chain_sum``, or any
task whose question ends in such an expression) can be written out; other rows are
skipped and counted, as are rows whose gold answer disagrees with the expression.
"""

from __future__ import annotations

import json
import logging
import random
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from thinkrl.config import EnvConfig, TaskConfig
from thinkrl.data import write_rows
from thinkrl.tasks import DataError, answers_match, build_task
from thinkrl.trainer.common import need

log = logging.getLogger(__name__)

STYLES = ("long_cot", "tool")

# An integer expression at the end of the question: "12 - 7 + 30 =" (optional trailing "?").
EXPR = re.compile(r"(-?\d+(?:\s*[-+]\s*\d+)+)\s*=?\s*\??\s*$")


@dataclass
class TracesConfig:
    output: str = "runs/traces/data.jsonl"
    prompts: int = 0  # training questions to write out (0: all of them)
    min_rechecks: int = 0  # redundant re-checks per solution, drawn uniformly from [min, max]
    max_rechecks: int = 3
    seed: int = 0
    style: str = "long_cot"  # long_cot: worked steps + re-checks | tool: a python call and its real output
    task: TaskConfig = field(default_factory=TaskConfig)
    env: EnvConfig = field(default_factory=lambda: EnvConfig(name="python"))  # style tool: runs the calls

    def validate(self) -> None:
        need(0 <= self.min_rechecks <= self.max_rechecks, "need 0 <= min_rechecks <= max_rechecks")
        need(self.prompts >= 0, "prompts must be >= 0 (0: every training question)")
        need(self.style in STYLES, f"traces style '{self.style}' unknown; choose from: {', '.join(STYLES)}")
        if self.style == "tool":
            need(
                self.env.name == "python",
                f"traces style tool writes <python> calls: it needs env.name=python, not '{self.env.name}'",
            )
            need(
                self.env.max_tool_calls >= 1,
                "traces style tool makes one call: env.max_tool_calls must be >= 1",
            )
            from thinkrl.envs import validate_env

            validate_env(self.env)


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


# The tool trace's phrasing, drawn per row so the model does not learn one sentence only.
TOOL_OPENERS = ("Let me compute it.", "I will run it in Python.", "Let me add it up with Python.")
TOOL_CLOSERS = ("The result is {r}.", "Python printed {r}, so the answer is {r}.", "So it is {r}.")


def tool_call_turn(terms: list[int], opener: str, think: str = "") -> str:
    """The first policy turn: a sentence, then a program that prints the sum of ``terms``.
    ``think`` opens the thinking where the prompt's prefill does not (``<think>``)."""
    expr = str(terms[0]) + "".join(f" {'-' if t < 0 else '+'} {abs(t)}" for t in terms[1:])
    return f"{think} {opener} <python>print({expr})</python>"


def opens_thinking(task: TaskConfig) -> bool:
    """Whether the task's prompt ends in ``<think>`` (the r1_zero template's, or the prefill)."""
    return task.template == "r1_zero" or "<think>" in task.prefill


def tool_trace(env, example, terms: list[int], rng: random.Random, think: str = "") -> dict | None:
    """One episode of ``env``: the call, the environment's real observation (``env.step``
    runs the program in the sandbox), and an answer turn that states the printed number;
    None when the call failed or printed no single integer."""
    call = tool_call_turn(terms, rng.choice(TOOL_OPENERS), think)
    closer = rng.choice(TOOL_CLOSERS)
    obs, _, done, info = env.step(env.reset(example), call)
    printed = re.fullmatch(r"\s*<output>\s*(-?\d+)\s*</output>\s*", obs or "")
    if done or info.get("tool_status") != "ok" or printed is None:
        return None
    r = printed.group(1)
    return {
        "prompt": example.question,
        "env": env.cfg.name,
        "turns": [
            {"role": "assistant", "text": call},
            {"role": "tool", "text": obs, "tool_status": info["tool_status"]},
            {"role": "assistant", "text": f" {closer.format(r=r)} </think> <answer> {r} </answer>"},
        ],
        "result": r,
    }


def _tool_rows(cfg: TracesConfig, todo: list, skipped: dict) -> list[dict]:
    """Run every trace's call in the sandbox, a few at once (each mostly waits on its process);
    each row draws its phrasing from its own seeded generator, so the rows do not depend on
    the order the calls finish in."""
    from thinkrl.envs import build_env

    env = build_env(cfg.env)
    think = "" if opens_thinking(cfg.task) else "<think>"
    jobs = [(ex, terms, random.Random(f"{cfg.seed}-{i}"), think) for i, (ex, terms) in enumerate(todo)]
    with ThreadPoolExecutor(max_workers=4) as pool:
        traces = list(pool.map(lambda job: tool_trace(env, *job), jobs))
    rows = []
    for (ex, _), tr in zip(todo, traces):
        if tr is None:
            skipped["tool failed"] += 1
        elif not answers_match(tr["result"], ex.answer):
            skipped["tool output disagrees"] += 1
        else:
            rows.append(tr)
    return rows


def write_traces(cfg: TracesConfig) -> dict:
    """Write SFT rows to ``cfg.output`` (prompt/completion, or multi-turn ``turns`` for style
    tool); returns counts (also in ``<output>.stats.json``)."""
    task = build_task(cfg.task)
    examples = task.train[: cfg.prompts] if cfg.prompts else task.train
    rng = random.Random(cfg.seed)
    rows, skipped = [], {"not an expression": 0, "answer disagrees": 0}
    if cfg.style == "tool":
        skipped.update({"tool failed": 0, "tool output disagrees": 0})
    todo = []
    for ex in examples:
        terms = parse_terms(ex.question)
        if terms is None or len(terms) < 2:
            skipped["not an expression"] += 1
            continue
        if not answers_match(str(sum(terms)), ex.answer):
            skipped["answer disagrees"] += 1
            continue
        todo.append((ex, terms))
    if cfg.style == "tool":
        rows = _tool_rows(cfg, todo, skipped)
    else:
        for ex, terms in todo:
            k = rng.randint(cfg.min_rechecks, cfg.max_rechecks)
            rows.append(
                {"prompt": ex.question, "completion": "<think>" + worked_solution(terms, k), "rechecks": k}
            )
    if not rows and todo:  # style tool: every call failed or printed something else
        raise DataError(
            f"traces: no tool call of {len(todo)} gave the answer (skipped: {skipped}); "
            "check that the sandbox runs Python (docs/rewards.md)"
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
    stats = {"prompts": len(examples), "rows": len(rows), "skipped": skipped}
    if cfg.style == "long_cot":
        stats["rechecks_mean"] = sum(r["rechecks"] for r in rows) / len(rows)
    else:
        stats["tool_calls_per_row"] = sum(t["role"] == "tool" for r in rows for t in r["turns"]) / len(rows)
    Path(cfg.output).with_suffix(".stats.json").write_text(json.dumps(stats, indent=2))
    log.info("traces: wrote %d rows to %s", len(rows), cfg.output)
    return stats
