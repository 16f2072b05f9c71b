"""Rollout engines: prompt token ids in, sampled completions and their log-probs out.

Every engine is a registered backend (``rollout.backend=NAME``; :data:`ENGINES`) that follows
one protocol, :class:`Engine`:

- ``generate(prompt_ids, n, params) -> Rollout``: ``n`` samples per prompt, the ``n`` samples
  of one prompt next to each other, with each sampled token's log-prob;
- ``sync_weights(model)``: copy the trained model's weights in; the trainer calls it after
  each optimizer step, and an engine samples from the weights of its last sync;
- ``score(mb, temperature)``: optional, log-probs of given completions (the frozen KL
  reference); a backend without it leaves scoring to the model's forward pass.

``generate_text`` is the thin helper for text prompts. Nothing outside this package knows
which backend it holds (the trainer, eval and the pipelines only call the protocol).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

from thinkrl import device
from thinkrl.registry import Registry

log = logging.getLogger(__name__)

STOP_TAIL = 16  # tokens decoded to look for a stop string: a string longer than this many tokens is missed


@dataclass
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0
    min_new_tokens: int = 0  # end-of-sequence (and stop) tokens are banned before this many new tokens
    # At most this many tokens inside <think> ... </think>; then the closing phrase is forced
    # (thinkrl/rollout/thinking.py). None: no cap.
    thinking_budget: int | None = None
    # Sampling seed of this call: the same seed gives the same samples, and the process's random
    # state is left as it was. None: draw from (and advance) the process's random state.
    seed: int | None = None
    # Stop strings (str) and stop token ids (int). A completion ends with the token that
    # completes a stop string, or with a stop token, like with EOS: it is then not truncated.
    stop: tuple[str | int, ...] = ()

    def __post_init__(self):
        if self.thinking_budget is not None:
            from thinkrl.rollout.thinking import check_budget

            check_budget(self.thinking_budget)
        self.stop = tuple([self.stop] if isinstance(self.stop, (str, int)) else self.stop)
        bad = [s for s in self.stop if isinstance(s, bool) or not isinstance(s, (str, int)) or s == ""]
        if bad:
            from thinkrl.config import ConfigError

            raise ConfigError(f"stop entries must be non-empty strings or token ids; got {bad!r}")

    @property
    def stop_strings(self) -> tuple[str, ...]:
        return tuple(s for s in self.stop if isinstance(s, str))

    @property
    def stop_ids(self) -> tuple[int, ...]:
        return tuple(s for s in self.stop if isinstance(s, int))


@dataclass
class Rollout:
    prompt_ids: list[list[int]]  # one per sequence (repeated n times per prompt)
    completion_ids: list[list[int]]  # sampled tokens, ending with EOS / a stop if the sequence stopped
    texts: list[str]  # decoded completions without special tokens
    truncated: list[bool]  # hit max_new_tokens before EOS or a stop
    logps: list[list[float]] | None = None  # sampled tokens' log-probs under softmax(logits / temperature)
    # With a thinking budget: per completion token, True where the engine forced it (the
    # closing phrase) instead of sampling it; None without a budget.
    forced: list[list[bool]] | None = None


class Engine:
    """The protocol every backend implements (see the module docstring). Attributes a caller
    may use: ``tok`` (the tokenizer) and ``batch_size`` (sequences per forward pass)."""

    tok: object
    batch_size: int

    def generate(self, prompt_ids: list[list[int]], n: int, params: SamplingParams) -> Rollout:
        raise NotImplementedError

    def sync_weights(self, model) -> None:
        raise NotImplementedError

    def generate_text(self, prompts: list[str], n: int, params: SamplingParams) -> Rollout:
        """``generate`` on text prompts (tokenized without added special tokens: a rendered
        chat template already holds them)."""
        return self.generate([self.tok(p, add_special_tokens=False).input_ids for p in prompts], n, params)

    def describe(self) -> str:
        return type(self).__name__

    # A backend may define ``score(mb, temperature) -> Tensor [b, T]`` (see FastEngine.score).

    @classmethod
    def build(cls, model, tokenizer, *, batch_size: int, bf16: bool, device: str = "cpu") -> Engine:
        """The engine of this backend for ``model`` (a backend may hand over to another one)."""
        return cls(model, tokenizer, batch_size=batch_size, bf16=bf16)

    @classmethod
    def frozen_scorer(cls, model, tokenizer, *, bf16: bool, device: str = "cpu") -> Engine | None:
        """An engine that keeps its own copy of a model that never trains (the KL reference)
        and scores with it, or None: then the model's forward pass scores."""
        return None


ENGINES: Registry = Registry("rollout.backend")


def hits_stop(tok, completion: list[int], strings: tuple[str, ...]) -> bool:
    """Whether the completion's last ``STOP_TAIL`` tokens, decoded, hold one of ``strings``."""
    if not strings:
        return False
    tail = tok.decode(completion[-STOP_TAIL:], skip_special_tokens=True)
    return any(s in tail for s in strings)


def cut_at_end(tok, ids: list[int], ends: set[int], strings: tuple[str, ...]) -> tuple[list[int], bool]:
    """``ids`` up to and including its first end token or the token that completes a stop
    string (the first prefix that :func:`hits_stop`), and whether it ended so."""
    for i, t in enumerate(ids):
        if t in ends or hits_stop(tok, ids[: i + 1], strings):
            return ids[: i + 1], True
    return ids, False


