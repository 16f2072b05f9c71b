"""Length and repetition rewards: Kimi k1.5's group length reward, DAPO's soft overlong
penalty, and an n-gram repetition penalty."""

from __future__ import annotations

from thinkrl.rewards.base import REWARDS, group_reward, resolve


def judge_correct(judge: str, completion: str, example) -> bool:
    """Correct means the ``judge`` reward (a registered name) gives a full 1.0. Its failures
    propagate, so ``RewardModel`` counts them."""
    value = resolve(judge)(completion, example)
    return value is not None and value >= 1.0


@REWARDS.register("kimi_length")
@group_reward
def kimi_length(
    completions: list[str], examples: list, *, num_tokens: list | None = None, judge: str = "accuracy"
) -> list[float]:
    """Kimi k1.5 (Kimi Team 2025, section 2.3.3), per group of responses to one prompt:

        lambda_i = 0.5 - (len_i - min_len) / (max_len - min_len)
        reward_i = lambda_i if correct else min(0, lambda_i)

    so among correct answers shorter is better, and a wrong answer is never rewarded for being
    short. Lengths are tokens when the trainer passes ``num_tokens``, else characters. A group
    whose responses all have the same length scores 0 (the formula divides by zero there).
    """
    lens = list(num_tokens) if num_tokens is not None else [len(c) for c in completions]
    lo, hi = min(lens), max(lens)
    if hi == lo:
        return [0.0] * len(completions)
    out = []
    for text, ex, n in zip(completions, examples, lens):
        lam = 0.5 - (n - lo) / (hi - lo)
        try:
            correct = judge_correct(judge, text, ex)
        except Exception:  # an unverifiable answer is not a correct one
            correct = False
        out.append(lam if correct else min(0.0, lam))
    return out


@REWARDS.register("overlong")
def overlong(
    completion: str,
    example,
    *,
    num_tokens: int | None = None,
    max_tokens: int | None = None,
    buffer: int | None = None,
) -> float | None:
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13), with L_max = ``max_tokens`` and
    L_cache = ``buffer`` (default a quarter of L_max):

        0                              if |y| <= L_max - L_cache
        ((L_max - L_cache) - |y|) / L_cache   if L_max - L_cache < |y| <= L_max
        -1                             if |y| > L_max

    Needs the token counts from the trainer; without them it cannot judge (None).
    """
    if num_tokens is None or max_tokens is None:
        return None
    cache = buffer if buffer is not None else max(1, max_tokens // 4)
    if cache <= 0 or cache > max_tokens:
        raise ValueError(f"overlong reward: buffer must be in 1..max_tokens ({max_tokens}), got {cache}")
    safe = max_tokens - cache
    if num_tokens <= safe:
        return 0.0
    if num_tokens <= max_tokens:
        return (safe - num_tokens) / cache
    return -1.0


@REWARDS.register("repetition")
def repetition(completion: str, example, *, n: int = 3, max_penalty: float = 1.0) -> float | None:
    """``-max_penalty * (repeated n-grams / all n-grams)`` over whitespace words, in [-max_penalty, 0].

    An n-gram is "repeated" for every occurrence after its first, so a text that says one
    sentence ten times scores near -max_penalty, and one with no repeated n-gram scores 0.
    Texts shorter than n words have nothing to repeat (0.0).
    """
    words = completion.split()
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    if not grams:
        return 0.0
    return -max_penalty * (len(grams) - len(set(grams))) / len(grams)
