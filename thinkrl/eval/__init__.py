"""Held-out evaluation: greedy accuracy and format rate, as a table and a JSON file."""

from __future__ import annotations

import json
import time
from pathlib import Path

from thinkrl.config import ConfigError, TaskConfig
from thinkrl.rewards import RewardModel
from thinkrl.rollout import Engine, SamplingParams
from thinkrl.tasks import Example
from thinkrl.tasks.templates import render_prompt


def evaluate(engine: Engine, tokenizer, examples: list[Example], task_cfg: TaskConfig, *,
             max_new_tokens: int, temperature: float = 0.0) -> dict:
    """Score one (greedy by default) completion per held-out example."""
    if not examples:
        raise ConfigError("no held-out examples to evaluate on: the task has no eval set (check eval.n, task.eval_size)")
    rendered = [render_prompt(ex.question, tokenizer, task_cfg) for ex in examples]
    t0 = time.perf_counter()
    ro = engine.generate([r[0] for r in rendered], 1, SamplingParams(max_new_tokens=max_new_tokens,
                                                                     temperature=temperature))
    seconds = time.perf_counter() - t0
    texts = [pre + t for (_, pre), t in zip(rendered, ro.texts)]
    _, parts = RewardModel({"accuracy": 1.0, "format": 1.0}).score(texts, examples)
    n = len(examples)
    lengths = [len(c) for c in ro.completion_ids]
    summary = {
        "n": n,
        "accuracy": sum(parts["accuracy"]) / n,
        "format_rate": sum(parts["format"]) / n,
        "response_len_mean": sum(lengths) / n,
        "response_len_max": max(lengths),
        "truncation_rate": sum(ro.truncated) / n,
        "seconds": round(seconds, 2),
    }
    records = [{"question": ex.question, "answer": ex.answer, "completion": t, "correct": a, "format": f}
               for ex, t, a, f in zip(examples, texts, parts["accuracy"], parts["format"])]
    return {"summary": summary, "records": records}


def format_table(rows: list[tuple[str, dict]]) -> str:
    """Plain-text table: one row per model."""
    cols = ["accuracy", "format_rate", "response_len_mean", "truncation_rate", "n"]
    head = ["model"] + cols
    body = [[name] + [_fmt(s.get(c)) for c in cols] for name, s in rows]
    widths = [max(len(r[i]) for r in [head] + body) for i in range(len(head))]
    line = lambda r: "  ".join(x.ljust(w) for x, w in zip(r, widths))  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(r) for r in body])


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


def write_json(path: Path, obj: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(obj, indent=2, ensure_ascii=False))
