"""Calibration: punish confident wrong answers harder than hedged ones.

The notes in seeds/000 (on hallucination): if the answer is unhedged and wrong, punish it hard.
A hedge is an explicit statement of uncertainty in the *final answer* part of the response (after
``</think>``); doubt inside the chain of thought is ordinary reasoning and does not count.
"""

from __future__ import annotations

import re

from thinkrl.rewards.base import REWARDS
from thinkrl.rewards.length import judge_correct

_HEDGES = re.compile(
    r"\b(i'?m not (?:sure|certain)|not (?:sure|certain)|i (?:think|believe|guess)|probably|possibly|"
    r"maybe|perhaps|might be|may be|likely|unsure|uncertain|i don'?t know|my best guess|not confident)\b",
    re.IGNORECASE,
)


def final_part(completion: str) -> str:
    cut = completion.rfind("</think>")
    return completion[cut + len("</think>") :] if cut >= 0 else completion


def is_hedged(completion: str) -> bool:
    return bool(_HEDGES.search(final_part(completion)))


@REWARDS.register("hedging")
def hedging(
    completion: str,
    example,
    *,
    judge: str = "accuracy",
    hedge_cost: float = 0.25,
    wrong_confident: float = -1.0,
) -> float | None:
    """Correct: 1.0, or ``1 - hedge_cost`` if hedged. Wrong: 0.0 if hedged, ``wrong_confident``
    (-1.0) if stated with confidence. So for a wrong answer hedging pays, and for a right one it
    costs a little: the policy should hedge exactly when it is likely to be wrong.
    Correctness is the ``judge`` reward giving 1.0."""
    hedged = is_hedged(completion)
    if judge_correct(judge, completion, example):
        return 1.0 - hedge_cost if hedged else 1.0
    return 0.0 if hedged else wrong_confident
