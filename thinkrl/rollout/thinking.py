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
CLOSING_PHRASE = (
    "\n\nConsidering the limited time, I have to give the solution based on the thinking "
    "directly now.\n</think>\n\n"
)

# What the "Wait" extension writes where a row would close its thinking too early (s1).
WAIT_PHRASE = " Wait,"

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
    THINKING while it counts the tokens it generates after the tag, FORCING while a phrase is
    being written into it (one token per step), and AFTER once ``</think>`` was written by the
    model or by the closing phrase. The budget caps the first thinking block only: a later
    ``<think>`` is left alone.

    ``min_thinking`` is s1's "Wait" extension (Muennighoff et al. 2025, budget forcing): a row
    that has thought fewer tokens than that may not close its thinking yet. At such a step,
    if the most likely next token would start ``</think>`` (one of ``close_starts``), the
    engine writes :data:`WAIT_PHRASE` instead and the row goes on thinking; otherwise those
    tokens are banned for that step (:meth:`must_think`). ``budget`` None: no cap, only the
    minimum.

    Tags are looked for in decoded text, not in token ids: a tokenizer that has no single
    token for ``</think>`` (byte-level ones, SmolLM2's) can write it in more than one way.
    """

    def __init__(
        self,
        tokenizer,
        budget: int | None,
        prompts: list[str],
        phrase: list[int],
        *,
        min_thinking: int = 0,
        wait: list[int] | None = None,
        close_starts: list[int] | None = None,
    ):
        check_budget(budget)
        self.tok, self.budget, self.phrase = tokenizer, budget, phrase
        self.min_thinking, self.wait = min_thinking, wait or []
        self.close_starts = close_starts or []
        if min_thinking and not (self.wait and self.close_starts):
            raise ValueError("min_thinking needs the wait phrase and the closing tag's first tokens")
        # tokens that always hold a whole tag: the longest tag's tokens, plus slack for a
        # token that starts before the tag or ends after it
        self.tail = max(len(tokenizer(t, add_special_tokens=False).input_ids) for t in (OPEN, CLOSE)) + 2
        self.phase = [BEFORE] * len(prompts)
        self.thought = [0] * len(prompts)  # tokens since the opening tag (forced ones included)
        self.writing: list[list[int]] = [[] for _ in prompts]  # FORCING: the phrase being written
        self.pos = [0] * len(prompts)  # FORCING: phrase tokens written so far
        self.forced: list[list[bool]] = [[] for _ in prompts]  # per row: which generated tokens were forced
        self.waits = [0] * len(prompts)  # Wait phrases written per row
        for r, p in enumerate(prompts):
            if thinking_open(p):
                self._start_thinking(r)

    def _start_thinking(self, r: int) -> None:
        self.phase[r], self.thought[r] = THINKING, 0
        if self.budget == 0:
            self._force(r, self.phrase)

    def _force(self, r: int, phrase: list[int]) -> None:
        self.phase[r], self.writing[r], self.pos[r] = FORCING, phrase, 0

    def must_think(self, r: int) -> bool:
        """Whether row ``r`` is thinking and under ``min_thinking``: it may not close yet."""
        return self.phase[r] == THINKING and self.thought[r] < self.min_thinking

    def next_forced(self, r: int, logits: torch.Tensor | None = None) -> int | None:
        """The token row ``r`` must emit next, or None if it samples. ``logits`` [V]: the row's
        next-token logits, which the "Wait" extension reads (see the class docstring)."""
        if logits is not None and self.must_think(r) and int(logits.argmax()) in self.close_starts:
            self._force(r, self.wait)
            self.waits[r] += 1
        return self.writing[r][self.pos[r]] if self.phase[r] == FORCING else None

    def observe(self, r: int, toks: list[int]) -> None:
        """Row ``r`` has just emitted ``toks[-1]`` (``toks``: its generated tokens so far, or
        at least their last ``self.tail``)."""
        phase = self.phase[r]
        self.forced[r].append(phase == FORCING)
        if phase == BEFORE:
            if OPEN in self._text(toks[-self.tail :]):
                self._start_thinking(r)
        elif phase == THINKING:
            self.thought[r] += 1
            if CLOSE in self._text(toks[-min(self.tail, self.thought[r]) :]):  # only tokens since the opening
                self.phase[r] = AFTER
            elif self.budget is not None and self.thought[r] >= self.budget:
                self._force(r, self.phrase)
        elif phase == FORCING:
            self.thought[r] += 1
            self.pos[r] += 1
            if self.pos[r] == len(self.writing[r]):
                # the closing phrase ends the thinking; the Wait phrase goes back to it
                self.phase[r] = AFTER if self.writing[r] is self.phrase else THINKING
                if self.phase[r] == THINKING and self.budget is not None and self.thought[r] >= self.budget:
                    self._force(r, self.phrase)

    def _text(self, toks: list[int]) -> str:
        return self.tok.decode(toks, skip_special_tokens=False)


def budget_tracker(tokenizer, params, prompts: list[str], cached: dict | None = None):
    """A :class:`BudgetTracker` for ``params`` (its ``thinking_budget`` and ``min_thinking``)
    over a batch's prompts, and the phrases' token ids, which an engine keeps (``cached``) so
    they are tokenized once."""
    if cached is None:
        cached = {
            "closing": closing_ids(tokenizer),
            "wait": wait_ids(tokenizer),
            "close_starts": close_start_ids(tokenizer),
        }
    tracker = BudgetTracker(
        tokenizer,
        params.thinking_budget,
        prompts,
        cached["closing"],
        min_thinking=params.min_thinking,
        wait=cached["wait"],
        close_starts=cached["close_starts"],
    )
    return tracker, cached


def wait_ids(tokenizer) -> list[int]:
    """:data:`WAIT_PHRASE` as token ids."""
    return tokenizer(WAIT_PHRASE, add_special_tokens=False).input_ids


def close_start_ids(tokenizer) -> list[int]:
    """The tokens a model can start ``</think>`` with: the first token holding ``<`` of the
    tag's tokenization after nothing, a space and line breaks (byte-level tokenizers merge the
    space or line break into the tag's first token; Qwen3 has one token for the tag)."""
    out = []
    for lead in ("", " ", "\n", "\n\n"):
        for t in tokenizer(lead + CLOSE, add_special_tokens=False).input_ids:
            if "<" in tokenizer.decode([t]):
                out.append(t)
                break
    return sorted(set(out))


def forced_logps(
    logits: torch.Tensor, forced: torch.Tensor, temperature: float, banned: torch.Tensor | None = None
) -> torch.Tensor:
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
            t = self.tracker.next_forced(r, scores[r])
            if t is not None:
                scores[r] = float("-inf")
                scores[r, t] = 0.0
            elif self.tracker.must_think(r):
                scores[r, self.tracker.close_starts] = float("-inf")
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
