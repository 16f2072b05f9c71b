"""The rollout protocol: sampling parameters, the rollout a backend returns, the :class:`Engine`
every backend implements and the registry of backends (``rollout.backend=NAME``). See
``thinkrl/rollout/__init__.py`` for the protocol in full."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields

from thinkrl.errors import ConfigError
from thinkrl.registry import Registry

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
    # s1's "Wait" extension: no closing of the thinking before this many thinking tokens
    # (thinkrl/rollout/thinking.py). 0: no minimum.
    min_thinking: int = 0
    # Sampling seed of this call: the same seed gives the same samples, and the process's random
    # state is left as it was. None: draw from (and advance) the process's random state.
    seed: int | None = None
    # Stop strings (str) and stop token ids (int). A completion ends with the token that
    # completes a stop string, or with a stop token, like with EOS: it is then not truncated.
    stop: tuple[str | int, ...] = ()

    @property
    def shapes_thinking(self) -> bool:
        """Whether the engine must follow each row's thinking (a budget or a minimum)."""
        return self.thinking_budget is not None or self.min_thinking > 0

    def __post_init__(self):
        if self.thinking_budget is not None:
            from thinkrl.rollout.thinking import check_budget

            check_budget(self.thinking_budget)
        if (
            isinstance(self.min_thinking, bool)
            or not isinstance(self.min_thinking, int)
            or self.min_thinking < 0
        ):
            raise ConfigError(
                f"min_thinking must be a whole number of tokens >= 0, got {self.min_thinking!r}"
            )
        self.stop = tuple([self.stop] if isinstance(self.stop, (str, int)) else self.stop)
        bad = [s for s in self.stop if isinstance(s, bool) or not isinstance(s, (str, int)) or s == ""]
        if bad:
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
    # Multi-turn episodes (thinkrl/envs): completion_ids hold the policy's turns and the
    # environment's observations in order; loss_mask is 1 on the policy's tokens, 0 on the
    # observations' (never trained on), and ``episodes`` the turn-by-turn records. None: one turn.
    loss_mask: list[list[int]] | None = None
    episodes: list[dict] | None = None

    def rows(self, index: list[int]) -> Rollout:
        """The rollout of the sequences ``index``, every per-sequence field kept."""
        return Rollout(
            **{
                f.name: None if (v := getattr(self, f.name)) is None else [v[i] for i in index]
                for f in fields(self)
            }
        )

    @staticmethod
    def concat(items: list[Rollout]) -> Rollout:
        """Sequences of ``items`` one after another; a field some items lack becomes None."""

        def cat(name):
            parts = [getattr(it, name) for it in items]
            return None if any(x is None for x in parts) else [y for x in parts for y in x]

        return Rollout(**{f.name: cat(f.name) for f in fields(Rollout)})


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
