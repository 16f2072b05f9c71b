"""Calibration: does the model's confidence in its own final answer match how often it is right?

The confidence of one answer is the model's probability of the answer's tokens, given the
prompt and the reasoning before them. Bin the answers by confidence, and compare each bin's
mean confidence with its accuracy. The expected calibration error (Naeini et al. 2015; Guo et
al. 2017) is the average gap, weighted by the share of answers in each bin:

    ECE = sum_b (n_b / n) * |acc_b - conf_b|

The reliability diagram plots acc_b against conf_b. A calibrated model lies on the diagonal.
The CS336 lecture (slide 14) notes that calibration is lost after RLHF.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

_ANSWER_SPAN = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def answer_confidence(ids: list[int], logps: list[float], tokenizer) -> float | None:
    """The model's probability of the text inside the last ``<answer>...</answer>`` of a
    completion: exp of the summed log-probs of the tokens that overlap it. None without an
    answer. Token boundaries come from decoding growing prefixes, so a token that spans the
    tag and the answer counts as part of the answer."""
    text = tokenizer.decode(ids, skip_special_tokens=True)
    spans = list(_ANSWER_SPAN.finditer(text))
    if not spans or len(logps) != len(ids):
        return None
    lo, hi = spans[-1].span(1)
    if hi <= lo:
        return None
    total, prev = 0.0, 0
    for i in range(len(ids)):
        end = len(tokenizer.decode(ids[: i + 1], skip_special_tokens=True))
        if end > lo and prev < hi:  # this token's characters [prev, end) overlap the answer
            total += logps[i]
        prev = end
        if prev >= hi:
            break
    return math.exp(total)


def bins_of(
    confidences: list[float], correct: list[bool], n_bins: int = 10
) -> list[tuple[int, float, float]]:
    """``(count, mean confidence, accuracy)`` of each equal-width bin over [0, 1]; the top bin
    includes 1.0."""
    if len(confidences) != len(correct):
        raise ValueError("confidences and correct differ in length")
    stats = [[0, 0.0, 0] for _ in range(n_bins)]
    for c, ok in zip(confidences, correct):
        if not 0.0 <= c <= 1.0:
            raise ValueError(f"confidence {c} is not a probability")
        b = min(int(c * n_bins), n_bins - 1)
        stats[b][0] += 1
        stats[b][1] += c
        stats[b][2] += int(bool(ok))
    return [(n, s / n if n else 0.0, k / n if n else 0.0) for n, s, k in stats]


def expected_calibration_error(confidences: list[float], correct: list[bool], n_bins: int = 10) -> float:
    n = len(confidences)
    if n == 0:
        return float("nan")
    return sum(cnt / n * abs(acc - conf) for cnt, conf, acc in bins_of(confidences, correct, n_bins) if cnt)


def reliability_diagram(
    curves: dict[str, tuple[list[float], list[bool]]], path: Path, n_bins: int = 10
) -> Path:
    """One line of accuracy against confidence per labelled set (e.g. before and after RL)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="calibrated")
    for label, (conf, ok) in curves.items():
        pts = [(c, a) for n, c, a in bins_of(conf, ok, n_bins) if n]
        ece = expected_calibration_error(conf, ok, n_bins)
        ax.plot([c for c, _ in pts], [a for _, a in pts], marker="o", label=f"{label} (ECE {ece:.3f})")
    ax.set_xlabel("confidence in the final answer")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_reliability(results: list[tuple[str, dict]], path: Path) -> Path | None:
    """The reliability diagram of ``thinkrl eval``'s results, one line per model (its first
    sample per question, the greedy one by default); None when no model had a confidence, for
    example where the engine returns no log-probs."""
    curves: dict[str, tuple[list[float], list[bool]]] = {}
    for i, (name, res) in enumerate(results):
        have = [
            (r["confidence"], r["correct"] == 1.0) for r in res["records"] if r.get("confidence") is not None
        ]
        if have:
            label = name if name not in curves else f"{name} (#{i + 1})"  # a model may be listed twice
            curves[label] = ([c for c, _ in have], [ok for _, ok in have])
    return reliability_diagram(curves, path) if curves else None
