"""Rejection sampling: draw N responses per prompt, keep the ones the verifier accepts.

DeepSeek-AI 2025 ("DeepSeek-R1", section 2.3.3) builds its second SFT set this way:
sample from the RL checkpoint, keep correct answers, drop responses with mixed
languages, overlong ones and duplicates. Kimi k1.5 (Kimi Team 2025, section 2.4)
keeps the *shortest* correct response for long2short SFT, and pairs it against a
wrong or longer one for DPO (``mode=pairs``).

The source is a local model, or a teacher behind an OpenAI-compatible endpoint
(``endpoint.base_url``), whose verified traces are the distillation set.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from thinkrl.config import TaskConfig
from thinkrl.data import write_rows
from thinkrl.models import load_model
from thinkrl.pipeline.teacher import EndpointConfig, as_response, chat_completion
from thinkrl.progress import progress_bar
from thinkrl.rewards import RewardModel
from thinkrl.rollout import Rollout, SamplingParams, engine_on
from thinkrl.rollout.scoring import sample_and_score, score_rollout
from thinkrl.sampling.dynamic import Groups
from thinkrl.tasks import build_task
from thinkrl.tasks.templates import chat_messages
from thinkrl.trainer.common import need

log = logging.getLogger(__name__)


@dataclass
class SampleConfig:
    model: str = "smollm2-135m"  # the local source model (and the tokenizer that measures lengths)
    output: str = "runs/sample/data.jsonl"
    mode: str = "all"  # all | shortest | pairs
    n: int = 8  # samples per prompt
    prompts: int = 64  # training questions to sample for
    temperature: float = 0.8
    top_p: float = 1.0
    max_new_tokens: int = 128
    batch_size: int = 64
    backend: str = "fast"
    dtype: str = "auto"
    device: str = "auto"  # auto | cpu | cuda | cuda:N (thinkrl/device.py)
    seed: int = 0
    per_prompt: int = 1  # mode=all: keep at most this many per prompt (0: every accepted one)
    min_tokens: int = 1  # length bounds on kept responses, in tokens (max 0: no bound)
    max_tokens: int = 0
    require_format: bool = True  # <think>...</think> <answer>...</answer> exactly
    max_foreign_script: float = 0.05  # share of letters outside the dominant script (mixed-language filter)
    dedup: bool = True
    progress: bool = True  # a bar over the prompts (silent off a terminal)
    # The reward that decides "correct": the task's own check by default; `judge` (an
    # OpenAI-compatible endpoint, docs/rewards.md) for answers that rules cannot verify, with
    # its options in verifier_args (url, model, ...). A reward of 1 counts as correct.
    verifier: str = "accuracy"
    verifier_args: dict = field(default_factory=dict)
    pairs_output: str = ""  # also write mode=pairs rows built from the same samples here (no second pass)
    format: str = "auto"  # auto (messages for the chat template) | messages | prompt_completion
    endpoint: EndpointConfig = field(default_factory=EndpointConfig)
    task: TaskConfig = field(default_factory=TaskConfig)

    def validate(self) -> None:
        need(
            self.mode in ("all", "shortest", "pairs"),
            f"mode '{self.mode}' unknown; choose from: all, shortest, pairs",
        )
        need(
            self.format in ("auto", "messages", "prompt_completion"),
            f"format '{self.format}' unknown; choose from: auto, messages, prompt_completion",
        )
        need(self.n >= 1 and self.prompts >= 1, "n and prompts must be >= 1")
        need(self.mode != "pairs" or self.n >= 2, "mode=pairs needs n >= 2")
        need(
            self.temperature >= 0 and self.max_new_tokens >= 1,
            "temperature must be >= 0, max_new_tokens >= 1",
        )
        need(
            self.format != "messages" or self.task.template == "chat",
            "format=messages needs task.template=chat",
        )
        need(
            self.endpoint.base_url is None or bool(self.endpoint.model),
            "endpoint.base_url needs endpoint.model",
        )


def foreign_script_share(text: str) -> float:
    """Share of letters outside the most common Unicode script (LATIN, CJK, CYRILLIC...)."""
    scripts = Counter(unicodedata.name(ch, "?").split(" ")[0] for ch in text if ch.isalpha())
    total = sum(scripts.values())
    return 0.0 if total == 0 else 1.0 - max(scripts.values()) / total


def _dedup_key(text: str) -> str:
    return " ".join(text.lower().split())


@dataclass
class Sample:
    response: str  # prefill + completion
    tokens: int
    correct: bool
    reason: str  # "kept" or why it was rejected


def judge(samples: list[Sample], fmt: list[float], truncated: list[bool], cfg: SampleConfig) -> None:
    """Set each sample's ``reason``: the first filter it fails, or "kept"."""
    seen: set[str] = set()
    for s, f, t in zip(samples, fmt, truncated):
        if not s.correct:
            s.reason = "wrong"
        elif t:
            s.reason = "truncated"
        elif cfg.require_format and f < 1:
            s.reason = "format"
        elif s.tokens < cfg.min_tokens or (cfg.max_tokens and s.tokens > cfg.max_tokens):
            s.reason = "length"
        elif foreign_script_share(s.response) > cfg.max_foreign_script:
            s.reason = "mixed_script"
        elif cfg.dedup and _dedup_key(s.response) in seen:
            s.reason = "duplicate"
        else:
            s.reason = "kept"
            seen.add(_dedup_key(s.response))


def context_messages(question: str, cfg: TaskConfig) -> list[dict]:
    """The chat turns the chat template renders before the answer (few-shot turns are context only)."""
    return [{**m, "weight": 0} if m["role"] == "assistant" else m for m in chat_messages(question, cfg)]


