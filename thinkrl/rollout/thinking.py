"""Thinking budgets: a cap on how many tokens a model may think before it answers.

Qwen3 (Qwen3 technical report, 2025, "thinking budget") stops the thinking of a model that
reaches a user-set number of thinking tokens, inserts a fixed instruction that ends the
thinking block, and lets the model write its answer from the reasoning it has so far.
Accuracy then rises smoothly with the budget, which is the curve ``thinkrl eval
thinking_budget=...`` draws. (s1, Muennighoff et al. 2025, "budget forcing", caps thinking
the same way.)

One engine-agnostic piece of bookkeeping lives here, :class:`BudgetTracker`: per sequence it
follows ``<think>`` ... ``</think>`` in the generated text and says when the next tokens
must be the closing phrase instead of sampled ones. Both engines obey it: the fast engine in
its decode loop, the ``hf`` engine through :class:`BudgetLogitsProcessor`. Forced tokens are
marked, so that a trainer can leave them out of the policy loss (the policy did not choose
them); their log-probs are still the model's own.
"""

from __future__ import annotations

import torch
from transformers import LogitsProcessor

OPEN, CLOSE = "<think>", "</think>"
# What the engine writes into a row whose thinking reached the budget (Qwen3's wording,
# shortened): it ends the thinking block and asks for the answer.
CLOSING_PHRASE = ("\n\nConsidering the limited time, I have to give the solution based on the thinking "
                  "directly now.\n</think>\n\n")

BEFORE, THINKING, FORCING, AFTER = range(4)  # a row's phase


def check_budget(budget) -> None:
    """A budget is None (no cap) or a whole number of tokens >= 0 (0: close at once)."""
    from thinkrl.config import ConfigError

    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 0):
        raise ConfigError(f"thinking_budget must be a whole number of tokens >= 0 (or unset), got {budget!r}")


def closing_ids(tokenizer) -> list[int]:
    """:data:`CLOSING_PHRASE` as token ids (an engine does this once and keeps them)."""
    return tokenizer(CLOSING_PHRASE, add_special_tokens=False).input_ids


def thinking_open(prompt: str) -> bool:
    """Whether ``prompt`` ends inside a thinking block: its last ``<think>`` comes after its
    last ``</think>`` (R1-Zero's template and a ``<think>`` prefill end so; Qwen3's
    enable_thinking=False prompt ends with an empty, closed block)."""
    return prompt.rfind(OPEN) > prompt.rfind(CLOSE)


class BudgetTracker:
    """Which rows of a batch are thinking, for how long, and what to force next.

    A row is BEFORE its thinking until ``<think>`` appears (in its prompt's end, or generated),
    THINKING while it counts the tokens it generates after the tag, FORCING while the closing
    phrase is being written into it (one token per step), and AFTER once ``</think>`` was
    written by the model or by the phrase. The budget caps the first thinking block only: a
    later ``<think>`` is left alone.

    Tags are looked for in decoded text, not in token ids: a tokenizer that has no single
    token for ``</think>`` (byte-level ones, SmolLM2's) can write it in more than one way.
    """

    def __init__(self, tokenizer, budget: int, prompts: list[str], phrase: list[int]):
        check_budget(budget)
        self.tok, self.budget, self.phrase = tokenizer, budget, phrase
        # tokens that always hold a whole tag: the longest tag's tokens, plus slack for a
        # token that starts before the tag or ends after it
        self.tail = max(len(tokenizer(t, add_special_tokens=False).input_ids) for t in (OPEN, CLOSE)) + 2
        self.phase = [BEFORE] * len(prompts)
        self.count = [0] * len(prompts)  # THINKING: tokens thought so far; FORCING: phrase tokens written
        self.forced: list[list[bool]] = [[] for _ in prompts]  # per row: which generated tokens were forced
        for r, p in enumerate(prompts):
            if thinking_open(p):
                self._start_thinking(r)

    def _start_thinking(self, r: int) -> None:
        self.phase[r], self.count[r] = THINKING, 0
        if self.budget == 0:
            self.phase[r] = FORCING

    def next_forced(self, r: int) -> int | None:
        """The token row ``r`` must emit next, or None if it samples."""
        return self.phrase[self.count[r]] if self.phase[r] == FORCING else None

    def observe(self, r: int, toks: list[int]) -> None:
        """Row ``r`` has just emitted ``toks[-1]`` (``toks``: its generated tokens so far, or
        at least their last ``self.tail``)."""
        phase = self.phase[r]
        self.forced[r].append(phase == FORCING)
        if phase == BEFORE:
            if OPEN in self._text(toks[-self.tail:]):
                self._start_thinking(r)
        elif phase == THINKING:
            self.count[r] += 1
            if CLOSE in self._text(toks[-min(self.tail, self.count[r]):]):  # only tokens since the opening
                self.phase[r] = AFTER
            elif self.count[r] >= self.budget:
                self.phase[r], self.count[r] = FORCING, 0
        elif phase == FORCING:
            self.count[r] += 1
            if self.count[r] == len(self.phrase):
                self.phase[r] = AFTER

    def _text(self, toks: list[int]) -> str:
        return self.tok.decode(toks, skip_special_tokens=False)


def forced_logps(logits: torch.Tensor, forced: torch.Tensor, temperature: float,
                 banned: torch.Tensor | None = None) -> torch.Tensor:
    """Log-probs [b] of the ``forced`` tokens [b] under the distribution the engine samples
    from, softmax(logits / temperature) with ``banned`` tokens removed (temperature 1 for
    greedy decoding, as the engine reports there). ``logits`` [b, V] is not modified."""
    z = logits.float() / (temperature if temperature > 0 else 1.0)  # a copy
    if banned is not None:
        z[:, banned] = float("-inf")
    return torch.log_softmax(z, -1).gather(-1, forced[:, None]).squeeze(-1)


class BudgetLogitsProcessor(LogitsProcessor):
    """A ``transformers`` logits processor that makes ``generate`` obey a :class:`BudgetTracker`:
    at each step it tells the tracker what each row emitted last, then leaves only the forced
    token possible in the rows that must write the closing phrase (probability 1 under any
    temperature, top-k or top-p). ``width``: the left-padded prompt length of the batch."""

    def __init__(self, tracker: BudgetTracker, width: int):
        self.tracker, self.width = tracker, width
        self.rows: list[list[int]] = [[] for _ in tracker.phase]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if input_ids.shape[1] > self.width:  # the previous step's tokens
            for r, t in enumerate(input_ids[:, -1].tolist()):
                self.rows[r].append(t)
                self.tracker.observe(r, self.rows[r])
        for r in range(scores.shape[0]):
            t = self.tracker.next_forced(r)
            if t is not None:
                scores[r] = float("-inf")
                scores[r, t] = 0.0
        return scores

    def finish(self, completions: list[list[int]]) -> list[list[bool]]:
        """The forced-token masks of the batch's final ``completions``: the last token the
        processor never saw (``generate`` stops right after choosing it) is read off the
        forcing state, and rows are cut to their completion's length."""
        out = []
        for r, comp in enumerate(completions):
            mask = self.tracker.forced[r] + [self.tracker.phase[r] == FORCING]
            out.append(mask[: len(comp)])
        return out
