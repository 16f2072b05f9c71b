import pytest

from thinkrl.cli import main
from thinkrl.config import ConfigError, TaskConfig
from thinkrl.rewards import REWARDS
from thinkrl.tasks import build_task
from thinkrl.tasks.humaneval import HumanEvalTask


def test_humaneval_task_splits_and_prompts():
    task = build_task(TaskConfig(name="humaneval", params={}, eval_size=10))
    assert isinstance(task, HumanEvalTask)
    assert len(task.eval) == 10 and len(task.train) == 154
    assert not {e.meta["task_id"] for e in task.eval} & {e.meta["task_id"] for e in task.train}
    ex = next(e for e in task.train + task.eval if e.meta["task_id"] == "HumanEval/0")
    assert "def has_close_elements(numbers: List[float], threshold: float) -> bool:" in ex.question
    assert ex.question.startswith("Complete the following Python function")
    # the default eval_size (200) is capped at a fifth of the 164 problems
    assert len(build_task(TaskConfig(name="humaneval", params={})).eval) == 32


def test_humaneval_accuracy_is_pass_at_1():
    task = build_task(TaskConfig(name="humaneval", params={}, eval_size=5))
    ex = task.train[0]
    acc = REWARDS.get("accuracy")
    assert acc(f"<think>easy</think>\n```python\n{ex.answer}```", ex) == 1.0
    assert acc(f"```python\n{ex.meta['prompt']}    return None\n```", ex) == 0.0
    assert acc("no code here", ex) == 0.0
    assert task.check(ex.answer, ex) and not task.check("pass", ex)


def test_humaneval_rejects_params():
    with pytest.raises(ConfigError, match="takes no task.params"):
        build_task(TaskConfig(name="humaneval", params={"x": 1}))


def test_train_two_steps_on_humaneval_with_the_code_reward(tmp_path):
    out = tmp_path / "run"
    rc = main(
        [
            "train",
            "model=tiny-random",
            "max_steps=2",
            "task.name=humaneval",
            "rewards.code=1.0",
            "rewards.accuracy=0",
            "rewards.kimi_length=0.1",
            "rewards.overlong=0.1",
            "rollout.max_new_tokens=8",
            "rollout.prompts_per_step=2",
            "rollout.group_size=4",
            "eval.n=4",
            "progress=false",
            "plot=false",
            "dtype=fp32",
            "task.eval_size=8",
            f"output_dir={out}",
        ]
    )
    assert rc == 0
    import json

    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    for m in metrics:
        assert "reward/code" in m and "reward/kimi_length" in m and "reward/overlong" in m
        # 8 tokens of a random model: no code block, so the code reward is 0 for every sample
        assert m["reward/code"] == 0.0
