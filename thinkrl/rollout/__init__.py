"""Rollout engines: prompts in, sampled completions out.

Every engine follows :class:`Engine`: ``generate(prompts, n, params) -> Rollout``,
with the ``n`` samples of one prompt next to each other in the output.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, fields
from typing import Protocol

import torch

log = logging.getLogger(__name__)


@dataclass
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0
    min_new_tokens: int = 0  # end-of-sequence tokens are banned before this many new tokens
    # At most this many tokens inside <think> ... </think>; then the closing phrase is forced
    # (thinkrl/rollout/thinking.py). None: no cap.
    thinking_budget: int | None = None

    def __post_init__(self):
        if self.thinking_budget is not None:
            from thinkrl.rollout.thinking import check_budget

            check_budget(self.thinking_budget)


@dataclass
class Rollout:
    prompt_ids: list[list[int]]  # one per sequence (repeated n times per prompt)
    completion_ids: list[list[int]]  # sampled tokens, ending with EOS if the sequence stopped
    texts: list[str]  # decoded completions without special tokens
    truncated: list[bool]  # hit max_new_tokens before EOS
    logps: list[list[float]] | None = None  # sampled tokens' log-probs, where the engine gives them
    # With a thinking budget: per completion token, True where the engine forced it (the
    # closing phrase) instead of sampling it; None without a budget.
    forced: list[list[bool]] | None = None
    # Multi-turn episodes (thinkrl/envs): completion_ids hold the policy's turns and the
    # environment's observations in order; loss_mask is 1 on the policy's tokens, 0 on the
    # observations' (never trained on), and ``episodes`` the turn-by-turn records. None: one turn.
    loss_mask: list[list[int]] | None = None
    episodes: list[dict] | None = None

    def rows(self, index: list[int]) -> Rollout:
        """The rollout of the sequences ``index``, every per-sequence field kept."""
        return Rollout(**{f.name: None if (v := getattr(self, f.name)) is None else [v[i] for i in index]
                          for f in fields(self)})

    @staticmethod
    def concat(items: list[Rollout]) -> Rollout:
        """Sequences of ``items`` one after another; a field some items lack becomes None."""
        def cat(name):
            parts = [getattr(it, name) for it in items]
            return None if any(x is None for x in parts) else [y for x in parts for y in x]

        return Rollout(**{f.name: cat(f.name) for f in fields(Rollout)})


class Engine(Protocol):
    def generate(self, prompts: list[str], n: int, params: SamplingParams) -> Rollout: ...


def autocast(enabled: bool):
    """bf16 autocast on CPU, or nothing."""
    if enabled:
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


class HFEngine:
    """Reference engine: ``transformers`` ``generate`` on left-padded batches."""

    def __init__(self, model, tokenizer, *, batch_size: int = 64, bf16: bool = False):
        self.model, self.tok, self.batch_size, self.bf16 = model, tokenizer, batch_size, bf16
        self.eos_ids = {tokenizer.eos_token_id} | set(_as_list(model.generation_config.eos_token_id))
        self._closing: list[int] | None = None  # the thinking budget's closing phrase, tokenized once

    @torch.no_grad()
    def generate(self, prompts: list[str], n: int, params: SamplingParams) -> Rollout:
        tok = self.tok
        prompt_ids = [tok(p, add_special_tokens=False).input_ids for p in prompts]
        flat = [ids for ids in prompt_ids for _ in range(n)]  # [N] with N = len(prompts) * n
        flat_text = [p for p in prompts for _ in range(n)]
        completions, truncated, forced = [], [], []
        was_training = self.model.training
        self.model.eval()
        try:
            for s in range(0, len(flat), self.batch_size):
                batch = flat[s: s + self.batch_size]
                budget = self._budget(flat_text[s: s + self.batch_size], batch, params)
                for ids in self._generate_batch(batch, params, budget):
                    cut = next((i for i, t in enumerate(ids) if t in self.eos_ids), None)
                    completions.append(ids if cut is None else ids[: cut + 1])
                    truncated.append(cut is None)
                if budget is not None:
                    forced += budget.finish(completions[s:])
        finally:
            self.model.train(was_training)
        texts = tok.batch_decode(completions, skip_special_tokens=True)
        return Rollout(prompt_ids=flat, completion_ids=completions, texts=texts, truncated=truncated,
                       forced=forced if params.thinking_budget is not None else None)

    def _budget(self, prompts: list[str], batch: list[list[int]], params: SamplingParams):
        """A logits processor that enforces ``params.thinking_budget`` on a batch (the prompts'
        text and ids), or None without a budget."""
        if params.thinking_budget is None:
            return None
        from thinkrl.rollout.thinking import BudgetLogitsProcessor, BudgetTracker, closing_ids

        if self._closing is None:
            self._closing = closing_ids(self.tok)
        tracker = BudgetTracker(self.tok, params.thinking_budget, prompts, self._closing)
        return BudgetLogitsProcessor(tracker, max(len(x) for x in batch))

    def _generate_batch(self, batch: list[list[int]], params: SamplingParams, budget=None) -> list[list[int]]:
        pad = self.tok.pad_token_id
        width = max(len(x) for x in batch)
        input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in batch])  # [b, P], left-padded
        attn = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in batch])  # [b, P]
        greedy = params.temperature <= 0
        kwargs = dict(max_new_tokens=params.max_new_tokens, do_sample=not greedy, pad_token_id=pad,
                      eos_token_id=sorted(self.eos_ids), min_new_tokens=params.min_new_tokens or None)
        if not greedy:
            kwargs.update(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k or None)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        if budget is not None:
            kwargs["logits_processor"] = [budget]
        with autocast(self.bf16):
            out = self.model.generate(input_ids=input_ids, attention_mask=attn, **kwargs)  # [b, P + T]
        return out[:, width:].tolist()


MIN_SHARED_PREFIX = 16  # tokens; a shorter common prefix of a batch's prompts is not run separately


def shared_prefix_len(prompts: list[list[int]]) -> int:
    """How many leading tokens all ``prompts`` share and are worth running once (a chat
    template's system prompt and few-shot turns): 0 for a single prompt or a prefix shorter
    than ``MIN_SHARED_PREFIX``, and never the whole of a prompt, so that every prompt keeps a
    tail of its own (its last position predicts the first new token). Used by the rollout
    engine's prefill and the trainer's grouped forward."""
    if len(prompts) < 2:
        return 0
    L = min(len(os.path.commonprefix(prompts)), min(len(p) for p in prompts) - 1)
    return L if L >= MIN_SHARED_PREFIX else 0


def _as_list(x) -> list:
    if x is None:
        return []
    return list(x) if isinstance(x, (list, tuple)) else [x]


def build_engine(name: str, model, tokenizer, *, batch_size: int, bf16: bool) -> Engine:
    """The engine ``rollout.backend=name`` asks for. ``fast`` runs only the decoder layouts it
    implements exactly; for any other model it falls back to ``hf`` (same outputs, slower)
    with one log line saying why, so that a new model type never stops a run."""
    if name == "fast":
        from thinkrl.rollout.fast import FastEngine, unsupported

        why = unsupported(model.config)
        if why is None:
            return FastEngine(model, tokenizer, batch_size=batch_size, bf16=bf16)
        log.warning("rollout.backend=fast cannot run this model (%s); using the hf backend", why)
        name = "hf"
    if name == "hf":
        return HFEngine(model, tokenizer, batch_size=batch_size, bf16=bf16)
    from thinkrl.config import ConfigError

    raise ConfigError(f"rollout.backend '{name}' unknown; choose from: fast, hf")
