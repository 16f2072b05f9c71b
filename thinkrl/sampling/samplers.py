"""Prompt samplers: the order in which training prompts are drawn.

Every sampler has ``next_batch(n) -> list[Example]``, ``update(examples, success)``
(the share of each prompt's group that was right, after the step scored it) and
``state_dict()/load_state_dict()`` (saved in each checkpoint, so a resumed run draws
exactly what an uninterrupted one would).

- ``shuffle``: the task's own seeded per-epoch shuffle (the default).
- ``curriculum``: easy to hard (Kimi k1.5, section 2.3.4, "curriculum sampling").
- ``prioritized``: a prompt is drawn with probability proportional to ``1 - s_i``,
  its tracked success rate (Kimi k1.5, "prioritized sampling").
"""

from __future__ import annotations

import math
import random

from thinkrl.config import Config, ConfigError
from thinkrl.registry import Registry


class ShuffleSampler:
    """The task's per-epoch shuffle; its position lives in ``task.state_dict()``."""

    def __init__(self, task):
        self.task = task

    def next_batch(self, n: int) -> list:
        return self.task.next_batch(n)

    def update(self, examples: list, success: list[float]) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, s: dict) -> None:
        pass


def difficulty(ex) -> float | None:
    """A reasoning-gym curriculum level if the example has one, else 1 - its pass rate."""
    if "level" in ex.meta:
        return float(ex.meta["level"])
    if "pass_rate" in ex.meta:
        return 1.0 - float(ex.meta["pass_rate"])
    return None


class CurriculumSampler:
    """Easy to hard over a horizon of ``horizon`` draws (the run's prompts_per_step x max_steps).

    Training rows are ranked by difficulty (ties in a seeded random order); draw ``d`` of
    the horizon takes rank ``floor(d * L / H)`` of the L rows, so difficulty never
    decreases within the horizon and the hardest rows are reached by its end, whether
    the horizon is shorter than the data (rows are skipped evenly) or longer (rows
    repeat). Past the horizon the walk starts again from the easiest, ties reshuffled.
    """

    def __init__(self, task, horizon: int, seed: int = 0):
        self.task, self.horizon, self.seed, self.draws = task, max(1, horizon), seed, 0
        keys = [difficulty(ex) for ex in task.train]
        if any(k is None for k in keys):
            raise ConfigError(
                "sampling.order=curriculum needs a difficulty for every training row: use "
                "task.levels (reasoning-gym curriculum levels) or pass rates (task.pass_rates, or a "
                "pass_rate field in the data, written by `thinkrl difficulty`)"
            )
        self.keys = keys
        self._cycle, self._ranked = -1, []

    def _ranking(self, cycle: int) -> list[int]:
        if cycle != self._cycle:
            tie = list(range(len(self.keys)))
            random.Random(self.seed * 1_000_003 + cycle).shuffle(tie)
            pos = {i: r for r, i in enumerate(tie)}
            self._ranked = sorted(range(len(self.keys)), key=lambda i: (self.keys[i], pos[i]))
            self._cycle = cycle
        return self._ranked

    def next_batch(self, n: int) -> list:
        out = []
        L, H = len(self.keys), self.horizon
        for _ in range(n):
            cycle, d = divmod(self.draws, H)
            out.append(self.task.train[self._ranking(cycle)[d * L // H]])
            self.draws += 1
        return out

    def update(self, examples: list, success: list[float]) -> None:
        pass

    def state_dict(self) -> dict:
        return {"draws": self.draws}

    def load_state_dict(self, s: dict) -> None:
        self.draws = int(s.get("draws", 0))


class PrioritizedSampler:
    """Draw prompts with probability proportional to ``max(1 - s_i, floor)``.

    ``s_i`` is an exponential moving average of prompt i's group success rate, updated
    online from the training rewards: the first observation sets it, later ones move it
    by ``ema`` (``s <- (1 - ema) * s + ema * x``). An unseen prompt counts as ``prior``.
    The floor keeps solved prompts from vanishing, so a forgotten skill is noticed.
    A batch is drawn without replacement (Efraimidis and Spirakis 2006: the n largest
    keys ``log(u) / w``, u uniform on (0, 1)), so one step never repeats a prompt.
    """

    def __init__(self, task, seed: int = 0, floor: float = 0.05, ema: float = 0.5, prior: float = 0.5):
        self.task, self.floor, self.ema, self.prior = task, floor, ema, prior
        self.rng = random.Random(seed)
        self.success: dict[int, float] = {}
        self._row = {id(ex): i for i, ex in enumerate(task.train)}

    def weight(self, i: int) -> float:
        return max(1.0 - self.success.get(i, self.prior), self.floor)

    def next_batch(self, n: int) -> list:
        L = len(self.task.train)
        out: list = []
        while len(out) < n:
            k = min(n - len(out), L)
            keys = [
                (math.log(1.0 - self.rng.random()) / self.weight(i), i) for i in range(L)
            ]  # log(u), u in (0, 1]
            out += [self.task.train[i] for _, i in sorted(keys, reverse=True)[:k]]
        return out

    def update(self, examples: list, success: list[float]) -> None:
        for ex, x in zip(examples, success):
            i = self._row.get(id(ex))
            if i is None:
                continue
            old = self.success.get(i)
            self.success[i] = float(x) if old is None else (1.0 - self.ema) * old + self.ema * float(x)

    def state_dict(self) -> dict:
        return {"rng": self.rng.getstate(), "success": dict(self.success)}

    def load_state_dict(self, s: dict) -> None:
        if "rng" in s:  # a checkpoint written with another sampling.order has no state for this one
            self.rng.setstate(s["rng"])
        self.success = {int(k): float(v) for k, v in s.get("success", {}).items()}


SAMPLERS: Registry = Registry("sampling order")  # fn(task, cfg) -> a sampler


@SAMPLERS.register("shuffle")
def _shuffle(task, cfg: Config):
    return ShuffleSampler(task)


@SAMPLERS.register("curriculum")
def _curriculum(task, cfg: Config):
    return CurriculumSampler(task, horizon=cfg.max_steps * cfg.rollout.prompts_per_step, seed=cfg.task.seed)


@SAMPLERS.register("prioritized")
def _prioritized(task, cfg: Config):
    s = cfg.sampling
    return PrioritizedSampler(
        task, seed=cfg.task.seed, floor=s.priority_floor, ema=s.priority_ema, prior=s.priority_prior
    )


def build_sampler(task, cfg: Config):
    """The sampler ``sampling.order`` names."""
    return SAMPLERS.get(cfg.sampling.order)(task, cfg)
