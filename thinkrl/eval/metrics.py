"""Evaluation statistics: pass@k, maj@k, and how often the thinking reflects.

Pure functions on plain Python values, so each can be checked by hand.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

from thinkrl.tasks import normalize_answer


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are right (Chen et al. 2021, "Codex", eq. 1):

        pass@k = 1 - C(n - c, k) / C(n, k)

    computed as ``1 - prod_{i = n-c+1}^{n} (1 - k / i)``, a product of terms in (0, 1]
    that never forms the huge binomials. When n - c < k every k-subset holds a right one.
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def vote_key(answer: str) -> str:
    """What two answers must share to count as the same vote: the normalised text, and
    numbers compared by value (``"3.0"``, ``"3"`` and ``"3.00"`` are one vote)."""
    s = normalize_answer(answer)
    t = s.replace(",", "")
    try:
        d = Decimal(t)
    except InvalidOperation:
        return s
    if not d.is_finite():
        return s
    return format(d.normalize() + 0, "f")  # + 0 turns -0 into 0


def majority_vote(answers: list[str | None]) -> int | None:
    """Index of the sample whose answer wins the vote, or None if no sample gave an answer.

    Samples without an answer do not vote. Tie rule: among the answers with the most
    votes, the one given first (lowest sample index) wins, and the index returned is
    that answer's first sample. maj@k is then whether that sample is right.
    """
    counts: dict[str, int] = {}
    first: dict[str, int] = {}
    for i, a in enumerate(answers):
        if a is None or a.strip() == "":
            continue
        key = vote_key(a)
        counts[key] = counts.get(key, 0) + 1
        first.setdefault(key, i)
    if not counts:
        return None
    best = max(counts.values())
    return min(first[key] for key, c in counts.items() if c == best)


_THINK = re.compile(r"<think>(.*?)(?:</think>|<answer>|$)", re.DOTALL)


def thinking_text(completion: str) -> str:
    """The reasoning part: inside <think>...</think> (up to <answer> or the end if the tag is
    never closed); a completion with no <think> tag counts as all thinking up to <answer>."""
    m = _THINK.search(completion)
    if m:
        return m.group(1)
    return completion.split("<answer>", 1)[0]


def reflection_pattern(words) -> re.Pattern:
    """Whole-word, case-insensitive matches of any phrase; spaces in a phrase match any whitespace."""
    alts = sorted(
        (re.escape(w.strip()).replace(r"\ ", r"\s+") for w in words if w.strip()), key=len, reverse=True
    )
    if not alts:
        return re.compile(r"(?!)")  # no phrases: never matches
    return re.compile(r"(?<![\w-])(?:" + "|".join(alts) + r")(?![\w-])", re.IGNORECASE)


def reflection_count(completion: str, pattern: re.Pattern) -> int:
    return len(pattern.findall(thinking_text(completion)))


def reflection_stats(completions: list[str], words) -> dict:
    """``reflection_rate``: share of completions whose thinking has at least one reflection
    phrase; ``reflection_per_response``: mean number of such phrases."""
    if not completions:
        return {"reflection_rate": float("nan"), "reflection_per_response": float("nan")}
    pat = reflection_pattern(words)
    counts = [reflection_count(c, pat) for c in completions]
    return {
        "reflection_rate": sum(1 for c in counts if c) / len(counts),
        "reflection_per_response": sum(counts) / len(counts),
    }
