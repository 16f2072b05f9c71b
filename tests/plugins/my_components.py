"""The worked example of docs/extending.md: a new advantage estimator, a new reward and a new
task, each registered where it is defined. A run names them after ``plugins=[this file]``."""

import torch

from thinkrl.algorithms import ADVANTAGES, AdvantageInput, Advantages
from thinkrl.rewards import REWARDS, extract_answer
from thinkrl.tasks import TASKS, Example, Task


@ADVANTAGES.register("median_baseline", loss_agg="seq_mean_token_mean", kl_in="loss")
def median_baseline(b: AdvantageInput) -> Advantages:
    """Each completion's reward minus the median reward of its group (a baseline that one
    lucky sample cannot move), the same on every token."""
    adv = torch.empty_like(b.rewards)
    for g in b.group_ids.unique():
        rows = b.group_ids == g
        adv[rows] = b.rewards[rows] - b.rewards[rows].median()
    return Advantages(adv[:, None] * b.mask, None)


@REWARDS.register("short_answer")
def short_answer(completion: str, example, *, max_chars: int = 3) -> float | None:
    """1.0 for a final answer of at most ``max_chars`` characters, 0.0 for a longer one, and
    None (not judged) when there is no answer at all."""
    answer = extract_answer(completion)
    if answer is None:
        return None
    return 1.0 if len(answer.strip()) <= max_chars else 0.0


class ParityTask(Task):
    """ "Is N even or odd?" for N in 0..999, answered with the word."""

    name = "parity"

    def __init__(self, cfg):
        rows = [
            Example(f"Is {n} even or odd?", "even" if n % 2 == 0 else "odd", task=self.name)
            for n in range(1000)
        ]
        super().__init__(rows[cfg.eval_size :][: cfg.train_size], rows[: cfg.eval_size], cfg.seed)

    def check(self, pred: str, ex: Example) -> bool:
        return pred.strip().lower() == ex.answer


@TASKS.register("parity")
def parity(cfg) -> Task:
    return ParityTask(cfg)
