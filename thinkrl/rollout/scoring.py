"""Render, generate, score: the one path from examples to scored completions.

Training (thinkrl/trainer/rl.py), held-out evaluation (thinkrl/eval), difficulty labels
(thinkrl/sampling/difficulty.py) and rejection sampling (thinkrl/pipeline/sample.py) all
sample through :func:`sample_and_score`, so a reward sees the same thing in each: the
template's prefill joined to the completion, with its token count and truncation flag.
Multi-turn episodes have their own loop (thinkrl/envs/episodes.py).

Rows of the result: the ``n`` samples of example ``q`` are rows ``q*n .. q*n + n - 1``.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Iterator

from thinkrl.progress import progress_bar
from thinkrl.rollout.base import Rollout, SamplingParams
from thinkrl.sampling.dynamic import Groups
from thinkrl.tasks.templates import render_prompt


def sample_and_score(
    engine,
    tok,
    examples: list,
    task_cfg,
    n: int,
    params: SamplingParams,
    rewards,
    *,
    group_seeds: Iterator[int] | None = None,
    timings: dict | None = None,
    progress: str | None = None,
) -> Groups:
    """``n`` completions of each example's rendered prompt, scored by ``rewards`` (a
    :class:`thinkrl.rewards.RewardModel`).

    - ``group_seeds``: one engine call per example, each with the next seed
      (``distributed.seed_by_group``); None: one call with ``params.seed``.
    - ``timings``: the seconds spent are added to its ``time_generate`` and ``time_score``.
    - ``progress``: the label of a progress bar over the prompts (silent off a terminal);
      the prompts then go to the engine in up to ``BAR_CALLS`` calls of a multiple of
      :func:`exact_chunk` prompts, which sample the same tokens as one call. None: no bar.
    """
    timings = {} if timings is None else timings
    t0 = time.perf_counter()
    rendered = [render_prompt(ex.question, tok, task_cfg) for ex in examples]  # [n_ex] (prompt, prefill)
    ro = _generate(engine, [r[0] for r in rendered], n, params, group_seeds, progress)
    timings["time_generate"] = timings.get("time_generate", 0.0) + time.perf_counter() - t0
    t0 = time.perf_counter()
    g = score_rollout(rewards, examples, rendered, ro, n, max_tokens=params.max_new_tokens)
    timings["time_score"] = timings.get("time_score", 0.0) + time.perf_counter() - t0
    return g


def score_rollout(rewards, examples: list, rendered: list, ro: Rollout, n: int, *, max_tokens: int) -> Groups:
    """Score ``ro`` (``n`` completions per example): each reward sees prefill + completion,
    and the ones that ask get each completion's token count, its truncation flag and the cap."""
    texts = [rendered[i // n][1] + t for i, t in enumerate(ro.texts)]  # [N] N = n_ex * n
    totals, parts = rewards.score(
        texts,
        [ex for ex in examples for _ in range(n)],  # [N]
        group_size=n,
        context={
            "num_tokens": [len(c) for c in ro.completion_ids],
            "max_tokens": max_tokens,
            "truncated": list(ro.truncated),
        },
    )
    return Groups(examples, rendered, ro, texts, totals, parts)


# At most this many engine calls behind a progress bar, so that a backend that batches a whole
# call itself (vllm) still gets large calls.
BAR_CALLS = 20


def exact_chunk(batch_size: int, n: int) -> int:
    """Prompts per engine call that split the prompts only where both built-in engines split
    them anyway: ``fast`` every ``batch_size // n`` prompts, ``hf`` every ``batch_size`` rows
    (``n`` rows a prompt). The chunks then run in the same order on the same random state,
    so the calls, one after another, sample exactly the tokens of one call."""
    b = max(1, batch_size)
    return math.lcm(b // math.gcd(b, n), max(1, b // n))


def _generate(engine, prompts: list[str], n: int, params: SamplingParams, group_seeds, progress) -> Rollout:
    if group_seeds is not None:  # one call per group, each with its own seed
        calls = [([p], dataclasses.replace(params, seed=next(group_seeds))) for p in prompts]
    elif progress is not None and params.seed is None and getattr(engine, "batch_size", None):
        c = exact_chunk(engine.batch_size, n)
        step = c * max(1, math.ceil(len(prompts) / (c * BAR_CALLS)))  # a multiple of c: still exact
        calls = [(prompts[s : s + step], params) for s in range(0, len(prompts), step)] or [(prompts, params)]
    else:  # a seeded call is one call: chunks would each restart the seed
        calls = [(prompts, params)]
    if progress is None:
        parts = [engine.generate_text(ps, n, pp) for ps, pp in calls]
    else:
        with progress_bar(len(prompts), progress, unit="prompt") as bar:
            parts = []
            for ps, pp in calls:
                parts.append(engine.generate_text(ps, n, pp))
                bar.update(len(ps))
    return parts[0] if len(parts) == 1 else Rollout.concat(parts)


# ---------------------------------------------------------------------------
# Statistics of scored groups, shared by the training metrics and the eval summary


def completion_stats(g: Groups) -> dict:
    """Accuracy, format rate, lengths (tokens) and truncation over every completion of ``g``
    (NaN for a reward ``g`` was not scored with)."""
    N = len(g.totals)
    lengths = [len(c) for c in g.ro.completion_ids]  # [N]
    acc, fmt = g.parts.get("accuracy"), g.parts.get("format")
    return {
        "accuracy": sum(acc) / N if acc is not None else float("nan"),
        "format_rate": sum(fmt) / N if fmt is not None else float("nan"),
        "response_len_mean": sum(lengths) / N,
        "response_len_max": max(lengths),
        "truncation_rate": sum(g.ro.truncated) / N,
    }


def mode_stats(g: Groups) -> dict[str, dict]:
    """Per thinking mode (``task.thinking``, an example's ``meta["thinking"]``): accuracy, form
    and length over its completions, and ``n``, its number of examples. Empty without modes."""
    G = g.group_size()
    modes = [g.examples[i // G].meta.get("thinking") for i in range(len(g.totals))]  # [N]
    out = {}
    for mode in sorted({m for m in modes if m}):
        rows = [i for i, m in enumerate(modes) if m == mode]
        out[mode] = {}
        for name, values in (
            ("accuracy", g.parts.get("accuracy")),
            ("format_rate", g.parts.get("format")),
            ("response_len_mean", [len(c) for c in g.ro.completion_ids]),
        ):
            if values is not None:
                out[mode][name] = sum(values[i] for i in rows) / len(rows)
        out[mode]["n"] = len(rows) // G
    return out
