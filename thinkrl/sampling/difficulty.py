"""Difficulty as a pass rate: the share of k sampled answers a model gets right.

Kimi k1.5 (section 2.3.4) labels each prompt's difficulty by the pass rate of an SFT
model over k samples at high temperature, and drops prompts that are too easy to
teach anything (and, with GRPO, all-wrong prompts teach nothing either: every
advantage is zero). ``estimate_pass_rates`` makes the labels; ``apply_pass_rates``
joins them onto a task (from ``task.pass_rates`` or a ``pass_rate`` data column)
and keeps the rows with ``task.min_pass_rate <= pass rate <= task.max_pass_rate``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from thinkrl.config import TaskConfig

log = logging.getLogger(__name__)


def estimate_pass_rates(
    engine,
    tokenizer,
    examples: list,
    task_cfg: TaskConfig,
    *,
    k: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    progress: bool = False,
) -> list[dict]:
    """One row per example: question, answer, task, correct (of k) and pass_rate = correct / k.
    ``progress``: a bar over the questions (``thinkrl difficulty``; silent off a terminal)."""
    from thinkrl.rewards import RewardModel
    from thinkrl.rollout import SamplingParams
    from thinkrl.rollout.scoring import sample_and_score

    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p)
    g = sample_and_score(
        engine,
        tokenizer,
        examples,
        task_cfg,
        k,
        params,
        RewardModel({"accuracy": 1.0}),
        progress="difficulty" if progress else None,
    )
    acc = g.parts["accuracy"]  # [len(examples) * k]
    rows = []
    for i, ex in enumerate(examples):
        correct = int(sum(acc[i * k : (i + 1) * k]))
        rows.append(
            {
                "question": ex.question,
                "answer": ex.answer,
                "task": ex.task,
                "k": k,
                "correct": correct,
                "pass_rate": correct / k,
            }
        )
    return rows


def write_rows(rows: list[dict], path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def read_pass_rates(path: Path) -> dict[str, float]:
    """question -> pass_rate from a file written by ``thinkrl difficulty``."""
    from thinkrl.tasks.files import read_rows, to_examples

    exs = to_examples(read_rows(Path(path).expanduser()), Path(path), {}, "labels")
    labels = {ex.question: ex.meta["pass_rate"] for ex in exs if "pass_rate" in ex.meta}
    if not labels:
        from thinkrl.tasks import DataError

        raise DataError(f"{path}: no row has a 'pass_rate' field (write one with `thinkrl difficulty`)")
    return labels


def apply_pass_rates(task, cfg: TaskConfig) -> None:
    """Attach labels from ``cfg.pass_rates`` and drop training rows outside the pass-rate window."""
    if cfg.pass_rates:
        labels = read_pass_rates(cfg.pass_rates)
        hits = 0
        for ex in task.train + task.eval:
            if ex.question in labels:
                ex.meta["pass_rate"] = labels[ex.question]
                hits += 1
        log.info(
            "task.pass_rates: labelled %d of %d rows from %s",
            hits,
            len(task.train) + len(task.eval),
            cfg.pass_rates,
        )
    lo, hi = cfg.min_pass_rate, cfg.max_pass_rate
    if (lo, hi) == (0.0, 1.0):
        return
    task.keep(lambda ex: "pass_rate" in ex.meta, "no pass rate (label them with `thinkrl difficulty`)")
    task.keep(lambda ex: lo <= ex.meta["pass_rate"] <= hi, f"a pass rate outside [{lo}, {hi}]")
