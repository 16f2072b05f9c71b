"""Verifiable rewards, and their weighted composition.

Every reward has one signature (see ``rewards/base.py`` for group rewards, context and options)::

    fn(completion: str, example: Example) -> float | None

``completion`` is the whole response (including any prefill such as ``<think>``).
``None`` means "cannot judge this one"; it scores 0 and is counted. A reward that
raises also scores 0 and is counted (``RewardFailure`` under its reason, anything else as
``error``): a broken verifier never stops a run.

Registered rewards: ``accuracy`` (the task's own check), ``math`` (math-verify), ``exact``,
``choice``, ``code`` (sandboxed tests), ``format``, ``language``, ``kimi_length`` (group),
``overlong``, ``repetition``, ``hedging``; and any ``path/to/file.py:function``.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter

from thinkrl.config import ConfigError
from thinkrl.rewards import code, format, hedging, learned, length, math  # noqa: F401  (registers the rewards)
from thinkrl.rewards.base import (
    CONTEXT_KEYS,
    REWARDS,
    RewardFailure,
    check_options,
    extract_answer,
    extract_boxed,
    extract_final,
    extract_thinking,
    group_reward,
    keyword_params,
    parallel,
    resolve,
)
from thinkrl.sandbox import SandboxUnavailable

__all__ = [
    "REWARDS",
    "RewardModel",
    "RewardFailure",
    "check_options",
    "extract_answer",
    "extract_boxed",
    "extract_final",
    "extract_thinking",
    "group_reward",
    "parallel",
    "resolve",
]

log = logging.getLogger(__name__)


def _at(value, i: int):
    return value[i] if isinstance(value, (list, tuple)) else value


class RewardModel:
    """Weighted sum of named rewards, with per-reward values and failure counts kept apart.

    ``options`` maps a reward name to keyword options (the config's ``reward_args``).
    """

    def __init__(self, weights: dict[str, float], options: dict[str, dict] | None = None):
        self.weights = dict(weights)
        self.fns = {name: resolve(name) for name in self.weights}
        self.options = {name: dict((options or {}).get(name, {})) for name in self.fns}
        for name in options or {}:
            if name not in self.fns:
                raise ConfigError(
                    f"reward_args.{name}: '{name}' is not one of the rewards in use ({', '.join(self.fns)})"
                )
        for name, fn in self.fns.items():
            check_options(name, fn, self.options[name])
            if hasattr(fn, "validate"):  # a reward that can tell bad options before the first score
                fn.validate(self.options[name])
        self.context_keys = {name: keyword_params(fn) & set(CONTEXT_KEYS) for name, fn in self.fns.items()}
        self.failures: Counter = Counter()
        self._lock = threading.Lock()  # parallel rewards count failures from pool threads

    def _count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self.failures[key] += n

    def score(
        self,
        completions: list[str],
        examples: list,
        group_size: int | None = None,
        context: dict | None = None,
    ) -> tuple[list[float], dict[str, list[float]]]:
        """Return the total reward per completion and each named reward per completion.

        ``group_size``: completions come in adjacent groups of G per prompt (for group rewards);
        if None, a group is a run of adjacent completions sharing one example object.
        ``context``: per-completion facts by name (``num_tokens``, ``max_tokens``, ``truncated``),
        each a list or one value for all.
        """
        context = context or {}
        parts: dict[str, list[float]] = {}
        for name, fn in self.fns.items():
            if getattr(fn, "group", False):
                parts[name] = self._score_groups(name, fn, completions, examples, group_size, context)
            else:
                parts[name] = self._score_each(name, fn, completions, examples, context)
        totals = [sum(self.weights[n] * parts[n][i] for n in parts) for i in range(len(completions))]
        return totals, parts

    def _score_each(self, name, fn, completions, examples, context) -> list[float]:
        def one(i: int) -> float:
            kw = {k: _at(context[k], i) for k in self.context_keys[name] if k in context}
            return self._guard(name, lambda: fn(completions[i], examples[i], **kw, **self.options[name]))

        idx = range(len(completions))
        if getattr(fn, "parallel", False) and len(completions) > 1:
            from thinkrl.sandbox import pool

            return list(pool().map(one, idx))
        return [one(i) for i in idx]

    def _score_groups(self, name, fn, completions, examples, group_size, context) -> list[float]:
        out: list[float] = []
        for lo, hi in _groups(examples, group_size):
            kw = {
                k: [_at(context[k], i) for i in range(lo, hi)]
                for k in self.context_keys[name]
                if k in context
            }
            try:
                values = fn(completions[lo:hi], examples[lo:hi], **kw, **self.options[name])
                if len(values) != hi - lo:
                    raise ValueError(f"group reward returned {len(values)} values for {hi - lo} completions")
                out += [self._guard(name, lambda v=v: v) for v in values]
            except SandboxUnavailable:
                raise
            except Exception as e:
                reason = e.reason if isinstance(e, RewardFailure) else "error"
                self._count(f"{name}/{reason}", hi - lo)
                log.debug("group reward %s raised %r", name, e)
                out += [0.0] * (hi - lo)
        return out

    def _guard(self, name: str, call) -> float:
        try:
            value = call()
        except RewardFailure as e:
            self._count(f"{name}/{e.reason}")
            return 0.0
        except SandboxUnavailable:  # not a verifier bug: model code may not run here at all
            raise
        except Exception as e:  # a verifier bug must not end a run: score 0, count it
            self._count(f"{name}/error")
            log.debug("reward %s raised %r", name, e)
            return 0.0
        if value is None:
            self._count(f"{name}/skipped")
            return 0.0
        return float(value)


def _groups(examples: list, group_size: int | None) -> list[tuple[int, int]]:
    n = len(examples)
    if group_size:
        if n % group_size:
            raise ValueError(f"{n} completions do not split into groups of {group_size}")
        return [(i, i + group_size) for i in range(0, n, group_size)]
    out, lo = [], 0
    for i in range(1, n + 1):
        if i == n or examples[i] is not examples[lo]:
            out.append((lo, i))
            lo = i
    return out
