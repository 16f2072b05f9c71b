"""Held-out evaluation: accuracy (pass@1), pass@k, maj@k, format, length and reflection, as a table and JSON."""

from __future__ import annotations

import json
from pathlib import Path

from thinkrl.config import REFLECTION_WORDS, ConfigError, TaskConfig
from thinkrl.eval.calibration import answer_confidence, expected_calibration_error
from thinkrl.eval.metrics import majority_vote, pass_at_k, reflection_stats
from thinkrl.rewards import RewardModel, extract_answer
from thinkrl.rollout import Engine, SamplingParams
from thinkrl.rollout.scoring import completion_stats, mode_stats, sample_and_score
from thinkrl.rollout.thinking import WAIT_PHRASE
from thinkrl.sampling.dynamic import Groups
from thinkrl.tasks import Example


def eval_settings(cfg) -> dict:
    """``evaluate``'s keyword arguments from a run config's ``eval.*`` keys, the same for
    ``thinkrl eval`` and the evaluations during training (greedy for one sample, else
    ``rollout.temperature`` unless ``eval.temperature`` says otherwise)."""
    e = cfg.eval
    k = e.samples
    temperature = e.temperature if e.temperature is not None else (0.0 if k == 1 else cfg.rollout.temperature)
    return {
        "max_new_tokens": e.max_new_tokens or cfg.rollout.max_new_tokens,
        "temperature": temperature,
        "samples": k,
        "reflection_words": e.reflection_words,
        "min_thinking": e.min_thinking,
    }


def evaluate(
    engine: Engine,
    tokenizer,
    examples: list[Example],
    task_cfg: TaskConfig,
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    samples: int = 1,
    reflection_words=REFLECTION_WORDS,
    thinking_budget: int | None = None,
    min_thinking: int = 0,
    progress: bool = False,
) -> dict:
    """Score ``samples`` completions per held-out example (one greedy one by default).

    ``accuracy`` is pass@1 averaged over the samples; with samples = k > 1 the summary also
    has the unbiased ``pass@k`` and ``maj@k`` (see :mod:`thinkrl.eval.metrics`). With a
    ``thinking_budget`` the engine caps each response's thinking at that many tokens
    (:mod:`thinkrl.rollout.thinking`) and the summary adds ``forced_rate``, the share of
    responses whose thinking the budget cut short. ``min_thinking`` > 0 keeps each response
    thinking at least that many tokens (s1's "Wait" extension) and adds ``wait_rate``, the
    share of responses that were made to go on. ``progress``: a bar over the questions
    (``thinkrl eval``; silent off a terminal).
    """
    if not examples:
        raise ConfigError(
            "no held-out examples to evaluate on: the task has no eval set (check eval.n, task.eval_size)"
        )
    k, timings = samples, {}
    params = SamplingParams(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        thinking_budget=thinking_budget,
        min_thinking=min_thinking,
    )
    g = sample_and_score(
        engine,
        tokenizer,
        examples,
        task_cfg,
        k,
        params,
        RewardModel({"accuracy": 1.0, "format": 1.0}),
        timings=timings,
        progress="eval" if progress else None,
    )
    ro, N = g.ro, len(g.totals)  # N = n * k
    summary = {
        "n": len(examples),
        "samples": k,
        **completion_stats(g),
        **reflection_stats(g.texts, reflection_words),
        "seconds": round(timings["time_generate"], 2),
    }
    if by_mode := mode_stats(g):  # task.thinking: accuracy, form and length per thinking mode
        summary["by_mode"] = by_mode
    if thinking_budget is not None:
        summary["thinking_budget"] = thinking_budget
        summary["forced_rate"] = sum(any(f) for f in ro.forced or []) / N
    if min_thinking:
        summary["min_thinking"] = min_thinking
        wait = tokenizer(WAIT_PHRASE, add_special_tokens=False).input_ids
        summary["wait_rate"] = (
            sum(_forced_run(c, f, wait) for c, f in zip(ro.completion_ids, ro.forced or [])) / N
        )
    records = _records(g, summary)
    if ro.logps is not None:  # calibration: the model's confidence in its own final answer
        _calibration(g, tokenizer, summary, records)
    return {"summary": summary, "records": records}


