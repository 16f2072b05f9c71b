"""Verifiable rewards. Every reward has one signature::

    fn(completion: str, example: Example) -> float | None

``completion`` is the whole response (including any prefill such as ``<think>``).
``None`` means "cannot judge this one"; it scores 0 and is counted. A reward that
raises also scores 0 and is counted: a broken verifier never stops a run.
"""

from __future__ import annotations

import logging
import re
from collections import Counter

from thinkrl.registry import Registry

log = logging.getLogger(__name__)

REWARDS: Registry = Registry("reward")

_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
# Inside each block, no tag of either kind may appear (no nesting, no stray closers).
_NO_TAG = r"(?:(?!</?(?:think|answer)>).)+"
_FORMAT = re.compile(rf"^\s*<think>{_NO_TAG}</think>\s*<answer>{_NO_TAG}</answer>\s*$", re.DOTALL)


def extract_answer(completion: str) -> str | None:
    """The text inside the last ``<answer>...</answer>``, stripped; None if there is none."""
    found = _ANSWER.findall(completion)
    return found[-1].strip() if found else None


@REWARDS.register("accuracy")
def accuracy(completion: str, example) -> float | None:
    """1.0 if the answer inside <answer></answer> passes the task's own check, else 0.0.

    A completion without an answer tag is wrong (R1-Zero's rule-based accuracy reward).
    """
    pred = extract_answer(completion)
    if pred is None or pred == "":
        return 0.0
    if example.source is None:
        return None
    return 1.0 if example.source.check(pred, example) else 0.0


@REWARDS.register("format")
def format_reward(completion: str, example) -> float | None:
    """1.0 for exactly ``<think>...</think> <answer>...</answer>`` and nothing else around it."""
    return 1.0 if _FORMAT.match(completion) else 0.0


class RewardModel:
    """Weighted sum of named rewards, with per-reward values and failure counts kept apart."""

    def __init__(self, weights: dict[str, float]):
        self.weights = dict(weights)
        self.fns = {name: REWARDS.get(name) for name in self.weights}
        self.failures: Counter = Counter()

    def score(self, completions: list[str], examples: list) -> tuple[list[float], dict[str, list[float]]]:
        """Return the total reward per completion and each named reward per completion."""
        parts: dict[str, list[float]] = {name: [] for name in self.fns}
        for text, ex in zip(completions, examples):
            for name, fn in self.fns.items():
                try:
                    value = fn(text, ex)
                except Exception as e:  # a verifier bug must not end a run: score 0, count it
                    self.failures[f"{name}/error"] += 1
                    log.debug("reward %s raised %r", name, e)
                    value = 0.0
                if value is None:
                    self.failures[f"{name}/skipped"] += 1
                    value = 0.0
                parts[name].append(float(value))
        totals = [sum(self.weights[n] * parts[n][i] for n in parts) for i in range(len(completions))]
        return totals, parts