def sample_scored(cfg: SampleConfig, examples: list, tok, model, scorer: RewardModel) -> list[Groups]:
    """``n`` responses per example from the endpoint or the local model, scored by ``scorer``:
    one :class:`Groups` per example (an endpoint may answer with fewer than ``n``)."""
    if not cfg.endpoint.base_url:
        engine = engine_on(
            cfg.backend, model, tok, batch_size=cfg.batch_size, dtype=cfg.dtype, device_name=cfg.device
        )
        params = SamplingParams(
            max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p
        )
        g = sample_and_score(
            engine,
            tok,
            examples,
            cfg.task,
            cfg.n,
            params,
            scorer,
            progress="sample" if cfg.progress else None,
        )
        return [g.select([q]) for q in range(len(g))]
    out = []
    with progress_bar(len(examples), "sample", enabled=cfg.progress, unit="prompt") as bar:
        for ex in examples:
            msgs = [
                {k: v for k, v in m.items() if k != "weight"} for m in context_messages(ex.question, cfg.task)
            ]
            got = chat_completion(
                cfg.endpoint, msgs, n=cfg.n, temperature=cfg.temperature, max_tokens=cfg.max_new_tokens
            )
            texts = [as_response(r, c) for r, c in got]
            ro = Rollout(
                prompt_ids=[[] for _ in texts],
                completion_ids=[tok(t, add_special_tokens=False).input_ids for t in texts],
                texts=texts,
                truncated=[False] * len(texts),
            )
            out.append(score_rollout(scorer, [ex], [("", "")], ro, len(texts), max_tokens=cfg.max_new_tokens))
            bar.update(1)
    return out


def _row(question: str, answer: str, s: Sample, cfg: SampleConfig) -> dict:
    fmt = (
        cfg.format
        if cfg.format != "auto"
        else ("messages" if cfg.task.template == "chat" else "prompt_completion")
    )
    if fmt == "messages":
        msgs = context_messages(question, cfg.task) + [{"role": "assistant", "content": s.response}]
        return {"messages": msgs, "answer": answer, "tokens": s.tokens}
    return {"prompt": question, "completion": s.response, "answer": answer, "tokens": s.tokens}


def select(question: str, answer: str, samples: list[Sample], cfg: SampleConfig) -> list[dict]:
    kept = sorted((s for s in samples if s.reason == "kept"), key=lambda s: s.tokens)
    if not kept:
        return []
    if cfg.mode == "shortest":
        return [_row(question, answer, kept[0], cfg)]
    if cfg.mode == "all":
        return [_row(question, answer, s, cfg) for s in (kept[: cfg.per_prompt] if cfg.per_prompt else kept)]
    chosen = kept[0]  # pairs: the longest response that is wrong, or correct but longer than the chosen
    others = [s for s in samples if s is not chosen and (not s.correct or s.tokens > chosen.tokens)]
    if not others:
        return []
    rejected = max(others, key=lambda s: s.tokens)
    return [
        {
            "prompt": question,
            "chosen": chosen.response,
            "rejected": rejected.response,
            "answer": answer,
            "chosen_tokens": chosen.tokens,
            "rejected_tokens": rejected.tokens,
        }
    ]


def run_sample(cfg: SampleConfig) -> dict:
    """Sample, filter, write ``cfg.output`` (JSONL) and ``<output>.stats.json``; returns the stats."""
    from thinkrl.trainer.common import seed_everything

    seed_everything(cfg.seed)
    task = build_task(cfg.task)
    examples = task.next_batch(min(cfg.prompts, len(task.train)))
    model, tok = load_model(cfg.model)
    scorer = RewardModel(
        {cfg.verifier: 1.0, "format": 1.0}, {cfg.verifier: cfg.verifier_args} if cfg.verifier_args else None
    )
    rows, reasons, pair_rows = [], Counter(), []
    as_pairs = dataclasses.replace(cfg, mode="pairs")
    all_lens, kept_lens, n_correct = [], [], 0
    for g in sample_scored(cfg, examples, tok, model, scorer):
        ex, ln = g.examples[0], [len(c) for c in g.ro.completion_ids]
        samples = [Sample(r, k, a >= 1, "") for r, k, a in zip(g.texts, ln, g.parts[cfg.verifier])]
        judge(samples, g.parts["format"], g.ro.truncated, cfg)
        reasons.update(s.reason for s in samples)
        n_correct += sum(s.correct for s in samples)
        all_lens += ln
        new = select(ex.question, ex.answer, samples, cfg)
        kept_lens += [r.get("tokens", r.get("chosen_tokens")) for r in new]
        rows += new
        if cfg.pairs_output:
            pair_rows += select(ex.question, ex.answer, samples, as_pairs)
    write_rows(cfg.output, rows)
    if cfg.pairs_output:
        write_rows(cfg.pairs_output, pair_rows)
    stats = {
        "prompts": len(examples),
        "samples": len(all_lens),
        "rows": len(rows),
        "mode": cfg.mode,
        "sample_accuracy": n_correct / max(1, len(all_lens)),
        "reasons": dict(reasons),
        "sample_len_mean": sum(all_lens) / max(1, len(all_lens)),
        "kept_len_mean": sum(kept_lens) / len(kept_lens) if kept_lens else None,
    }
    if cfg.pairs_output:
        stats["pairs"] = len(pair_rows)
    Path(cfg.output).with_suffix(".stats.json").write_text(json.dumps(stats, indent=2))
    log.info("sample: %d prompts x %d -> %d rows (%s)", len(examples), cfg.n, len(rows), dict(reasons))
    return stats
