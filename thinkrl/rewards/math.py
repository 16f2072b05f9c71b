"""Answer-checking rewards: the task's own check, math-verify, exact/numeric, multiple choice.

Which one to use is a statement about the task. ``math`` accepts anything *symbolically* equal to
the reference, which is right for competition maths (``\\frac{1}{2}`` = ``0.5``) and a loophole for
arithmetic: math-verify counts an unevaluated ``965/5`` as ``193``, so a policy can copy the
question instead of computing. ``exact`` compares normalised strings or exact decimal numbers and
never evaluates anything; ``choice`` compares option letters.
"""

from __future__ import annotations

import os
import re
from functools import lru_cache
from pathlib import Path

from thinkrl.rewards.base import REWARDS, RewardFailure, extract_answer, extract_final, parallel

# ---------------------------------------------------------------------------
# The task's own check (R1-Zero's rule-based accuracy reward)


@REWARDS.register("accuracy")
def accuracy(completion: str, example) -> float | None:
    """1.0 if the answer inside <answer></answer> passes the task's own check, else 0.0.

    A completion without an answer tag is wrong. A task that judges whole completions (code
    tasks run the program) provides ``score_completion`` and decides alone.
    """
    own = getattr(example.source, "score_completion", None)
    if own is not None:
        return own(completion, example)
    pred = extract_answer(completion)
    if pred is None or pred == "":
        return 0.0
    if example.source is None:
        return None
    return 1.0 if example.source.check(pred, example) else 0.0


# ---------------------------------------------------------------------------
# math-verify, in sandboxed workers with a hard deadline


@lru_cache(maxsize=1)
def _math_pool():
    from thinkrl.sandbox import Limits
    from thinkrl.sandbox.worker import WorkerPool

    script = (Path(__file__).parent / "_math_worker.py").read_text()
    return WorkerPool(script, size=os.cpu_count() or 1, limits=Limits(cpu_s=0, memory_mb=2048, nproc=8))


def math_equal(gold: str, pred: str, timeout: float = 5.0) -> bool:
    """math-verify's verdict, or :class:`RewardFailure` if it takes longer than ``timeout`` s."""
    from thinkrl.sandbox.worker import WorkerCrashed, WorkerTimeout

    try:
        out = _math_pool().call({"gold": gold, "pred": pred}, timeout)
    except WorkerTimeout:
        raise RewardFailure("timeout") from None
    except (WorkerCrashed, ValueError):
        raise RewardFailure("crashed") from None
    if "error" in out:
        raise RewardFailure("memory" if out["error"].startswith("MemoryError") else "error")
    return out["ok"]


@REWARDS.register("math")
@parallel
def math_reward(completion: str, example, *, timeout: float = 5.0) -> float | None:
    r"""1.0 if the final answer (``<answer>`` or the last ``\boxed{}``) is mathematically equal to
    ``example.answer`` according to math-verify; 0.0 if wrong or missing. Symbolic: see the module
    docstring for when ``exact`` is the right choice instead."""
    pred = extract_final(completion)
    if not pred:
        return 0.0
    return 1.0 if math_equal(example.answer, pred, timeout) else 0.0


# ---------------------------------------------------------------------------
# Exact / numeric

_NUM = re.compile(r"^[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?$")


@REWARDS.register("exact")
def exact(completion: str, example) -> float | None:
    """1.0 if the final answer equals ``example.answer`` after light normalisation, or both are
    the same number written as a literal (``3.0`` = ``3``, ``1,000`` = ``1000``). Nothing is
    evaluated: ``965/5`` is not ``193`` and ``9**9**9**9`` is just a wrong string."""
    from thinkrl.tasks import answers_match

    pred = extract_final(completion)
    if not pred:
        return 0.0
    return 1.0 if answers_match(pred, example.answer) else 0.0


# ---------------------------------------------------------------------------
# Multiple choice

_LETTER = re.compile(r"^\(?([A-Z])\)?(?:[.:)]|\s|$)")
_STATED = re.compile(r"(?:answer|option|choice)\s*(?:is|:)?\s*\(?([A-Z])\)?\b", re.IGNORECASE)


def choice_letter(text: str) -> str | None:
    """``B``, ``(B)``, ``B)``, ``B. text``, ``The answer is B`` -> ``B``; anything else -> None."""
    text = text.strip()
    found = _STATED.findall(text)
    if found:
        return found[-1].upper()
    m = _LETTER.match(text)
    return m.group(1) if m else None


@REWARDS.register("choice")
def choice(completion: str, example) -> float | None:
    """1.0 if the chosen option letter equals the reference letter. Exactly one letter counts:
    an answer that lists several options (``A or C``) is wrong, not lucky."""
    gold = choice_letter(example.answer)
    if gold is None:
        return None  # the reference is not an option letter: this reward cannot judge it
    pred = extract_final(completion)
    if not pred:
        return 0.0
    letters = set(re.findall(r"\b([A-Z])\b", pred))
    if len(letters) > 1 and not _STATED.search(pred):
        return 0.0
    return 1.0 if choice_letter(pred) == gold else 0.0
