import pytest

from thinkrl.config import Config, ConfigError
from thinkrl.sampling import CurriculumSampler, PrioritizedSampler, ShuffleSampler, build_sampler
from thinkrl.tasks import Example, Task


class ListTask(Task):
    name = "list"

    def check(self, pred, ex):
        return pred == ex.answer


def make_task(n=10, **meta):
    rows = [
        Example(question=f"q{i}", answer=str(i), meta={k: v[i] for k, v in meta.items()}) for i in range(n)
    ]
    return ListTask(rows, rows[:1], seed=0)


def test_prioritized_sampling_shifts_draws_toward_failing_prompts():
    task = make_task(10)
    s = PrioritizedSampler(task, seed=0, floor=0.05)
    # fixed success table: even prompts always fail (s = 0), odd prompts always succeed (s = 1)
    s.update(task.train, [float(i % 2) for i in range(10)])
    draws = [int(ex.answer) for _ in range(4000) for ex in s.next_batch(1)]
    failing = sum(1 for i in draws if i % 2 == 0) / len(draws)
    # weights: 1 - 0 = 1 for the 5 failing, max(1 - 1, 0.05) = 0.05 for the 5 solved:
    # P(failing) = 5 / (5 + 5 * 0.05) = 0.95238; binomial sd over 4000 draws is 0.0034
    assert failing == pytest.approx(5 / 5.25, abs=0.015)
    # the shuffle sampler on the same data draws them half and half
    shuffled = [int(ex.answer) for ex in ShuffleSampler(make_task(10)).next_batch(4000)]
    assert sum(1 for i in shuffled if i % 2 == 0) / 4000 == 0.5


def test_prioritized_batches_have_no_repeats_and_success_is_an_ema():
    task = make_task(10)
    s = PrioritizedSampler(task, seed=1, ema=0.5, prior=0.5)
    batch = s.next_batch(6)
    assert len({ex.question for ex in batch}) == 6
    assert len(s.next_batch(25)) == 25  # more than the data: whole passes, then the rest
    ex = task.train[3]
    assert s.weight(3) == 0.5  # unseen: 1 - prior
    s.update([ex], [0.0])  # first observation sets it: s = 0
    s.update([ex], [1.0])  # 0.5 * 0 + 0.5 * 1 = 0.5
    s.update([ex], [1.0])  # 0.5 * 0.5 + 0.5 * 1 = 0.75
    assert s.success[3] == 0.75 and s.weight(3) == pytest.approx(0.25, abs=1e-12)
    s.update([Example("not in task", "0")], [1.0])  # unknown examples are ignored
    assert list(s.success) == [3]


def test_prioritized_state_resumes_the_same_draws():
    task = make_task(10)
    a = PrioritizedSampler(task, seed=2)
    a.update(task.train[:4], [1.0, 0.0, 0.5, 1.0])
    a.next_batch(3)
    b = PrioritizedSampler(task, seed=99)
    b.load_state_dict(a.state_dict())
    assert [e.question for e in a.next_batch(5)] == [e.question for e in b.next_batch(5)]


def test_curriculum_goes_from_easy_to_hard_by_level():
    levels = [2, 0, 1, 2, 0, 1, 2, 0, 1, 0, 1, 2]
    task = make_task(12, level=levels)
    s = CurriculumSampler(task, horizon=12, seed=0)
    drawn = [ex.meta["level"] for ex in s.next_batch(12)]
    assert drawn == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2]
    assert [ex.meta["level"] for ex in s.next_batch(4)] == [0, 0, 0, 0]  # past the horizon: start over


def test_curriculum_spreads_a_short_horizon_over_all_difficulties():
    # pass rates 0.0, 0.1, ..., 0.9: difficulty 1 - pass rate; horizon 5 of 10 rows takes ranks 0, 2, 4, 6, 8
    task = make_task(10, pass_rate=[i / 10 for i in range(10)])
    s = CurriculumSampler(task, horizon=5)
    assert [ex.meta["pass_rate"] for ex in s.next_batch(5)] == [0.9, 0.7, 0.5, 0.3, 0.1]
    t = CurriculumSampler(task, horizon=20)  # a long horizon repeats each row twice, in order
    assert [ex.meta["pass_rate"] for ex in t.next_batch(4)] == [0.9, 0.9, 0.8, 0.8]
    u = CurriculumSampler(task, horizon=20)
    u.load_state_dict(t.state_dict())
    assert [e.question for e in u.next_batch(3)] == [e.question for e in t.next_batch(3)]


def test_curriculum_needs_difficulty_labels():
    with pytest.raises(ConfigError, match="task.levels"):
        CurriculumSampler(make_task(3), horizon=3)


def test_build_sampler_reads_the_config():
    cfg = Config()
    cfg.sampling.order = "prioritized"
    assert isinstance(build_sampler(make_task(3), cfg), PrioritizedSampler)
    cfg.sampling.order = "curriculum"
    cfg.max_steps, cfg.rollout.prompts_per_step = 5, 3
    assert build_sampler(make_task(3, level=[0, 1, 2]), cfg).horizon == 15
