from collections import Counter

import pytest

from thinkrl.config import ConfigError, TaskConfig, build_config
from thinkrl.tasks import build_task
from thinkrl.tasks.gym import split_counts


@pytest.mark.parametrize(
    "total,weights,expected",
    [
        (10, [1, 1, 1], [4, 3, 3]),  # 3.33 each: one left over goes to the first part
        (10, [3, 1], [8, 2]),  # 7.5 and 2.5: equal remainders, the earlier part wins
        (
            7,
            [0.5, 0.25, 0.25],
            [3, 2, 2],
        ),  # 3.5, 1.75, 1.75 -> floors 3 1 1; remainders .5 .75 .75 -> parts 1, 2
        (5, [2], [5]),
    ],
)
def test_split_counts(total, weights, expected):
    assert split_counts(total, weights) == expected
    assert sum(split_counts(total, weights)) == total


def test_weighted_mixture_has_exact_shares_and_checks_each_part():
    mix = [
        {"name": "chain_sum", "params": {"min_terms": 2, "max_terms": 2}, "weight": 3},
        {"name": "basic_arithmetic", "weight": 1},
    ]
    task = build_task(TaskConfig(name="mix", mixture=mix, train_size=40, eval_size=8))
    assert Counter(ex.task for ex in task.train) == {"chain_sum": 30, "basic_arithmetic": 10}
    assert Counter(ex.task for ex in task.eval) == {"chain_sum": 6, "basic_arithmetic": 2}
    assert not {e.question for e in task.eval} & {e.question for e in task.train}
    for ex in task.train[:3] + task.train[-3:] + task.eval:  # each part is scored by its own dataset
        assert task.check(ex.answer, ex), ex
    assert all(
        ex.question.count("+") + ex.question.count("-") >= 1 for ex in task.train if ex.task == "chain_sum"
    )


def test_curriculum_levels_label_examples():
    task = build_task(TaskConfig(name="chain_sum", levels=[0, 2], train_size=20, eval_size=4))
    assert Counter(ex.meta["level"] for ex in task.train) == {0: 10, 2: 10}
    # chain_sum's curriculum: level 0 is 2 terms of 1 digit; level 2 is 2-4 terms of 1-3 digits;
    # num_digits has 10 levels (1..10), so the global levels are 0..9
    lvl0 = [ex for ex in task.train if ex.meta["level"] == 0]
    assert all(len(ex.question.split(":")[1].split("=")[0].split()) == 3 for ex in lvl0)  # "a op b"
    assert all(task.check(ex.answer, ex) for ex in task.train)


def test_mixture_and_level_errors():
    with pytest.raises(ConfigError, match="task.name=mix needs task.mixture"):
        build_config(overrides=["task.name=mix"])
    with pytest.raises(ConfigError, match=r"task.mixture\[0\] must be a mapping"):
        build_config(overrides=["task.name=mix", "task.mixture=[{nme: chain_sum}]"])
    with pytest.raises(ConfigError, match="unknown task 'nope'"):
        build_task(TaskConfig(name="mix", mixture=[{"name": "nope"}]))
    with pytest.raises(ConfigError, match="curriculum levels 0..9, got 99"):
        build_task(TaskConfig(name="chain_sum", levels=[99], train_size=4, eval_size=1))


def test_levels_recipe_loads():
    from pathlib import Path

    from thinkrl.sampling import CurriculumSampler, build_sampler

    path = Path(__file__).resolve().parents[2] / "configs" / "chain_sum_levels_dapo.yaml"
    cfg = build_config(path, ["task.train_size=30", "task.eval_size=6"])
    assert cfg.sampling.dynamic and cfg.task.levels == [0, 1, 2]
    task = build_task(cfg.task)
    assert Counter(ex.meta["level"] for ex in task.train) == {0: 10, 1: 10, 2: 10}
    sampler = build_sampler(task, cfg)
    assert isinstance(sampler, CurriculumSampler) and sampler.horizon == 40 * 8