def _records(g: Groups, summary: dict) -> list[dict]:
    """One record per question (its first sample; with k > 1 all k, its pass rate and whether
    the majority answer is right); adds ``pass@k`` and ``maj@k`` to ``summary`` for k > 1."""
    k, n = g.group_size(), len(g)
    acc, fmt, texts = g.parts["accuracy"], g.parts["format"], g.texts
    records = []
    maj_hits = 0
    for q, ex in enumerate(g.examples):
        rows = range(q * k, (q + 1) * k)
        rec = {
            "question": ex.question,
            "answer": ex.answer,
            "completion": texts[q * k],
            "correct": acc[q * k],
            "format": fmt[q * k],
        }
        if k > 1:
            winner = majority_vote([extract_answer(texts[i]) for i in rows])
            maj = winner is not None and acc[q * k + winner] == 1.0
            maj_hits += maj
            rec.update(
                pass_rate=sum(acc[i] for i in rows) / k,
                maj_correct=maj,
                samples=[{"completion": texts[i], "correct": acc[i], "format": fmt[i]} for i in rows],
            )
        records.append(rec)
    if k > 1:
        summary[f"pass@{k}"] = sum(pass_at_k(k, int(sum(acc[q * k : (q + 1) * k])), k) for q in range(n)) / n
        summary[f"maj@{k}"] = maj_hits / n
    return records


def _calibration(g: Groups, tokenizer, summary: dict, records: list[dict]) -> None:
    """ECE and the mean confidence of the answers the model committed to (into ``summary``),
    and each record's confidence."""
    k, acc = g.group_size(), g.parts["accuracy"]
    conf = [answer_confidence(c, lp, tokenizer) for c, lp in zip(g.ro.completion_ids, g.ro.logps)]
    have = [(c, acc[i] == 1.0) for i, c in enumerate(conf) if c is not None]
    if have:
        summary["ece"] = expected_calibration_error([c for c, _ in have], [ok for _, ok in have])
        summary["answer_confidence_mean"] = sum(c for c, _ in have) / len(have)
    for q, rec in enumerate(records):
        rec["confidence"] = conf[q * k]


def _forced_run(ids: list[int], forced: list[bool], phrase: list[int]) -> bool:
    """Whether the forced tokens of a completion include ``phrase`` written by the engine."""
    runs, cur = [], []
    for t, f in zip(ids, forced):
        if f:
            cur.append(t)
        elif cur:
            runs.append(cur)
            cur = []
    runs += [cur] if cur else []
    return any(r[: len(phrase)] == phrase for r in runs)


def format_table(rows: list[tuple[str, dict]]) -> str:
    """Plain-text table: one row per model."""
    ks = sorted({s.get("samples", 1) for _, s in rows} - {1})
    cols = (
        ["accuracy"]
        + [c for k in ks for c in (f"pass@{k}", f"maj@{k}")]
        + ["format_rate", "response_len_mean", "response_len_max", "truncation_rate", "reflection_rate"]
        + (["ece"] if any("ece" in s for _, s in rows) else [])
        + ["n"]
    )
    head = ["model"] + cols
    body = [[name] + [_fmt(s.get(c)) for c in cols] for name, s in rows]
    widths = [max(len(r[i]) for r in [head] + body) for i in range(len(head))]
    line = lambda r: "  ".join(x.ljust(w) for x, w in zip(r, widths))  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(r) for r in body])


def format_mode_table(rows: list[tuple[str, dict]]) -> str:
    """Plain-text table of accuracy, form and length per thinking mode (task.thinking), one row
    per model and mode; empty if no summary has modes."""
    cols = ["accuracy", "format_rate", "response_len_mean", "n"]
    head = ["model", "thinking"] + cols
    body = [
        [name, mode] + [_fmt(m.get(c)) for c in cols]
        for name, s in rows
        for mode, m in s.get("by_mode", {}).items()
    ]
    if not body:
        return ""
    widths = [max(len(r[i]) for r in [head] + body) for i in range(len(head))]
    line = lambda r: "  ".join(x.ljust(w) for x, w in zip(r, widths))  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(r) for r in body])


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


def write_json(path: Path, obj: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(obj, indent=2, ensure_ascii=False))