@ENGINES.register("hf")
class HFEngine(Engine):
    """Reference engine: ``transformers`` ``generate`` on left-padded batches, on whichever
    device the model is on. Log-probs come from the raw logits of each step (``output_logits``),
    under softmax(logits / temperature) with banned end tokens removed: the same distribution
    the fast engine reports."""

    def __init__(self, model, tokenizer, *, batch_size: int = 64, bf16: bool = False):
        self.model, self.tok, self.batch_size, self.bf16 = model, tokenizer, batch_size, bf16
        self.eos_ids = {tokenizer.eos_token_id} | set(_as_list(model.generation_config.eos_token_id))
        self._closing: list[int] | None = None  # the thinking budget's closing phrase, tokenized once

    def sync_weights(self, model) -> None:
        """``generate`` runs the model itself, so there is nothing to copy: only which model."""
        self.model = model

    def describe(self) -> str:
        return f"hf generate on {_device_of(self.model)}{', bf16 autocast' if self.bf16 else ''}"

    @torch.no_grad()
    def generate(self, prompt_ids: list[list[int]], n: int, params: SamplingParams) -> Rollout:
        tok = self.tok
        flat = [list(ids) for ids in prompt_ids for _ in range(n)]  # [N] with N = len(prompts) * n
        flat_text = tok.batch_decode(flat) if params.thinking_budget is not None else [""] * len(flat)
        ends = self.eos_ids | set(params.stop_ids)
        completions, truncated, logps, forced = [], [], [], []
        was_training = self.model.training
        self.model.eval()
        try:
            with device.seeded(params.seed, _device_of(self.model)):
                for s in range(0, len(flat), self.batch_size):
                    batch = flat[s: s + self.batch_size]
                    budget = self._budget(flat_text[s: s + self.batch_size], batch, params)
                    for ids, lp in zip(*self._generate_batch(batch, params, sorted(ends), budget)):
                        ids, stopped = cut_at_end(tok, ids, ends, params.stop_strings)
                        completions.append(ids)
                        logps.append(lp[: len(ids)])
                        truncated.append(not stopped)
                    if budget is not None:
                        forced += budget.finish(completions[s:])
        finally:
            self.model.train(was_training)
        texts = tok.batch_decode(completions, skip_special_tokens=True)
        return Rollout(prompt_ids=flat, completion_ids=completions, texts=texts, truncated=truncated, logps=logps,
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

    def _generate_batch(self, batch: list[list[int]], params: SamplingParams, ends: list[int],
                        budget=None) -> tuple[list[list[int]], list[list[float]]]:
        """Sampled tokens [b][T] and their log-probs [b][T] (T: the batch's longest run)."""
        pad = self.tok.pad_token_id
        width = max(len(x) for x in batch)
        dev = _device_of(self.model)
        input_ids = device.to(torch.tensor([[pad] * (width - len(x)) + x for x in batch]), dev)  # [b, P] left-padded
        attn = device.to(torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in batch]), dev)  # [b, P]
        greedy = params.temperature <= 0
        kwargs = dict(max_new_tokens=params.max_new_tokens, do_sample=not greedy, pad_token_id=pad,
                      eos_token_id=ends, min_new_tokens=params.min_new_tokens or None,
                      return_dict_in_generate=True, output_logits=True)
        if not greedy:
            kwargs.update(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k or None)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        if budget is not None:
            kwargs["logits_processor"] = [budget]
        with device.autocast(self.bf16, dev):
            out = self.model.generate(input_ids=input_ids, attention_mask=attn, **kwargs)
        toks = out.sequences[:, width:]  # [b, T]
        lp = torch.zeros(toks.shape, dtype=torch.float32, device=toks.device)  # [b, T]
        for t, raw in enumerate(out.logits):  # one [b, V] per step: no [b, T, V] copy
            z = raw.float() / (1.0 if greedy else params.temperature)
            if t < params.min_new_tokens:
                z[:, ends] = float("-inf")  # banned there, as generate bans them
            lp[:, t] = torch.log_softmax(z, -1).gather(-1, toks[:, t, None]).squeeze(-1)
        return toks.tolist(), lp.tolist()


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


def autocast(enabled: bool, dev: str = "cpu"):
    """bf16 autocast on ``dev``, or nothing (thinkrl/device.py)."""
    return device.autocast(enabled, dev)


def _device_of(model) -> str:
    return str(next(model.parameters()).device)


def _as_list(x) -> list:
    if x is None:
        return []
    return list(x) if isinstance(x, (list, tuple)) else [x]


def build_engine(name: str, model, tokenizer, *, batch_size: int, bf16: bool, device: str = "cpu") -> Engine:
    """The engine ``rollout.backend=name`` asks for, on ``device`` (where ``model`` already is).
    A backend may hand over to another one, with one log line saying why (``fast`` does for a
    model it cannot run exactly, and on CUDA), so that a new model never stops a run."""
    return ENGINES.get(name).build(model, tokenizer, batch_size=batch_size, bf16=bf16, device=device)


def engine_on(name: str, model, tokenizer, *, batch_size: int, dtype: str, device_name: str = "auto") -> Engine:
    """For the commands that only generate (eval, sample, difficulty): resolve the config's
    ``device`` and ``dtype``, put ``model`` there and build backend ``name``'s engine for it."""
    dev = device.resolve_device(device_name)
    device.setup(dev)
    return build_engine(name, model.to(dev), tokenizer, batch_size=batch_size, bf16=device.use_bf16(dtype, dev),
                        device=dev)


def build_scorer(name: str, model, tokenizer, *, bf16: bool, device: str = "cpu") -> Engine | None:
    """Backend ``name``'s scorer for a frozen model (its own copy of the weights), or None."""
    return ENGINES.get(name).frozen_scorer(model, tokenizer, bf16=bf16, device=device)


from thinkrl.rollout import fast as _fast  # noqa: E402,F401  (registers the "fast" backend)
